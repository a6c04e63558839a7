"""The fused LoRA kernel's variant switches against kernels/reference.py, and their gradients.

HAS_RANK_SCALE scales the [M, r] register tile by AdaLoRA's E before the up-projection;
HAS_COL_SCALE scales the pre-bias accumulator by DoRA's ``m / ||W + s B A||``. Both run under the
interpreter on a CPU; the gradient tests go through `fastpeft.ops.lora_linear` on both backends
and compare with torch autograd through the reference.
"""
import functools
import math
import os
import sys

import pytest
import torch

from fastpeft import ops
from fastpeft.kernels import lora, reference

sys.path.insert(0, os.path.dirname(__file__))
from kernel_checks import BF16, FP16, FP32, LORA_TOL as TOL, close, dora_col_scale, masked_rank_scale, rand  # noqa: E402

# LORA_TOL: O(1) outputs, a few ulps of the dtype. The scales are O(1) (e in [-2, 2] with some
# exact zeros, f in [0.5, 1.5]), so they keep the outputs O(1).
_close = functools.partial(close, tol=TOL)


def _case(M, K, N, r, dtype, device, *, bias, e, f, x_layout="contig", w_layout="contig", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": rand(g, M, K, dtype=dtype, device=device, layout=x_layout),
        "weight": rand(g, N, K, dtype=dtype, device=device, scale=K ** -0.5, layout=w_layout),
        "bias": rand(g, N, dtype=dtype, device=device) if bias else None,
        "lora_A": rand(g, r, K, dtype=dtype, device=device, scale=K ** -0.5),
        "lora_B": rand(g, N, r, dtype=dtype, device=device, scale=r ** -0.5),
        "rank_scale": None,
        "col_scale": None,
    }
    if e:
        t["rank_scale"] = masked_rank_scale(g, r, dtype, device)
    if f:
        t["col_scale"] = dora_col_scale(g, N, dtype, device)
    return t


# (M, K, N, r, dtype, bias, rank scale, column scale, x layout, weight layout): odd sizes spanning
# several 32-wide interpreter blocks, each switch alone and together, every dtype.
CASES = [
    (33, 70, 37, 6, FP32, True, True, False, "step", "contig"),
    (7, 37, 70, 12, FP16, False, True, False, "contig", "t"),
    (33, 70, 37, 4, FP32, True, False, True, "contig", "t"),      # DoRA on a Conv1D view
    (1, 19, 70, 8, FP16, True, False, True, "step", "contig"),    # decode
    (33, 37, 19, 5, FP32, True, True, True, "step", "t"),
    (7, 70, 37, 3, BF16, True, True, True, "contig", "contig"),   # bf16: UPCAST in the interpreter
    (33, 19, 70, 17, FP16, False, True, True, "contig", "t"),     # r = 17 pads to 32
]


@pytest.mark.parametrize("M,K,N,r,dtype,bias,e,f,x_layout,w_layout", CASES)
def test_lora_fwd_variants(device, M, K, N, r, dtype, bias, e, f, x_layout, w_layout):
    t = _case(M, K, N, r, dtype, device, bias=bias, e=e, f=f, x_layout=x_layout, w_layout=w_layout)
    buf = torch.full((M, N + 1), float("nan"), dtype=dtype, device=device)
    got = lora.lora_fwd(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.75, out=buf[:, :N],
                        rank_scale=t["rank_scale"], col_scale=t["col_scale"])
    assert got.data_ptr() == buf.data_ptr()
    assert torch.isnan(buf[:, N]).all(), "kernel wrote past the last column"
    want = reference.lora_fwd(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.75,
                              rank_scale=t["rank_scale"], col_scale=t["col_scale"])
    _close(got, want)


@pytest.mark.parametrize("M,K,N,r,dtype,_b,_e,_f,dy_layout,w_layout", [c for c in CASES if c[6]])
def test_lora_bwd_dx_rank_scale(device, M, K, N, r, dtype, _b, _e, _f, dy_layout, w_layout):
    t = _case(M, K, N, r, dtype, device, bias=False, e=True, f=False, w_layout=w_layout)
    dy = rand(torch.Generator().manual_seed(9), M, N, dtype=dtype, device=device, layout=dy_layout)
    out = torch.full((M, K), float("nan"), dtype=dtype, device=device)
    got = lora.lora_bwd_dx(dy, t["weight"], t["lora_A"], t["lora_B"], -1.5, out=out, rank_scale=t["rank_scale"])
    assert got is out
    _close(got, reference.lora_bwd_dx(dy, t["weight"], t["lora_A"], t["lora_B"], -1.5, rank_scale=t["rank_scale"]))


