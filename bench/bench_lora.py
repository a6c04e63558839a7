"""LoRA linear latency on the current device: base, eager unmerged LoRA, merged, fastpeft.

Run: ``pytest bench/bench_lora.py --benchmark-only`` (outside the default `tests` path). Each
group is one shape on one device, so read the four rows of a group as ratios against `base`.
CUDA: 4096 wide, fp16, the Triton kernels (autotuned during the warm-up call, before timing);
each timed call synchronises, so decode numbers include launch overhead, as a real step does.
CPU: 512 wide, fp32, `ops.lora_linear` on its torch backend (the interpreter is far too slow to
time). Never run this with TRITON_INTERPRET=1 on a GPU machine: it would time the interpreter.
Decode timings from CUDA graphs (no launch overhead) and the bandwidth figures are in
`fastpeft bench` (its kernels section), which checks outputs first.
"""
import pytest
import torch
import torch.nn.functional as F

from fastpeft import ops
from fastpeft.bench.suite import bench_call, suite_device

DEVICE = suite_device()
if DEVICE == "cuda":
    WIDTH, DTYPE, BACKEND, MS = 4096, torch.float16, "triton", (1, 16, 2048)
else:
    WIDTH, DTYPE, BACKEND, MS = 512, torch.float32, "torch", (1, 16, 128)
RANK, SCALING = 16, 2.0


@pytest.fixture(scope="module", params=MS, ids=lambda m: f"M{m}")
def tensors(request):
    M, K, N = request.param, WIDTH, WIDTH
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, DTYPE)

    t = dict(x=rnd(M, K), weight=rnd(N, K, scale=K ** -0.5), bias=rnd(N),
             lora_A=rnd(RANK, K, scale=K ** -0.5), lora_B=rnd(N, RANK, scale=RANK ** -0.5))
    t["merged"] = t["weight"] + SCALING * (t["lora_B"] @ t["lora_A"])
    t["M"] = M
    return t


def _run(benchmark, tensors, name, fn):
    y = bench_call(benchmark, DEVICE, f"lora {DEVICE} {DTYPE} M={tensors['M']} K=N={WIDTH} r={RANK}", name,
                   lambda: fn(tensors), backend=BACKEND if name == "fastpeft" else "torch")
    assert y.shape == (tensors["M"], WIDTH) and torch.isfinite(y).all()


def test_base(benchmark, tensors):
    _run(benchmark, tensors, "base", lambda t: F.linear(t["x"], t["weight"], t["bias"]))


def test_unmerged_eager(benchmark, tensors):
    def fn(t):
        lora = F.linear(F.linear(t["x"], t["lora_A"]), t["lora_B"])
        return F.linear(t["x"], t["weight"], t["bias"]) + SCALING * lora
    _run(benchmark, tensors, "unmerged", fn)


def test_merged(benchmark, tensors):
    _run(benchmark, tensors, "merged", lambda t: F.linear(t["x"], t["merged"], t["bias"]))


def test_fastpeft(benchmark, tensors):
    def fn(t):
        return ops.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING,
                               backend=BACKEND)
    _run(benchmark, tensors, "fastpeft", fn)
