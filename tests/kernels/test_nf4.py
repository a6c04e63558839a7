"""kernels/nf4.py launchers against kernels/reference.py (under the interpreter on a CPU), and
ops.nf4_linear's gradients against autograd of the reference."""
import functools
import math
import os
import sys

import pytest
import torch

from fastpeft import ops
from fastpeft.kernels import nf4, reference

sys.path.insert(0, os.path.dirname(__file__))
from kernel_checks import BF16, FP16, FP32, NF4_TOL as TOL, close, launch_args, nf4_weight  # noqa: E402

_close = functools.partial(close, tol=TOL)


@pytest.mark.parametrize("N,K,blocksize,nested,dtype", [
    (37, 70, 64, True, FP32), (19, 45, 32, False, FP16), (70, 37, 128, True, FP16), (5, 301, 256, True, FP32),
])
def test_dequantize(device, N, K, blocksize, nested, dtype):
    qw = nf4_weight(N, K, blocksize, nested, device)
    packed, absmax, shape, bs, nest = launch_args(qw)
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    got = nf4.nf4_dequantize(packed, absmax, shape, bs, dtype, qw.quant_map, nest, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, reference.nf4_dequantize(packed, absmax, shape, bs, dtype, nest))


@pytest.mark.gpu
def test_dequantize_bf16(device):
    qw = nf4_weight(37, 70, 64, True, device)
    packed, absmax, shape, bs, nest = launch_args(qw)
    got = nf4.nf4_dequantize(packed, absmax, shape, bs, BF16, qw.quant_map, nest)
    assert torch.equal(got, reference.nf4_dequantize(packed, absmax, shape, bs, BF16, nest))


# (M, N, K, blocksize, nested, r, dtype, bias, x layout): M = 1 and M > 16 (decode / GEMM tiles),
# odd N and K (not multiples of the NF4 blocksize or of the 32-wide interpreter tiles), NF4
# blocks straddling rows, with and without the LoRA epilogue, strided activations.
CASES = [
    (1, 37, 70, 64, True, 4, FP32, True, "contig"),
    (33, 70, 37, 32, True, 0, FP16, False, "step"),
    (1, 45, 19, 64, False, 0, FP32, True, "step"),
    (20, 19, 45, 128, True, 16, FP16, True, "contig"),
    (33, 37, 70, 64, False, 8, FP32, False, "t"),
    (7, 33, 70, 64, True, 4, BF16, True, "contig"),
]


def _x(M, K, dtype, device, layout, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "t":
        return torch.randn(K, M, generator=g).to(device=device, dtype=dtype).t()
    if layout == "step":
        return torch.randn(M, 2 * K + 1, generator=g).to(device=device, dtype=dtype)[:, 1::2]
    return torch.randn(M, K, generator=g).to(device=device, dtype=dtype)


def _lora(N, K, r, dtype, device):
    if r == 0:
        return None, None
    g = torch.Generator().manual_seed(r)
    return ((torch.randn(r, K, generator=g) / math.sqrt(K)).to(device=device, dtype=dtype),
            (torch.randn(N, r, generator=g) / math.sqrt(r)).to(device=device, dtype=dtype))


@pytest.mark.parametrize("M,N,K,blocksize,nested,r,dtype,has_bias,layout", CASES)
def test_linear_fwd_and_dx(device, M, N, K, blocksize, nested, r, dtype, has_bias, layout):
    qw = nf4_weight(N, K, blocksize, nested, device, seed=M)
    packed, absmax, shape, bs, nest = launch_args(qw)
    x = _x(M, K, dtype, device, layout, seed=1)
    lora_A, lora_B = _lora(N, K, r, dtype, device)
    bias = torch.randn(N).to(device=device, dtype=dtype) if has_bias else None
    buf = torch.full((M, N + 1), float("nan"), dtype=dtype, device=device)
    got = nf4.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, lora_A, lora_B, 0.75, qw.quant_map,
                             out=buf[:, :N])
    assert got.data_ptr() == buf.data_ptr() and torch.isnan(buf[:, N]).all()
    _close(got, reference.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, lora_A, lora_B, 0.75))

    dy = _x(M, N, dtype, device, layout, seed=2)
    dx = torch.full((M, K), float("nan"), dtype=dtype, device=device)
    got = nf4.nf4_linear_bwd_dx(dy, packed, absmax, shape, bs, nest, lora_A, lora_B, 0.75, qw.quant_map, out=dx)
    _close(got, reference.nf4_linear_bwd_dx(dy, packed, absmax, shape, bs, nest, lora_A, lora_B, 0.75))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("M,r", [(1, 4), (20, 8)])
