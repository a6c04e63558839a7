"""kernels/multi_lora.py (grouped and gathered) against kernels/reference.py, under the interpreter
on a CPU; the references themselves against a per-token loop of the single-adapter reference."""
import math

import pytest
import torch

from fastpeft.kernels import multi_lora, reference
from fastpeft.multi import TokenGroups

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Same budget as tests/kernels/test_lora.py: a couple of ulps of the output dtype.
TOL = {FP32: (3e-5, 3e-5), FP16: (3e-3, 3e-3), BF16: (2.5e-2, 2.5e-2)}


def _bank(K, N, ranks, dtype, device, seed=0):
    """A bank like fastpeft.multi.AdapterBank's: adapters at their own rank, with a 3-row hole
    between them (offsets are not cumulative) holding 1e4, which would show if it leaked in
    (the references' contract: rows of no adapter are finite)."""
    g = torch.Generator().manual_seed(seed)
    offsets, start = [], 0
    for r in ranks:
        offsets.append(start)
        start += r + 3
    lora_a = torch.full((start, K), 1e4)
    lora_b = torch.full((start, N), 1e4)
    for off, r in zip(offsets, ranks):
        lora_a[off:off + r] = torch.randn(r, K, generator=g) / math.sqrt(K)
        lora_b[off:off + r] = torch.randn(r, N, generator=g) / math.sqrt(r)
    scalings = torch.tensor([2.0 / r for r in ranks])
    return dict(lora_a=lora_a.to(device, dtype), lora_b=lora_b.to(device, dtype),
                offsets=torch.tensor(offsets, dtype=torch.int32, device=device),
                ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
                scalings=scalings.to(device), max_rank=max(ranks))


def _base(M, K, N, dtype, device, bias, strided, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, 2 * K if strided else K, generator=g).to(device, dtype)
    x = x[:, ::2] if strided else x                                                  # inner stride 2
    weight = (torch.randn(K, N, generator=g) / math.sqrt(K)).to(device, dtype).t()   # a transposed view
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None
    return x, weight, b


def _args(bank):
    return (bank["lora_a"], bank["lora_b"], bank["offsets"], bank["ranks"], bank["scalings"], bank["max_rank"])


def _loop_oracle(x, weight, bias, bank, token_ids):
    """Token by token with the single-adapter reference: the definition the kernels implement."""
    rows = []
    for m, i in enumerate(token_ids.tolist()):
        xm = x[m:m + 1]
        if i < 0:
            rows.append(torch.nn.functional.linear(xm.float(), weight.float(),
                                                   None if bias is None else bias.float()))
            continue
        off, r = int(bank["offsets"][i]), int(bank["ranks"][i])
        rows.append(reference.lora_fwd(xm.float(), weight.float(), None if bias is None else bias.float(),
                                       bank["lora_a"][off:off + r].float(), bank["lora_b"][off:off + r].t().float(),
                                       float(bank["scalings"][i])))
    return torch.cat(rows)


def _close(got, want):
    atol, rtol = TOL[want.dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) or NaN-polluted elements"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


RANKS = [1, 4, 8, 16, 64]
# (name, row ids over 5 adapters, tokens per row): -1 rows, every row its own adapter, all one
# adapter, adapters absent from the batch (empty segments), a single row.
BATCHES = [
    ("mixed", [0, -1, 2, 2, 4, -1, 1, 3, 0], 4),
    ("distinct", [4, 3, 2, 1, 0, -1], 1),
    ("one", [3, 3, 3], 11),
    ("sparse", [4, 4, -1, 4, 1], 7),
    ("base_only", [-1, -1], 5),
    ("single", [2], 1),
]


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("name,row_ids,T", BATCHES, ids=[b[0] for b in BATCHES])
def test_kernels_match_reference(name, row_ids, T, dtype, device):
    K, N = 37, 45
    bank = _bank(K, N, RANKS, dtype, device)
    groups = TokenGroups(row_ids, T, device)
    x, weight, bias = _base(groups.M, K, N, dtype, device, bias=name != "one", strided=name == "mixed")
    want = reference.multi_lora_grouped_fwd(x, weight, bias, *_args(bank), groups.perm, groups.seg_start,
                                            groups.seg_adapter, groups.num_segments, groups.max_segment)
    _close(reference.multi_lora_gathered_fwd(x, weight, bias, *_args(bank), groups.token_ids), want)
    for launch in ("grouped", "gathered"):
        out = torch.full((groups.M, N), float("nan"), dtype=dtype, device=device)
        if launch == "grouped":
            got = multi_lora.multi_lora_grouped_fwd(
                x, weight, bias, *_args(bank), groups.perm, groups.seg_start, groups.seg_adapter,
                groups.num_segments, groups.max_segment, out=out)
        else:
            got = multi_lora.multi_lora_gathered_fwd(x, weight, bias, *_args(bank), groups.token_ids, out=out)
        assert got is out
        _close(got, want)


