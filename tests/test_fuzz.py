"""Randomized kernels-vs-references (issue 18), under TRITON_INTERPRET=1 on a CPU: shapes that
include 1 and primes, fp32/fp16/bf16, strided and transposed operands, ranks, adapter mixes with
empty groups and `__base__` rows, and NaN/inf in adapters (and bank holes) that no clean row uses.

`pytest tests/test_fuzz.py` runs the short "ci" profile (fixed examples, well under 2 minutes);
`pytest tests/test_fuzz.py --hypothesis-profile=long` runs the nightly one.
"""
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

from fastpeft.kernels import reference  # noqa: E402
from fastpeft.multi import TokenGroups  # noqa: E402

# The kernels run on CPU tensors under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="runs the kernels on CPU tensors: needs TRITON_INTERPRET=1")
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {FP32: (3e-5, 3e-5), FP16: (3e-3, 3e-3), BF16: (2.5e-2, 2.5e-2)}
SIZES = st.sampled_from([1, 2, 3, 5, 7, 13, 16, 17, 31])
DTYPES = st.sampled_from([FP32, FP16, BF16])
POISON = st.sampled_from([float("nan"), float("inf"), -float("inf")])


def _close(got, want, mask=None):
    if mask is not None:
        got, want = got[mask], want[mask]
    atol, rtol = TOL[want.dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def _operand(rows, cols, dtype, g, layout):
    """A [rows, cols] tensor laid out as asked: contiguous, transposed view, or inner stride 2."""
    if layout == "t":
        return torch.randn(cols, rows, generator=g).to(dtype).t()
    if layout == "s":
        return torch.randn(rows, 2 * cols, generator=g).to(dtype)[:, ::2]
    return torch.randn(rows, cols, generator=g).to(dtype)


@st.composite
def multi_cases(draw):
    n_adapters = draw(st.integers(1, 4))
    ranks = draw(st.lists(st.sampled_from([1, 2, 3, 5, 8, 13]), min_size=n_adapters, max_size=n_adapters))
    rows = draw(st.lists(st.integers(-1, n_adapters - 1), min_size=1, max_size=6))
    return dict(
        K=draw(SIZES), N=draw(SIZES), ranks=ranks, rows=rows, T=draw(st.sampled_from([1, 2, 3])),
        dtype=draw(DTYPES), layout=draw(st.sampled_from(["c", "t", "s"])), bias=draw(st.booleans()),
        poison=draw(POISON), hole=draw(st.integers(0, 3)), seed=draw(st.integers(0, 2**16)),
    )


def _bank(case, dtype, g, poisoned: bool):
    """Every adapter at its own rank, `hole` rows between them, plus one extra adapter no row
    uses (id len(ranks)); poisoned: the extra adapter and the holes hold NaN/inf."""
    K, N, ranks, hole = case["K"], case["N"], case["ranks"] + [4], case["hole"]
    offsets, start = [], 0
    for r in ranks:
        offsets.append(start)
        start += r + hole
    fill = case["poison"] if poisoned else 0.0
    lora_a, lora_b = torch.full((start, K), fill), torch.full((start, N), fill)
    for i, (off, r) in enumerate(zip(offsets, ranks)):
        a = torch.randn(r, K, generator=g) / math.sqrt(K)
        b = torch.randn(r, N, generator=g) / math.sqrt(r)
        last = i == len(ranks) - 1
        lora_a[off:off + r] = case["poison"] if last and poisoned else a
        lora_b[off:off + r] = case["poison"] if last and poisoned else b
    return (lora_a.to(dtype), lora_b.to(dtype), torch.tensor(offsets, dtype=torch.int32),
            torch.tensor(ranks, dtype=torch.int32), torch.tensor([1.5 / r for r in ranks]), max(ranks))


@given(multi_cases())
def test_multi_lora_kernels_vs_reference(case):
    from fastpeft.kernels import multi_lora

    dtype = case["dtype"]
    g = torch.Generator().manual_seed(case["seed"])
    groups = TokenGroups(case["rows"], case["T"], "cpu")
    x = _operand(groups.M, case["K"], dtype, g, case["layout"])
    weight = _operand(case["N"], case["K"], dtype, g, "t" if case["layout"] != "c" else "c") / math.sqrt(case["K"])
    bias = torch.randn(case["N"], generator=g).to(dtype) if case["bias"] else None
    clean_state = g.get_state()
    outputs = {}
    for poisoned in (False, True):
        g.set_state(clean_state)
        bank = _bank(case, dtype, g, poisoned)
        grouped_args = (groups.perm, groups.seg_start, groups.seg_adapter, groups.num_segments, groups.max_segment)
        outputs[poisoned] = {
            "ref_grouped": reference.multi_lora_grouped_fwd(x, weight, bias, *bank, *grouped_args),
            "ref_gathered": reference.multi_lora_gathered_fwd(x, weight, bias, *bank, groups.token_ids),
            "grouped": multi_lora.multi_lora_grouped_fwd(x, weight, bias, *bank, *grouped_args),
            "gathered": multi_lora.multi_lora_gathered_fwd(x, weight, bias, *bank, groups.token_ids),
        }
    want = outputs[False]["ref_grouped"]
    for poisoned in (False, True):
        for name, got in outputs[poisoned].items():
            _close(got, want)
            assert torch.equal(got, outputs[False][name]), f"{name}: a poisoned unused adapter changed clean rows"


@given(M=SIZES, K=SIZES, N=SIZES, r=st.sampled_from([1, 2, 3, 7, 16, 17]), dtype=DTYPES,
       layout=st.sampled_from(["c", "t", "s"]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_lora_kernel_vs_reference(M, K, N, r, dtype, layout, bias, seed):
    from fastpeft.kernels import lora

    g = torch.Generator().manual_seed(seed)
    x = _operand(M, K, dtype, g, layout)
    weight = _operand(N, K, dtype, g, layout) / math.sqrt(K)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    lora_A = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(dtype)
    lora_B = (torch.randn(N, r, generator=g) / math.sqrt(r)).to(dtype)
    want = reference.lora_fwd(x, weight, b, lora_A, lora_B, 0.75)
    _close(lora.lora_fwd(x, weight, b, lora_A, lora_B, 0.75), want)


@given(rows=st.lists(st.integers(-1, 3), min_size=1, max_size=8), T=st.sampled_from([1, 2, 5]))
def test_token_groups_cover_every_token_once(rows, T):
    groups = TokenGroups(rows, T, "cpu")
    perm = groups.perm.tolist()
    assert sorted(perm) == list(range(len(rows) * T))
    ids = groups.token_ids.tolist()
    assert [ids[p] for p in perm] == sorted(ids)
    starts = groups.seg_start.tolist()
    assert starts[0] == 0 and starts[-1] == len(perm)
    for s, adapter in enumerate(groups.seg_adapter.tolist()):
        assert all(ids[p] == adapter for p in perm[starts[s]:starts[s + 1]])