def test_gradients_match_autograd_of_reference(device, backend, M, r):
    N, K = 37, 70
    qw = nf4_weight(N, K, 64, True, device)
    x = _x(M, K, FP32, device, "contig", seed=3).requires_grad_()
    lora_A, lora_B = (t.requires_grad_() for t in _lora(N, K, r, FP32, device))
    bias = torch.randn(N, device=device, requires_grad=True)
    y = ops.nf4_linear(x, qw, bias, lora_A, lora_B, 0.5, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, bias, lora_A, lora_B), dy)

    w = ops.nf4_dequantize(qw, FP32, backend="torch")  # a constant: the 4-bit base never trains
    leaves = [t.detach().clone().requires_grad_() for t in (x, bias, lora_A, lora_B)]
    xr, br, ar, bbr = leaves
    yr = xr @ w.t() + br + 0.5 * (xr @ ar.t()) @ bbr.t()
    want = torch.autograd.grad(yr, leaves, dy)
    torch.testing.assert_close(y, yr, atol=2e-5, rtol=2e-5)
    for g, gw in zip(grads, want):
        torch.testing.assert_close(g, gw, atol=2e-5, rtol=2e-5)


def test_bad_input_is_refused_before_launch(device):
    qw = nf4_weight(37, 70, 64, True, device)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 70\]"):
        ops.nf4_linear(torch.randn(3, 71), qw)
    with pytest.raises(ValueError, match="lora_A must be"):
        ops.nf4_linear(torch.randn(3, 70), qw, None, torch.randn(4, 71), torch.randn(37, 4))
    with pytest.raises(ValueError, match="together"):
        ops.nf4_linear(torch.randn(3, 70), qw, None, torch.randn(4, 70), None)
    with pytest.raises(ValueError, match="bias"):
        ops.nf4_linear(torch.randn(3, 70), qw, torch.randn(36))
    with pytest.raises(ValueError, match="absmax"):
        nf4.nf4_linear_fwd(torch.randn(3, 70), qw.packed, qw.absmax[:-1], (37, 70), 64,
                           (qw.nested_quant_map, qw.nested_absmax, qw.offset), None, None, None, 1.0, qw.quant_map)


# -- AdaLoRA's rank scale and DoRA's column scale in the NF4 kernels (kernels/_common.py epilogue) --
# (M, N, K, blocksize, nested, r, dtype, rank scale, column scale, x layout): odd sizes, each switch
# alone and together, the bare 4-bit layer with a column scale (r = 0), bf16 via the interpreter's
# UPCAST flag, strided activations. Scales are strided views, e with exact zeros (masked ranks).
SCALE_CASES = [
    (33, 37, 70, 64, True, 6, FP32, True, False, "step"),
    (7, 70, 37, 32, False, 5, FP16, False, True, "t"),
    (1, 45, 19, 64, True, 3, FP32, True, True, "contig"),
    (20, 19, 45, 128, True, 17, FP16, True, True, "step"),
    (9, 37, 70, 64, False, 0, FP32, False, True, "t"),
    (7, 33, 70, 64, True, 4, BF16, True, True, "contig"),
]


def _scales(N, r, dtype, device, e, f, seed=5):
    g = torch.Generator().manual_seed(seed)
    rank_scale = col_scale = None
    if e:
        vals = torch.rand(2 * r, generator=g) * 4 - 2
        vals[::3] = 0.0
        rank_scale = vals.to(device=device, dtype=dtype)[::2]
    if f:
        col_scale = (torch.rand(2 * N, generator=g) + 0.5).to(device=device, dtype=dtype)[1::2]
    return rank_scale, col_scale


