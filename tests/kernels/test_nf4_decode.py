"""The NF4 decode path (M <= 16, split-K GEMV in kernels/nf4_decode.py) against kernels/reference.py,
under the interpreter on a CPU, and the M-based dispatch between it and the tiled kernel.

The interpreter config splits K into 3 runs of 32-wide tiles, so the odd K here give full,
partial and empty splits; N spans several 32-wide column blocks with a ragged tail.
"""
import functools
import os
import sys

import pytest
import torch

from fastpeft.kernels import nf4, nf4_decode, reference

sys.path.insert(0, os.path.dirname(__file__))
from kernel_checks import BF16, FP16, FP32, NF4_TOL as TOL, close, dora_col_scale, masked_rank_scale  # noqa: E402
from kernel_checks import nf4_state, rand  # noqa: E402

_close = functools.partial(close, tol=TOL)


def _operands(N, K, r, dtype, device, *, e, f, seed):
    g = torch.Generator().manual_seed(seed)
    if r == 0:
        return None, None, None, None
    lora_A = rand(g, r, K, dtype=dtype, device=device, scale=K ** -0.5)
    lora_B = rand(g, N, r, dtype=dtype, device=device, scale=r ** -0.5)
    rank_scale = masked_rank_scale(g, r, dtype, device) if e else None  # AdaLoRA's E
    col_scale = dora_col_scale(g, N, dtype, device) if f else None  # DoRA's m / ||W + s B A||
    return lora_A, lora_B, rank_scale, col_scale


# (M, N, K, blocksize, nested, r, rank scale, col scale, dtype, bias, x layout): M = 1, 5, 16;
# N and K not multiples of the 32-wide tiles nor of the NF4 blocksize (blocks straddle rows).
CASES = [
    (1, 37, 70, 64, True, 4, False, False, FP32, True, "contig"),
    (1, 45, 19, 32, False, 0, False, False, FP16, False, "step"),     # K < BLOCK_K: two empty splits
    (5, 70, 101, 128, True, 8, True, False, FP16, True, "t"),
    (5, 33, 70, 64, False, 16, False, True, FP32, True, "step"),
    (16, 19, 45, 32, True, 0, False, False, FP32, True, "contig"),
    (16, 37, 70, 64, False, 5, True, True, FP16, False, "contig"),
    (1, 33, 70, 64, True, 4, True, True, BF16, True, "contig"),       # bf16 via the UPCAST flag
    (16, 70, 37, 256, True, 0, False, False, BF16, False, "t"),
]


@pytest.mark.parametrize("M,N,K,blocksize,nested,r,e,f,dtype,has_bias,layout", CASES)
def test_decode_fwd_and_dx_match_reference(device, M, N, K, blocksize, nested, r, e, f, dtype, has_bias, layout):
    packed, absmax, shape, bs, nest, code4 = nf4_state(N, K, blocksize, nested, device, seed=M)
    g = torch.Generator().manual_seed(100 + M)
    x = rand(g, M, K, dtype=dtype, device=device, layout=layout)
    bias = rand(g, N, dtype=dtype, device=device) if has_bias else None
    lora_A, lora_B, rank_scale, col_scale = _operands(N, K, r, dtype, device, e=e, f=f, seed=r)
    assert nf4.path_for(M) == "decode"

    buf = torch.full((M, N + 3), float("nan"), dtype=dtype, device=device)  # out: a strided view
    got = nf4.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, lora_A, lora_B, 0.75, code4,
                             out=buf[:, 1:N + 1], rank_scale=rank_scale, col_scale=col_scale)
    assert got.data_ptr() == buf[:, 1:].data_ptr()
    assert torch.isnan(buf[:, 0]).all() and torch.isnan(buf[:, N + 1:]).all()  # nothing outside out
    if lora_A is None:
        want = reference.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, None, None, 0.75)
    else:
        weight = reference.nf4_dequantize(packed, absmax, shape, bs, dtype, nest)
        want = reference.lora_fwd(x, weight, bias, lora_A, lora_B, 0.75, rank_scale=rank_scale,
                                  col_scale=col_scale)
    _close(got, want)

    dy = rand(g, M, N, dtype=dtype, device=device, layout=layout)
    dx = torch.full((M, K), float("nan"), dtype=dtype, device=device)
    got = nf4.nf4_linear_bwd_dx(dy, packed, absmax, shape, bs, nest, lora_A, lora_B, 0.75, code4,
                                out=dx, rank_scale=rank_scale)
    assert got.data_ptr() == dx.data_ptr()
    if lora_A is None:
        want = reference.nf4_linear_bwd_dx(dy, packed, absmax, shape, bs, nest, None, None, 0.75)
    else:
        weight = reference.nf4_dequantize(packed, absmax, shape, bs, dtype, nest)
        want = reference.lora_bwd_dx(dy, weight, lora_A, lora_B, 0.75, rank_scale=rank_scale)
    _close(got, want)


