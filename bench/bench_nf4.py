"""NF4 linear latency on the current device: dense, dequantize-then-matmul, fastpeft's fused NF4
kernel and the fused QLoRA layer (r = 16).

Run: ``pytest bench/bench_nf4.py --benchmark-only`` (outside the default `tests` path). Each group
is one M on one device: read its rows as ratios against `dense`. CUDA: 4096x4096, bf16, double
quant, the Triton kernels (split-K decode path for M <= 16; autotuned in the warm-up call, before
timing); each timed call synchronises, so decode numbers include launch overhead. CPU: 512 wide,
fp32, `ops.nf4_linear` on its torch backend (the interpreter is far too slow to time). Never run
this with TRITON_INTERPRET=1 on a GPU machine: it would time the interpreter. bitsandbytes and
the bandwidth figures are in `fastpeft bench` (its nf4 section), which checks outputs first.
"""
import pytest
import torch
import torch.nn.functional as F

from fastpeft import ops
from fastpeft.bench.suite import bench_call, suite_device

DEVICE = suite_device()
if DEVICE == "cuda":
    WIDTH, DTYPE, BACKEND, MS = 4096, torch.bfloat16, "triton", (1, 16, 2048)
else:
    WIDTH, DTYPE, BACKEND, MS = 512, torch.float32, "torch", (1, 16, 128)
RANK, SCALING, BLOCKSIZE = 16, 2.0, 64


@pytest.fixture(scope="module")
def layer():
    from fastpeft.quant.nf4 import NF4Weight

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(WIDTH, WIDTH, generator=g) * WIDTH ** -0.5).to(DEVICE, DTYPE)
    q = ops.nf4_quantize(w, BLOCKSIZE, double_quant=True)
    qw = NF4Weight(q["packed"], q["absmax"], q["quant_map"], q["nested_absmax"], q["nested_quant_map"],
                   q["offset"], (WIDTH, WIDTH), BLOCKSIZE)
    return dict(qweight=qw, dense=ops.nf4_dequantize(qw, DTYPE),
                lora_A=(torch.randn(RANK, WIDTH, generator=g) * WIDTH ** -0.5).to(DEVICE, DTYPE),
                lora_B=(torch.randn(WIDTH, RANK, generator=g) * RANK ** -0.5).to(DEVICE, DTYPE))


@pytest.fixture(scope="module", params=MS, ids=lambda m: f"M{m}")
def x(request):
    g = torch.Generator().manual_seed(1)
    return torch.randn(request.param, WIDTH, generator=g).to(DEVICE, DTYPE)


def _run(benchmark, x, name, fn, backend="torch"):
    y = bench_call(benchmark, DEVICE, f"nf4 {DEVICE} {DTYPE} M={x.shape[0]} K=N={WIDTH} r={RANK} bs={BLOCKSIZE} dq",
                   name, lambda: fn(x), backend=backend)
    assert y.shape == (x.shape[0], WIDTH) and torch.isfinite(y).all()


def test_dense(benchmark, layer, x):
    _run(benchmark, x, "dense", lambda t: F.linear(t, layer["dense"]))


def test_dequant_then_matmul(benchmark, layer, x):
    _run(benchmark, x, "dequant+matmul",
         lambda t: F.linear(t, ops.nf4_dequantize(layer["qweight"], DTYPE, backend=BACKEND)), BACKEND)


def test_fastpeft_nf4(benchmark, layer, x):
    _run(benchmark, x, "fastpeft nf4", lambda t: ops.nf4_linear(t, layer["qweight"], backend=BACKEND), BACKEND)


def test_fastpeft_qlora(benchmark, layer, x):
    _run(benchmark, x, "fastpeft qlora",
         lambda t: ops.nf4_linear(t, layer["qweight"], None, layer["lora_A"], layer["lora_B"], SCALING,
                                  backend=BACKEND), BACKEND)