@pytest.mark.parametrize("M,N,K,blocksize,nested,r,dtype,e,f,layout", SCALE_CASES)
def test_linear_fwd_and_dx_with_scales(device, M, N, K, blocksize, nested, r, dtype, e, f, layout):
    qw = nf4_weight(N, K, blocksize, nested, device, seed=M + 1)
    packed, absmax, shape, bs, nest = launch_args(qw)
    x = _x(M, K, dtype, device, layout, seed=4)
    lora_A, lora_B = _lora(N, K, r, dtype, device)
    bias = torch.randn(N).to(device=device, dtype=dtype)
    rank_scale, col_scale = _scales(N, r, dtype, device, e, f)
    buf = torch.full((M, N + 1), float("nan"), dtype=dtype, device=device)
    got = nf4.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, lora_A, lora_B, 0.75, qw.quant_map,
                             out=buf[:, :N], rank_scale=rank_scale, col_scale=col_scale)
    assert got.data_ptr() == buf.data_ptr() and torch.isnan(buf[:, N]).all()
    _close(got, reference.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, lora_A, lora_B, 0.75,
                                         rank_scale=rank_scale, col_scale=col_scale))

    dy = _x(M, N, dtype, device, layout, seed=6)
    dx = torch.full((M, K), float("nan"), dtype=dtype, device=device)
    got = nf4.nf4_linear_bwd_dx(dy, packed, absmax, shape, bs, nest, lora_A, lora_B, -1.5, qw.quant_map, out=dx,
                                rank_scale=rank_scale)
    assert got is dx
    _close(got, reference.nf4_linear_bwd_dx(dy, packed, absmax, shape, bs, nest, lora_A, lora_B, -1.5,
                                            rank_scale=rank_scale))