@pytest.mark.parametrize("row_ids,T", [([0, -1, 2, 2, 4, 1, 3], 3), ([1, 1, 1, 1], 2)])
def test_references_match_a_loop_of_single_adapter_references(row_ids, T):
    K, N = 29, 23
    bank = _bank(K, N, RANKS, FP32, "cpu")
    groups = TokenGroups(row_ids, T, "cpu")
    x, weight, bias = _base(groups.M, K, N, FP32, "cpu", bias=True, strided=False)
    want = _loop_oracle(x, weight, bias, bank, groups.token_ids)
    got = reference.multi_lora_grouped_fwd(x, weight, bias, *_args(bank), groups.perm, groups.seg_start,
                                           groups.seg_adapter, groups.num_segments, groups.max_segment)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    got = reference.multi_lora_gathered_fwd(x, weight, bias, *_args(bank), groups.token_ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_token_groups_sort_rows_into_segments():
    groups = TokenGroups([2, -1, 2, 0], 2, "cpu")
    assert groups.token_ids.tolist() == [2, 2, -1, -1, 2, 2, 0, 0]
    assert groups.perm.tolist() == [2, 3, 6, 7, 0, 1, 4, 5]
    assert groups.seg_start.tolist() == [0, 2, 4, 8]
    assert groups.seg_adapter.tolist() == [-1, 0, 2]
    assert (groups.num_segments, groups.max_segment, groups.min_id, groups.max_id) == (3, 4, -1, 2)


def test_launchers_check_shapes_and_dtypes(device):
    K, N = 8, 6
    bank = _bank(K, N, [2, 3], FP32, device)
    groups = TokenGroups([0, 1], 1, device)
    x, weight, _ = _base(2, K, N, FP32, device, bias=False, strided=False)
    with pytest.raises(ValueError, match="lora_a"):
        multi_lora.multi_lora_gathered_fwd(x, weight, None, bank["lora_a"][:, :-1], *_args(bank)[1:],
                                           groups.token_ids)
    with pytest.raises(ValueError, match="weight"):
        multi_lora.multi_lora_gathered_fwd(x, weight.half(), None, *_args(bank), groups.token_ids)
    with pytest.raises(ValueError, match="out"):
        multi_lora.multi_lora_gathered_fwd(x, weight, None, *_args(bank), groups.token_ids,
                                           out=torch.empty(2, N + 1, device=device))


@pytest.mark.parametrize("dtype,double_quant", [(FP32, True), (FP16, False), (BF16, True)])
def test_nf4_base_matches_reference_on_the_dequantized_weight(dtype, double_quant, device):
    """Multi-tenant QLoRA: the NF4 base decoded in the kernels equals the dense reference on
    bitsandbytes' dequantized weight (blocks straddle rows: N * K is not a multiple of 64)."""
    K, N, blocksize = 37, 45, 64
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(device)
    packed, absmax = reference.nf4_quantize(w, blocksize)
    nested = None
    if double_quant:
        code8 = reference.dynamic_map(device)
        absmax, nested_absmax, offset = reference.nf4_double_quantize(absmax, code8)
        nested = (code8, nested_absmax, offset)
    nf4 = (packed, absmax, (N, K), blocksize, nested, reference.nf4_code(device))
    dense = reference.nf4_dequantize(packed, absmax, (N, K), blocksize, dtype, nested)
    bank = _bank(K, N, [1, 16, 4], dtype, device)
    groups = TokenGroups([2, -1, 0, 1, 1, 2], 3, device)
    x, _, bias = _base(groups.M, K, N, dtype, device, bias=True, strided=False)
    want = reference.multi_lora_gathered_fwd(x, dense, bias, *_args(bank), groups.token_ids)
    got = multi_lora.multi_lora_gathered_fwd(x, None, bias, *_args(bank), groups.token_ids, nf4=nf4)
    _close(got, want)
    got = multi_lora.multi_lora_grouped_fwd(x, None, bias, *_args(bank), groups.perm, groups.seg_start,
                                            groups.seg_adapter, groups.num_segments, groups.max_segment, nf4=nf4)
    _close(got, want)
