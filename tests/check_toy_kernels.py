"""Toy kernels and scenarios for tests/test_check_kernels.py (not collected: no test_ prefix).

Each pair is one class of bug that the interpreter lets through and a card does not:
  `_branch_kernel`   a constexpr branch whose arms yield different dtypes (fp32 vs the input's
                     bf16), the multi-LoRA-over-NF4 bug of issue 16: the interpreter runs only
                     the taken arm and is happy; Triton's compiler rejects the mismatch;
  `_bytes_kernel`    an "NF4" kernel reading its packed uint8 weight one byte per load (stride 2)
                     against contiguous 1,024-byte tiles (8 bytes per thread per load).
`good(level)` / `bad(level)` are scenario lists for `fastpeft check-kernels --scenarios FILE:good`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.check.scenarios import Scenario


@triton.jit
def _widen(v, UPCAST: tl.constexpr):
    """fp32 in one arm, the input dtype in the other: Triton merges both returns' types."""
    if UPCAST:
        return v.to(tl.float32)
    return v


@triton.jit
def _branch_kernel(x_ptr, y_ptr, n, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = _widen(tl.load(x_ptr + offs, mask=mask, other=0.0), UPCAST)
    tl.store(y_ptr + offs, (w * 2.0).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bytes_kernel(packed_ptr, y_ptr, n_bytes, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs * STRIDE < n_bytes
    b = tl.load(packed_ptr + offs * STRIDE, mask=mask, other=0).to(tl.int32)
    lo, hi = (b & 15).to(tl.float32), (b >> 4).to(tl.float32)
    tl.store(y_ptr + offs, (lo + hi).to(y_ptr.dtype.element_ty), mask=mask)


def branch(x: torch.Tensor, upcast: bool) -> torch.Tensor:
    """y = 2 x through `_branch_kernel` (x: [n] bf16); upcast=True is the bad arm."""
    y = torch.empty_like(x)
    _branch_kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), UPCAST=upcast, BLOCK=256)
    return y


def nibble_sums(packed: torch.Tensor, stride: int) -> torch.Tensor:
    """lo + hi nibble of every `stride`-th byte of `packed` ([n] uint8) -> [n // stride] bf16."""
    y = torch.empty(packed.numel() // stride, dtype=torch.bfloat16)
    _bytes_kernel[(triton.cdiv(y.numel(), 1024),)](packed, y, packed.numel(), STRIDE=stride, BLOCK=1024)
    return y


def _scenarios(upcast: bool, stride: int):
    x = torch.empty(4096, dtype=torch.bfloat16)
    packed = torch.empty(1 << 20, dtype=torch.uint8)
    return [Scenario(f"toy branch upcast={upcast}", lambda: branch(x, upcast), "toy", 2048, 64, 64),
            Scenario(f"toy nf4 bytes stride={stride}", lambda: nibble_sums(packed, stride), "toy", 2048, 64, 64,
                     nf4=True)]


def good(level="quick"):
    return _scenarios(False, 1)


def bad(level="quick"):
    return _scenarios(True, 2)