def test_reference_scales_match_the_dense_reference(device):
    """The NF4 reference with scales is the dense reference on the dequantized weight."""
    N, K, r = 37, 70, 5
    qw = nf4_weight(N, K, 64, True, device)
    packed, absmax, shape, bs, nest = launch_args(qw)
    x, dy = _x(9, K, FP32, device, "contig", seed=1), _x(9, N, FP32, device, "contig", seed=2)
    lora_A, lora_B = _lora(N, K, r, FP32, device)
    rank_scale, col_scale = _scales(N, r, FP32, device, True, True)
    w = reference.nf4_dequantize(packed, absmax, shape, bs, FP32, nest)
    assert torch.equal(
        reference.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, None, lora_A, lora_B, 2.0,
                                 rank_scale=rank_scale, col_scale=col_scale),
        reference.lora_fwd(x, w, None, lora_A, lora_B, 2.0, rank_scale=rank_scale, col_scale=col_scale))
    assert torch.equal(
        reference.nf4_linear_bwd_dx(dy, packed, absmax, shape, bs, nest, lora_A, lora_B, 2.0, rank_scale=rank_scale),
        reference.lora_bwd_dx(dy, w, lora_A, lora_B, 2.0, rank_scale=rank_scale))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,e,f,grad", [
    (FP32, True, False, ("x", "lora_A", "lora_B", "rank_scale", "bias")),   # AdaLoRA training
    (FP32, False, True, ("x", "lora_A", "lora_B", "col_scale")),            # DoRA training
    (FP32, True, True, ("lora_A", "lora_B", "rank_scale", "col_scale")),
    (FP16, True, True, ("x", "lora_A", "lora_B", "rank_scale", "col_scale", "bias")),
])
def test_scale_gradients_match_autograd_of_reference(device, backend, dtype, e, f, grad):
    M, N, K, r, s = 9, 37, 70, 5, 1.25
    qw = nf4_weight(N, K, 32, True, device, seed=7)
    t = {"x": _x(M, K, dtype, device, "step", seed=3), "bias": torch.randn(N).to(device=device, dtype=dtype)}
    t["lora_A"], t["lora_B"] = _lora(N, K, r, dtype, device)
    t["rank_scale"], t["col_scale"] = _scales(N, r, dtype, device, e, f)
    for name in grad:
        t[name] = t[name].detach().clone().requires_grad_(True)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    y = ops.nf4_linear(t["x"], qw, t["bias"], t["lora_A"], t["lora_B"], s, backend=backend,
                       rank_scale=t["rank_scale"], col_scale=t["col_scale"])
    y.backward(dy)

    # the oracle: autograd through the dense reference on the dequantized (constant) weight, fp32
    w = ops.nf4_dequantize(qw, dtype, backend="torch").float()
    f32 = {k: (None if v is None else v.detach().float().requires_grad_(k in grad)) for k, v in t.items()}
    want = reference.lora_fwd(f32["x"], w, f32["bias"], f32["lora_A"], f32["lora_B"], s,
                              rank_scale=f32["rank_scale"], col_scale=f32["col_scale"])
    want.backward(dy.float())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.float(), want.detach(), atol=atol, rtol=rtol)
    for name in grad:
        assert t[name].grad.dtype == dtype and t[name].grad.shape == t[name].shape
        tol = 2 * atol * math.sqrt(max(M, N))  # sums over M or N terms
        torch.testing.assert_close(t[name].grad.float(), f32[name].grad, atol=tol, rtol=2 * rtol,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("e,f", [(True, False), (False, True), (True, True)])
def test_dropout_path_is_the_dense_ops_on_the_dequantized_weight(device, e, f):
    """PEFT's dropout semantics (DoRA's correction on the dropped-out input included) are the
    same as ops.lora_linear's on the dequantized weight, given the same dropout mask."""
    N, K, r = 19, 45, 4
    qw = nf4_weight(N, K, 32, False, device)
    x = _x(6, K, FP32, device, "contig", seed=8)
    bias = torch.randn(N, device=device)
    lora_A, lora_B = _lora(N, K, r, FP32, device)
    rank_scale, col_scale = _scales(N, r, FP32, device, e, f)
    torch.manual_seed(0)
    got = ops.nf4_linear(x, qw, bias, lora_A, lora_B, 0.5, dropout=0.4, rank_scale=rank_scale, col_scale=col_scale)
    torch.manual_seed(0)
    want = ops.lora_linear(x, ops.nf4_dequantize(qw, FP32), bias, lora_A, lora_B, 0.5, dropout=0.4,
                           rank_scale=rank_scale, col_scale=col_scale)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    no_drop = ops.nf4_linear(x, qw, bias, lora_A, lora_B, 0.5, rank_scale=rank_scale, col_scale=col_scale)
    assert not torch.allclose(got, no_drop, atol=1e-3)


def test_bad_scales_are_refused_before_launch(device):
    qw = nf4_weight(37, 70, 64, True, device)
    x, (lora_A, lora_B) = torch.randn(3, 70, device=device), _lora(37, 70, 4, FP32, device)
    with pytest.raises(ValueError, match=r"rank_scale must be \[r\] = \[4\]"):
        ops.nf4_linear(x, qw, None, lora_A, lora_B, rank_scale=torch.ones(5, device=device))
    with pytest.raises(ValueError, match=r"col_scale must be \[N\] = \[37\]"):
        ops.nf4_linear(x, qw, None, lora_A, lora_B, col_scale=torch.ones(70, device=device))
    with pytest.raises(ValueError, match="col_scale .* must match x"):
        ops.nf4_linear(x, qw, None, lora_A, lora_B, col_scale=torch.ones(37, device=device).half())
    with pytest.raises(ValueError, match="rank_scale scales the LoRA ranks"):
        ops.nf4_linear(x, qw, rank_scale=torch.ones(4, device=device))
    with pytest.raises(TypeError, match="col_scale must be a torch.Tensor"):
        ops.nf4_linear(x, qw, None, lora_A, lora_B, col_scale=[1.0] * 37)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("M", [1, 300])
def test_scales_gpu_sizes(M, dtype):
    """Autotuned configs and tensor-core dots with both scales on (bf16 included)."""
    N, K, r = 520, 1000, 16
    qw = nf4_weight(N, K, 64, True, "cuda")
    packed, absmax, shape, bs, nest = launch_args(qw)
    x, dy = _x(M, K, dtype, "cuda", "contig", seed=1), _x(M, N, dtype, "cuda", "contig", seed=2)
    lora_A, lora_B = _lora(N, K, r, dtype, "cuda")
    bias = torch.randn(N).to(device="cuda", dtype=dtype)
    rank_scale, col_scale = _scales(N, r, dtype, "cuda", True, True)
    _close(nf4.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, lora_A, lora_B, 2.0, qw.quant_map,
                              rank_scale=rank_scale, col_scale=col_scale),
           reference.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, lora_A, lora_B, 2.0,
                                    rank_scale=rank_scale, col_scale=col_scale))
    _close(nf4.nf4_linear_bwd_dx(dy, packed, absmax, shape, bs, nest, lora_A, lora_B, 2.0, qw.quant_map,
                                 rank_scale=rank_scale),
           reference.nf4_linear_bwd_dx(dy, packed, absmax, shape, bs, nest, lora_A, lora_B, 2.0, rank_scale=rank_scale))
