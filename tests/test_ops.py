"""fastpeft.ops.lora_linear: outputs, gradients against torch autograd, dropout, validation."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastpeft import ops
from fastpeft.kernels import reference

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Outputs are O(1) by construction (see _inputs): a few ulps of the dtype (see
# tests/kernels/test_lora.py); gradients sum over M rows as well, so they get twice that.
TOL = {FP32: (2e-5, 2e-5), FP16: (3e-3, 3e-3), BF16: (2.5e-2, 2.5e-2)}


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Each test runs on both backends, forced through FASTPEFT_BACKEND (conftest's
    `triton_backend` fixture for triton), so the call-time lookup is exercised too."""
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
    else:
        monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    return request.param


def _inputs(shape, K, N, r, dtype, device, *, bias=True, conv1d=False, grad=(), seed=0):
    """x [*shape, K], weight [N, K] (a transposed view of a [K, N] Conv1D weight if `conv1d`,
    whose leaf is t["param"]), bias [N], lora_A [r, K], lora_B [N, r]; `grad` names the leaves
    that require grad."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)

    t = {
        "x": rnd(*shape, K),
        "weight": rnd(K, N, scale=K ** -0.5) if conv1d else rnd(N, K, scale=K ** -0.5),
        "bias": rnd(N) if bias else None,
        "lora_A": rnd(r, K, scale=K ** -0.5),
        "lora_B": rnd(N, r, scale=r ** -0.5),
    }
    for name in grad:
        t[name].requires_grad_(True)
    if conv1d:
        t["param"] = t["weight"]  # the leaf; the op sees the view
        t["weight"] = t["weight"].t()
    return t


def _plain(t, s):
    """The plain-torch expression, in fp32, as the autograd oracle."""
    x, w, A, B = (t[k].float() for k in ("x", "weight", "lora_A", "lora_B"))
    b = None if t["bias"] is None else t["bias"].float()
    return F.linear(x, w, b) + s * F.linear(F.linear(x, A), B)


def _args(t):
    return t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"]


@pytest.mark.parametrize("shape,K,N,r,dtype,bias,conv1d,x_slice", [
    ((2, 5), 37, 19, 4, FP32, True, False, True),     # 3-D x [B, T, K], a slice of a wider x
    ((33,), 70, 37, 16, FP16, False, True, False),    # Conv1D weight view
    ((1, 1), 19, 70, 1, BF16, True, True, True),      # decode
])
def test_forward_matches_reference(device, backend, shape, K, N, r, dtype, bias, conv1d, x_slice):
    t = _inputs(shape, K, N, r, dtype, device, bias=bias, conv1d=conv1d)
    if x_slice:  # same values, non-contiguous: x[..., :K] of a [..., K + 3] tensor
        wide = torch.full((*shape, K + 3), float("nan"), dtype=dtype, device=device)
        wide[..., :K] = t["x"]
        t["x"] = wide[..., :K]
    assert ops.resolve_backend(t["x"]) == backend
    y = ops.lora_linear(*_args(t), 0.5)
    want = reference.lora_fwd(t["x"].reshape(-1, K), t["weight"], t["bias"], t["lora_A"],
                              t["lora_B"], 0.5).reshape(*shape, N)
    assert y.shape == (*shape, N) and y.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.float(), want.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape,dtype,grad,conv1d", [
    ((2, 5), FP32, ("x", "lora_A", "lora_B"), False),                  # the LoRA training case
    ((9,), FP32, ("x", "weight", "bias", "lora_A", "lora_B"), True),   # trainable base, Conv1D
    ((3, 3), FP32, ("lora_A", "lora_B"), False),                       # no dX (first layer)
    ((2, 5), FP16, ("x", "lora_A", "lora_B"), True),
])
def test_gradients_match_autograd(device, backend, shape, dtype, grad, conv1d):
    K, N, r, s = 37, 19, 4, 1.25
    t = _inputs(shape, K, N, r, dtype, device, conv1d=conv1d, grad=grad)
    leaves = {k: t["param"] if (k == "weight" and conv1d) else t[k] for k in grad}
    dy = torch.randn(*shape, N, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    y = ops.lora_linear(*_args(t), s)  # through the autograd of fastpeft::lora_linear: something requires grad
    y.backward(dy)
    got = {k: v.grad for k, v in leaves.items()}
    for v in leaves.values():
        v.grad = None
    want = _plain(t, s)
    want.backward(dy.float())
    torch.testing.assert_close(y.float(), want.detach(), atol=TOL[dtype][0], rtol=TOL[dtype][1])
    for name, leaf in leaves.items():
        assert got[name].dtype == dtype and got[name].shape == leaf.shape
        atol, rtol = (2 * v for v in TOL[dtype])
        # Grads are sums over M or N terms: scale the absolute tolerance with the sum's length.
        atol *= math.sqrt(max(N, math.prod(shape)))
        torch.testing.assert_close(got[name].float(), leaf.grad.float(), atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


def test_dropout_path_trains_lora_and_keeps_base_undropped(device):
    K, N, r, s, p = 37, 19, 4, 2.0, 0.5
    t = _inputs((4, 6), K, N, r, FP32, device, grad=("x", "lora_A", "lora_B"))
    base = F.linear(t["x"], t["weight"], t["bias"])

    torch.manual_seed(123)
    y = ops.lora_linear(*_args(t), s, dropout=p)
    torch.manual_seed(123)  # same mask: the unfused PEFT expression, dropout on the LoRA branch
    want = base + s * F.linear(F.linear(F.dropout(t["x"], p), t["lora_A"]), t["lora_B"])
    torch.testing.assert_close(y, want)
    assert not torch.allclose(y, ops.lora_linear(*_args(t), s)), "dropout had no effect"

    y.sum().backward()
    assert t["lora_A"].grad.abs().sum() > 0 and t["lora_B"].grad.abs().sum() > 0
    assert t["x"].grad is not None

    # p = 1 drops the whole LoRA branch: what remains is exactly the (undropped) base path.
    torch.testing.assert_close(ops.lora_linear(*_args(t), s, dropout=1.0), base, rtol=0, atol=0)


def _bad_inputs():
    def base(**kw):
        t = dict(x=torch.randn(2, 3, 8), weight=torch.randn(5, 8), bias=torch.randn(5),
                 lora_A=torch.randn(4, 8), lora_B=torch.randn(5, 4))
        t.update(kw)
        return t

    return [
        pytest.param(base(x=torch.randn(2, 3, 9)), "weight must be \\[N, K\\] with K",
                     id="wrong-K"),
        pytest.param(base(lora_A=torch.randn(4, 7)), "lora_A must be \\[r, K\\]", id="A-wrong-K"),
        pytest.param(base(lora_B=torch.randn(5, 3)), "lora_B must be \\[N, r\\] = \\[5, 4\\]",
                     id="r-mismatch"),
        pytest.param(base(lora_B=torch.randn(6, 4)), "lora_B must be", id="B-wrong-N"),
        pytest.param(base(lora_A=torch.randn(0, 8), lora_B=torch.randn(5, 0)), "r = .* >= 1",
                     id="r-zero"),
        pytest.param(base(bias=torch.randn(4)), "bias must be \\[N\\] = \\[5\\]", id="bias-N"),
        pytest.param(base(weight=torch.randn(5, 8, 1)), "weight must have 2 dims", id="weight-3d"),
        pytest.param(base(lora_A=torch.randn(4, 8).half()), "lora_A dtype torch.float16 differs "
                     "from x dtype torch.float32", id="dtype-mismatch"),
        pytest.param(base(bias=torch.randn(5).double()), "bias dtype", id="bias-dtype"),
        pytest.param(base(x=torch.randn(2, 3, 8).double(), weight=torch.randn(5, 8).double()),
                     "lora_A dtype torch.float32 differs from x dtype torch.float64",
                     id="fp64-mixed"),  # fp64 itself runs on the torch backend (tests/test_float64.py)
        pytest.param(base(x=torch.randn(2, 3, 8).to("meta")), "is on cpu but x is on meta",
                     id="device-mismatch"),
    ]


@pytest.mark.parametrize("t,match", _bad_inputs())
def test_validation_errors(t, match):
    with pytest.raises(ValueError, match=match):
        ops.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0)


def test_backend_resolution(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    assert ops.resolve_backend(x) == "torch"                 # auto on a CPU tensor
    assert ops.resolve_backend(x, "TRITON") == "triton"
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")         # read at call time
    assert ops.resolve_backend(x) == "triton"
    assert ops.resolve_backend(x, "torch") == "torch"        # the argument wins
    with pytest.raises(ValueError, match="backend='cuda' is not one of auto\\|triton\\|torch"):
        ops.lora_linear(x, torch.randn(5, 8), None, torch.randn(2, 8), torch.randn(5, 2), 1.0,
                        backend="cuda")
    monkeypatch.setenv("FASTPEFT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND='bogus'"):
        ops.resolve_backend(x)


def test_works_without_triton():
    """`import fastpeft` and the torch backend must not need triton (imported lazily)."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, fastpeft, fastpeft.ops as ops\n"
            "x = torch.randn(3, 8)\n"
            "w, A, B = torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)\n"
            "y = ops.lora_linear(x, w, None, A, B, 1.0)\n"
            "assert y.shape == (3, 5) and ops.resolve_backend(x) == 'torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_auto_backend_on_cuda(dtype, monkeypatch):
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    t = _inputs((4, 50), 512, 384, 16, dtype, "cuda", conv1d=True, grad=("x", "lora_A", "lora_B"))
    assert ops.resolve_backend(t["x"]) == "triton"
    y = ops.lora_linear(*_args(t), 2.0)
    want = _plain(t, 2.0)
    torch.testing.assert_close(y.float(), want, atol=TOL[dtype][0] * 4, rtol=TOL[dtype][1] * 4)
    y.float().square().sum().backward()
    assert all(t[k].grad is not None for k in ("x", "lora_A", "lora_B"))