def test_decode_is_deterministic(device):
    """The two-pass reduction sums the splits in a fixed order: bit-identical repeats."""
    packed, absmax, shape, bs, nest, code4 = nf4_state(37, 101, 64, True, device)
    lora_A, lora_B, _, _ = _operands(37, 101, 4, FP32, device, e=False, f=False, seed=4)
    x = torch.randn(3, 101, device=device)
    first = nf4.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, None, lora_A, lora_B, 2.0, code4)
    again = nf4.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, None, lora_A, lora_B, 2.0, code4)
    assert torch.equal(first, again)


@pytest.mark.parametrize("M,path", [(1, "decode"), (16, "decode"), (17, "tiled"), (40, "tiled")])
def test_dispatch_by_m(device, monkeypatch, M, path):
    """M <= 16 goes through the split-K launcher (forward and dX); M = 17 and up do not."""
    calls = []
    real = nf4_decode.launch_split_k

    def spy(inp, *args, **kwargs):
        calls.append(inp.shape[0])
        return real(inp, *args, **kwargs)

    monkeypatch.setattr(nf4_decode, "launch_split_k", spy)
    assert nf4.path_for(M) == path
    N, K = 19, 45
    packed, absmax, shape, bs, nest, code4 = nf4_state(N, K, 64, True, device)
    x = torch.randn(M, K, device=device)
    y = nf4.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, None, None, None, 1.0, code4)
    nf4.nf4_linear_bwd_dx(torch.randn(M, N, device=device), packed, absmax, shape, bs, nest, None, None, 1.0, code4)
    assert calls == ([M, M] if path == "decode" else [])
    _close(y, reference.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, None, None, None, 1.0))


def test_split_k_launcher_refuses_m_outside_decode(device):
    packed, absmax, shape, bs, nest, code4 = nf4_state(19, 45, 64, True, device)
    state, is_nested = nf4._state_args(packed, absmax, shape, bs, nest, code4)
    x = torch.randn(17, 45, device=device)
    with pytest.raises(ValueError, match=r"M must be in \[1, 16\], got 17"):
        nf4_decode.launch_split_k(x, state, is_nested, bs, 1, 45, 19, None, None, None, 1.0,
                                  torch.empty(17, 19, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16])
def test_decode_bf16_compiled(device, M):
    """bf16 on the GPU (compiled, no UPCAST): bf16 tensor-core operands, weight rounded as bnb's."""
    N, K = 257, 1000
    packed, absmax, shape, bs, nest, code4 = nf4_state(N, K, 64, True, device, seed=M)
    g = torch.Generator().manual_seed(7)
    x = rand(g, M, K, dtype=BF16, device=device)
    bias = rand(g, N, dtype=BF16, device=device)
    lora_A, lora_B, rank_scale, col_scale = _operands(N, K, 16, BF16, device, e=True, f=True, seed=16)
    out = torch.full((M, N), float("nan"), dtype=BF16, device=device)
    got = nf4.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, lora_A, lora_B, 0.75, code4, out=out,
                             rank_scale=rank_scale, col_scale=col_scale)
    weight = reference.nf4_dequantize(packed, absmax, shape, bs, BF16, nest)
    _close(got, reference.lora_fwd(x, weight, bias, lora_A, lora_B, 0.75, rank_scale=rank_scale, col_scale=col_scale))
