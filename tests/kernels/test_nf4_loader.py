"""The one NF4 tile loader (kernels/_common.py) on the shapes real layers have: rows a multiple of
the blocksize, so the ALIGNED path runs (wide byte loads, both nibbles of each byte, one scale per
block), against kernels/reference.py under the interpreter; the GEMV rows (M <= 4) of the decode
kernel; and the loader's contract (only bnb's NF4 table)."""
import functools
import math
import os
import sys

import pytest
import torch

from fastpeft.kernels import _common, multi_lora, nf4, nf4_decode, reference

sys.path.insert(0, os.path.dirname(__file__))
from kernel_checks import BF16, FP16, FP32, NF4_TOL as TOL, close, nf4_state  # noqa: E402

_close = functools.partial(close, tol=TOL)


def test_nf4_constants_are_bnb_table():
    assert [getattr(_common, f"_Q{i}").value for i in range(16)] == list(reference.NF4_CODE)


@pytest.mark.parametrize("N,K,blocksize,nested", [(37, 128, 64, True), (19, 96, 32, False),
                                                  (5, 512, 256, True), (33, 64, 64, False)])
@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_dequantize_aligned_bit_exact(device, N, K, blocksize, nested, dtype):
    packed, absmax, shape, bs, nest, code4 = nf4_state(N, K, blocksize, nested, device)
    assert _common.nf4_meta(bs, K)[0]["ALIGNED"]
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    got = nf4.nf4_dequantize(packed, absmax, shape, bs, dtype, code4, nest, out=out)
    assert torch.equal(got, reference.nf4_dequantize(packed, absmax, shape, bs, dtype, nest))


# (M, N, K, blocksize, nested, r, dtype): M = 1, 2, 3, 4 run the GEMV rows, 9 the 16-row decode
# tile, 40 the tiled kernel; K a multiple of the blocksize (ALIGNED), N ragged.
CASES = [
    (1, 37, 128, 64, True, 4, FP32),
    (2, 45, 96, 32, False, 0, FP16),
    (3, 33, 256, 64, True, 8, FP32),
    (4, 19, 128, 128, True, 16, BF16),
    (9, 37, 192, 64, False, 4, FP16),
    (40, 70, 128, 64, True, 8, FP32),
]


@pytest.mark.parametrize("M,N,K,blocksize,nested,r,dtype", CASES)
def test_aligned_fwd_and_dx_match_reference(device, M, N, K, blocksize, nested, r, dtype):
    packed, absmax, shape, bs, nest, code4 = nf4_state(N, K, blocksize, nested, device, seed=M)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    bias = torch.randn(N, generator=g).to(device, dtype)
    A = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(device, dtype) if r else None
    B = (torch.randn(N, r, generator=g) / math.sqrt(max(r, 1))).to(device, dtype) if r else None
    weight = reference.nf4_dequantize(packed, absmax, shape, bs, dtype, nest)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
    got = nf4.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, A, B, 0.5, code4, out=out)
    if A is None:
        want = reference.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, None, None, 0.5)
    else:
        want = reference.lora_fwd(x, weight, bias, A, B, 0.5)
    _close(got, want)

    dy = torch.randn(M, N, generator=g).to(device, dtype)
    dx = torch.full((M, K), float("nan"), dtype=dtype, device=device)
    got = nf4.nf4_linear_bwd_dx(dy, packed, absmax, shape, bs, nest, A, B, 0.5, code4, out=dx)
    if A is None:
        want = reference.nf4_linear_bwd_dx(dy, packed, absmax, shape, bs, nest, None, None, 0.5)
    else:
        want = reference.lora_bwd_dx(dy, weight, A, B, 0.5)
    _close(got, want)


@pytest.mark.parametrize("M,gemv,m_pad", [(1, True, 1), (3, True, 4), (4, True, 4), (5, False, 1), (16, False, 1)])
def test_decode_config_gemv_rows(M, gemv, m_pad):
    cfg = nf4_decode.decode_config(M, 4096, 4096, True)
    assert (cfg["GEMV"], cfg["M_PAD"]) == (gemv, m_pad)


def test_multi_gathered_over_aligned_nf4(device):
    """The multi-adapter kernels read an NF4 base through the same loader (ALIGNED here)."""
    N, K = 37, 128
    packed, absmax, shape, bs, nest, code4 = nf4_state(N, K, 64, True, device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, K, generator=g).to(device)
    lora_a = (torch.randn(12, K, generator=g) / math.sqrt(K)).to(device)
    lora_b = (torch.randn(12, N, generator=g) / 2).to(device)
    offsets = torch.tensor([0, 4], dtype=torch.int32, device=device)
    ranks = torch.tensor([4, 8], dtype=torch.int32, device=device)
    scalings = torch.tensor([0.5, 2.0], device=device)
    ids = torch.tensor([1, -1, 0, 1, 0], dtype=torch.int32, device=device)
    got = multi_lora.multi_lora_gathered_fwd(x, None, None, lora_a, lora_b, offsets, ranks, scalings, 8, ids,
                                             nf4=(packed, absmax, shape, bs, nest, code4))
    weight = reference.nf4_dequantize(packed, absmax, shape, bs, FP32, nest)
    want = reference.multi_lora_gathered_fwd(x, weight, None, lora_a, lora_b, offsets, ranks, scalings, 8, ids)
    _close(got, want)


def test_refuses_another_code_table(device):
    packed, absmax, shape, bs, nest, code4 = nf4_state(19, 64, 64, False, device)
    with pytest.raises(ValueError, match="NF4 table"):
        nf4.nf4_dequantize(packed, absmax, shape, bs, FP32, code4.cpu() * 2, nest)
