"""kernels/nf4.py launchers against kernels/reference.py (under the interpreter on a CPU), and
ops.nf4_linear's gradients against autograd of the reference."""
import math

import pytest
import torch

from fastpeft import ops
from fastpeft.kernels import nf4, reference
from fastpeft.quant.nf4 import NF4Weight

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Kernel and reference decode the same weight (bit-identical in the operand dtype) and accumulate
# in fp32; they differ by summation order and the rounding of the [M, r] LoRA tile (see
# tests/kernels/test_lora.py). bf16 runs upcast under the interpreter, so its weight is not
# rounded to bf16 there: a few bf16 ulps.
TOL = {FP32: (2e-5, 2e-5), FP16: (3e-3, 3e-3), BF16: (5e-2, 3e-2)}


def _state(N, K, blocksize, nested, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    q = ops.nf4_quantize(w, blocksize, double_quant=nested)
    q = {k: (v.to(device) if v is not None else None) for k, v in q.items()}
    return NF4Weight(q["packed"], q["absmax"], q["quant_map"], q["nested_absmax"], q["nested_quant_map"],
                     q["offset"], (N, K), blocksize)


def _args(qw):
    nested = None if qw.nested_absmax is None else (qw.nested_quant_map, qw.nested_absmax, qw.offset)
    return qw.packed, qw.absmax, qw.shape, qw.blocksize, nested


@pytest.mark.parametrize("N,K,blocksize,nested,dtype", [
    (37, 70, 64, True, FP32), (19, 45, 32, False, FP16), (70, 37, 128, True, FP16), (5, 301, 256, True, FP32),
])
def test_dequantize(device, N, K, blocksize, nested, dtype):
    qw = _state(N, K, blocksize, nested, device)
    packed, absmax, shape, bs, nest = _args(qw)
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    got = nf4.nf4_dequantize(packed, absmax, shape, bs, dtype, qw.quant_map, nest, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, reference.nf4_dequantize(packed, absmax, shape, bs, dtype, nest))


@pytest.mark.gpu
def test_dequantize_bf16(device):
    qw = _state(37, 70, 64, True, device)
    packed, absmax, shape, bs, nest = _args(qw)
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


def _close(got, want):
    atol, rtol = TOL[want.dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) elements left in the output"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("M,N,K,blocksize,nested,r,dtype,has_bias,layout", CASES)
def test_linear_fwd_and_dx(device, M, N, K, blocksize, nested, r, dtype, has_bias, layout):
    qw = _state(N, K, blocksize, nested, device, seed=M)
    packed, absmax, shape, bs, nest = _args(qw)
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
    qw = _state(N, K, 64, True, device)
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
    qw = _state(37, 70, 64, True, device)
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
