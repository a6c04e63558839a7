"""Mixed-adapter LoRA latency on the current device: one layer, row i of the batch on adapter
i % 32 (ranks 8/16/32/64): base, one adapter of rank 64 for every row, fastpeft's multi-adapter op
over a bank of the batch's adapters and over 1000 registered, and real peft's `adapter_names=`.

Run: ``pytest bench/bench_multi_lora.py --benchmark-only`` (outside the default `tests` path). Each
group is one phase on one device: read its rows as ratios against `base`. The shapes are those of
`fastpeft bench`'s multi section (fastpeft/bench/multi.py: CUDA 4096 wide bf16 with the Triton
kernels, CPU 1024 wide fp32 on the torch backend), which also checks every output first and runs
the whole-model case. Each timed call synchronises, so CUDA decode numbers include launch
overhead. Never run this with TRITON_INTERPRET=1 on a GPU machine: it would time the interpreter.
"""
import pytest
import torch
import torch.nn.functional as F

from fastpeft import ops
from fastpeft.bench.suite import bench_call, suite_device
from fastpeft.bench.multi import make_adapters, make_bank, peft_mixed_layer, shapes_for
from fastpeft.multi import TokenGroups

DEVICE = suite_device()
S = shapes_for(DEVICE, quick=False)


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(S.n, S.k, generator=g) * S.k ** -0.5).to(DEVICE, S.torch_dtype)
    bias = (torch.randn(S.n, generator=g) * 0.1).to(DEVICE, S.torch_dtype)
    adapters = make_adapters(S, S.adapters, DEVICE, seed=1)
    stride = S.registered // S.adapters
    others = iter(make_adapters(S, S.registered - S.adapters, DEVICE, seed=2))
    registered = [adapters[i // stride] if i % stride == 0 and i // stride < S.adapters else next(others)
                  for i in range(S.registered)]
    peft_fn, status, _, _ = peft_mixed_layer(S, weight, bias, adapters, DEVICE)
    return dict(weight=weight, bias=bias, adapters=adapters, bank=make_bank(S, adapters, DEVICE),
                big=make_bank(S, registered, DEVICE), stride=stride, peft=peft_fn, peft_status=status)


@pytest.fixture(scope="module", params=["decode", "prefill"])
def batch(request, layer):
    rows, seq = (S.decode_rows, 1) if request.param == "decode" else S.prefill
    ids = [i % S.adapters for i in range(rows)]
    x = torch.randn(rows, seq, S.k, generator=torch.Generator().manual_seed(3)).to(DEVICE, S.torch_dtype)
    return dict(phase=f"{request.param} {rows}x{seq}", x=x, ids=ids, groups=TokenGroups(ids, seq, DEVICE),
                big_groups=TokenGroups([i * layer["stride"] for i in ids], seq, DEVICE))


def _run(benchmark, batch, name, fn):
    y = bench_call(benchmark, DEVICE, f"multi-lora {DEVICE} {S.dtype} {batch['phase']} K=N={S.k} {S.adapters} adapters",
                   name, fn)
    assert y.shape == (*batch["x"].shape[:-1], S.n) and torch.isfinite(y).all()


def test_base(benchmark, layer, batch):
    _run(benchmark, batch, "base", lambda: F.linear(batch["x"], layer["weight"], layer["bias"]))


def test_single_adapter(benchmark, layer, batch):
    a, b, scaling = max(layer["adapters"], key=lambda t: t[0].shape[0])
    _run(benchmark, batch, "one adapter", lambda: ops.lora_linear(batch["x"], layer["weight"], layer["bias"], a, b,
                                                                   scaling))


def test_fastpeft(benchmark, layer, batch):
    _run(benchmark, batch, "fastpeft", lambda: ops.multi_lora_linear(batch["x"], layer["weight"], layer["bias"],
                                                                      layer["bank"], batch["groups"]))


def test_fastpeft_among_registered(benchmark, layer, batch):
    _run(benchmark, batch, f"fastpeft among {S.registered}", lambda: ops.multi_lora_linear(
        batch["x"], layer["weight"], layer["bias"], layer["big"], batch["big_groups"]))


def test_peft(benchmark, layer, batch):
    if layer["peft"] is None:
        pytest.skip(f"peft: {layer['peft_status']}")
    names = [f"a{i}" for i in batch["ids"]]
    _run(benchmark, batch, "peft", lambda: layer["peft"](batch["x"], names))