def test_masked_ranks_contribute_nothing(device):
    """A zero in E is the same layer as the rank removed (what AdaLoRA's shrunk checkpoint holds)."""
    t = _case(33, 70, 37, 9, FP32, device, bias=True, e=True, f=False)
    keep = t["rank_scale"] != 0
    assert 0 < int(keep.sum()) < 9
    full = lora.lora_fwd(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 2.0, rank_scale=t["rank_scale"])
    kept = lora.lora_fwd(t["x"], t["weight"], t["bias"], t["lora_A"][keep], t["lora_B"][:, keep].contiguous(), 2.0,
                         rank_scale=t["rank_scale"][keep].contiguous())
    _close(full, kept)


def test_unit_scales_equal_plain_lora(device):
    t = _case(7, 37, 19, 4, FP16, device, bias=True, e=False, f=False)
    ones_r = torch.ones(4, dtype=FP16, device=device)
    ones_n = torch.ones(19, dtype=FP16, device=device)
    plain = lora.lora_fwd(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.5)
    scaled = lora.lora_fwd(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.5,
                           rank_scale=ones_r, col_scale=ones_n)
    torch.testing.assert_close(scaled, plain, rtol=0, atol=0)


def test_launcher_and_op_reject_bad_scales(device):
    t = _case(3, 37, 19, 4, FP32, device, bias=False, e=True, f=True)
    args = (t["x"], t["weight"], None, t["lora_A"], t["lora_B"], 1.0)
    with pytest.raises(ValueError, match="rank_scale"):
        lora.lora_fwd(*args, rank_scale=t["rank_scale"][:3])
    with pytest.raises(ValueError, match="col_scale"):
        lora.lora_fwd(*args, col_scale=t["col_scale"].half())
    with pytest.raises(ValueError, match="rank_scale must be \\[r\\]"):
        ops.lora_linear(*args, rank_scale=t["rank_scale"][:3])
    with pytest.raises(ValueError, match="col_scale dtype"):
        ops.lora_linear(*args, col_scale=t["col_scale"].half())
    with pytest.raises(ValueError, match="col_scale must be \\[N\\]"):
        ops.lora_linear(*args, col_scale=t["col_scale"][:5])


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("dtype,bias,e,f,grad", [
    (FP32, True, True, False, ("x", "lora_A", "lora_B", "rank_scale")),           # AdaLoRA training
    (FP32, True, False, True, ("x", "lora_A", "lora_B", "col_scale")),            # DoRA training
    (FP32, False, False, True, ("x", "lora_A", "lora_B")),                        # magnitude frozen
    (FP32, True, True, True, ("x", "weight", "bias", "lora_A", "lora_B", "rank_scale", "col_scale")),
    (FP16, True, True, True, ("x", "lora_A", "lora_B", "rank_scale", "col_scale")),
])
def test_gradients_match_autograd_of_reference(device, backend, dtype, bias, e, f, grad):
    M, K, N, r, s = 9, 37, 19, 5, 1.25
    t = _case(M, K, N, r, dtype, device, bias=bias, e=e, f=f, w_layout="t", seed=3)
    leaves = {}
    for name in grad:  # fresh leaves (contiguous copies of the views) that require grad
        leaves[name] = t[name] = t[name].detach().clone().requires_grad_(True)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    y = ops.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], s,
                        rank_scale=t["rank_scale"], col_scale=t["col_scale"])
    y.backward(dy)
    got = {k: v.grad for k, v in leaves.items()}

    f32 = {k: (None if v is None else v.detach().float().requires_grad_(k in grad)) for k, v in t.items()}
    want = reference.lora_fwd(f32["x"], f32["weight"], f32["bias"], f32["lora_A"], f32["lora_B"], s,
                              rank_scale=f32["rank_scale"], col_scale=f32["col_scale"])
    want.backward(dy.float())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.float(), want.detach(), atol=atol, rtol=rtol)
    for name in grad:
        assert got[name].dtype == dtype and got[name].shape == leaves[name].shape
        # Grads are sums over M or N terms: scale the absolute tolerance with the sum's length.
        tol = 2 * atol * math.sqrt(max(M, N))
        torch.testing.assert_close(got[name].float(), f32[name].grad, atol=tol, rtol=2 * rtol,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("M", [1, 300])
def test_lora_variants_gpu_sizes(M, dtype):
    """Autotuned configs and tensor-core dots with both scales on (bf16 included)."""
    t = _case(M, 1000, 520, 16, dtype, "cuda", bias=True, e=True, f=True, w_layout="t")
    args = (t["weight"], t["bias"], t["lora_A"], t["lora_B"], 2.0)
    _close(lora.lora_fwd(t["x"], *args, rank_scale=t["rank_scale"], col_scale=t["col_scale"]),
           reference.lora_fwd(t["x"], *args, rank_scale=t["rank_scale"], col_scale=t["col_scale"]))
    dy = rand(torch.Generator().manual_seed(2), M, 520, dtype=dtype, device="cuda")
    _close(lora.lora_bwd_dx(dy, t["weight"], t["lora_A"], t["lora_B"], 2.0, rank_scale=t["rank_scale"]),
           reference.lora_bwd_dx(dy, t["weight"], t["lora_A"], t["lora_B"], 2.0, rank_scale=t["rank_scale"]))


# -- IA3: HAS_IN_SCALE (input columns scaled in the K-loop) and HAS_LORA off ------------------------
IA3_CASES = [
    # M, K, N, dtype, bias, g, f, x_layout, w_layout
    (37, 45, 51, FP32, True, True, False, "contig", "contig"),
    (37, 45, 51, FP16, False, True, False, "step", "t"),
    (5, 70, 33, FP32, True, False, True, "t", "contig"),
    (19, 33, 41, FP16, True, True, True, "contig", "step"),
    (9, 21, 35, BF16, True, True, True, "contig", "contig"),  # interpreter: UPCAST path
]


@pytest.mark.parametrize("M,K,N,dtype,bias,g,f,x_layout,w_layout", IA3_CASES)
def test_scaled_linear_fwd_matches_reference(device, M, K, N, dtype, bias, g, f, x_layout, w_layout):
    t = _case(M, K, N, 1, dtype, device, bias=bias, e=False, f=f, x_layout=x_layout, w_layout=w_layout)
    gen = torch.Generator().manual_seed(3)
    in_scale = (torch.rand(2 * K, generator=gen) + 0.5).to(device=device, dtype=dtype)[::2] if g else None
    out = torch.full((N, M), float("nan"), dtype=dtype, device=device).t()  # poisoned, strided
    got = lora.scaled_linear_fwd(t["x"], t["weight"], t["bias"], out, in_scale=in_scale, col_scale=t["col_scale"])
    assert got is out
    want = reference.scaled_linear_fwd(t["x"], t["weight"], t["bias"], in_scale=in_scale, col_scale=t["col_scale"])
    _close(got, want)


def test_scaled_linear_without_scales_is_plain_linear(device):
    t = _case(23, 29, 31, 1, FP32, device, bias=True, e=False, f=False)
    got = lora.scaled_linear_fwd(t["x"], t["weight"], t["bias"])
    _close(got, torch.nn.functional.linear(t["x"], t["weight"], t["bias"]))


def test_scaled_linear_rejects_bad_scales(device):
    t = _case(4, 6, 5, 1, FP32, device, bias=False, e=False, f=False)
    with pytest.raises(ValueError, match="in_scale"):
        lora.scaled_linear_fwd(t["x"], t["weight"], None, in_scale=torch.ones(5, device=device))
    with pytest.raises(ValueError, match="scale must be \\[6\\]"):
        ops.ia3_linear(t["x"], t["weight"], None, torch.ones(5, device=device), feedforward=True)
    with pytest.raises(ValueError, match="scale"):
        ops.ia3_linear(t["x"], t["weight"], None, torch.ones(5, device=device, dtype=FP16), feedforward=False)


@pytest.mark.parametrize("dtype", [FP32, FP16])
@pytest.mark.parametrize("feedforward", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_ia3_gradients_match_autograd_of_reference(device, backend, dtype, feedforward, bias):
    M, K, N = 13, 19, 23
    t = _case(M, K, N, 1, dtype, device, bias=bias, e=False, f=False)
    gen = torch.Generator().manual_seed(7)
    scale = (torch.rand(K if feedforward else N, generator=gen) + 0.5).to(device=device, dtype=dtype)
    leaves = {"x": t["x"], "weight": t["weight"], "scale": scale, "bias": t["bias"]}
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items() if v is not None}
    mine = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    dy = torch.randn(M, N, generator=gen).to(device=device, dtype=dtype)

    y = ops.ia3_linear(mine["x"], mine["weight"], mine.get("bias"), mine["scale"], feedforward)
    y.backward(dy)
    xf = leaves["x"].float()
    if feedforward:
        want = torch.nn.functional.linear(xf * leaves["scale"].float(), leaves["weight"].float(),
                                          None if not bias else leaves["bias"].float())
    else:
        want = leaves["scale"].float() * torch.nn.functional.linear(
            xf, leaves["weight"].float(), None if not bias else leaves["bias"].float())
    want.backward(dy.float())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.float(), want.detach(), atol=atol, rtol=rtol)
    for k, leaf in leaves.items():  # grads summed over M rows: tolerance grows with sqrt(M)
        torch.testing.assert_close(mine[k].grad.float(), leaf.grad.float(), atol=atol * 8, rtol=rtol * 8)
