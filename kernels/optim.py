"""Fused 8-bit blockwise AdamW step: one pass over a parameter, as bitsandbytes' fused kernels do.

Each program owns ROWS quantization blocks of BLOCK (= block_size) elements, a [ROWS, BLOCK] tile
of the flattened parameter. It loads the parameter, the gradient and both moments' uint8 codes
once, decodes the moments through their 256-entry maps (``code[q] * absmax[block]``), applies
AdamW in fp32 (decoupled weight decay, bias correction), reduces each block's new absmax from the
updated moments in registers, re-encodes them to the nearest code by an 8-step binary search over
the 255 midpoints of the map (L1-resident gathers), and stores the parameter, codes and absmaxes.
Per element it reads the parameter, the gradient and two code bytes, and writes the parameter and
two code bytes: nothing else touches memory.
The format and the arithmetic order are those of `reference.adamw8bit_update`.

jit code and launchers only: no autograd, no nn (see fastpeft/optim/_bridge.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels.reference import adamw8bit_scalars
from fastpeft.kernels._common import interpreting

__all__ = ["adamw8bit_update"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PROGRAM_ELEMS = 2048   # elements per program when block_size is smaller: ROWS = 2048 // BLOCK
_NUM_WARPS = 8          # 256 threads: 8 elements each at 2048 per program


@triton.jit
def _nearest_code(x, mids_ptr):
    """Index of the map code nearest to x (fp32 tile): how many of the 255 sorted midpoints lie
    below x, so a tie goes to the lower code. Eight probes, each a gather from the 1 KB table."""
    idx = tl.zeros(x.shape, dtype=tl.int32)
    for s in tl.static_range(8):
        probe = idx + (128 >> s)
        mid = tl.load(mids_ptr + probe - 1)  # probe is in [1, 255]
        idx = tl.where(mid < x, probe, idx)
    return idx


@triton.jit
def _adamw8bit_kernel(
    # pointers
    p_ptr, g_ptr,                   # param [n] fp32|fp16|bf16, grad [n] same dtype
    m_ptr, v_ptr,                   # uint8 codes [n]: first moment (signed map), second (unsigned)
    m_absmax_ptr, v_absmax_ptr,     # fp32 [nblocks], read and rewritten
    m_code_ptr, m_mids_ptr,         # signed map fp32 [256], its midpoints [255]
    v_code_ptr, v_mids_ptr,         # unsigned map fp32 [256], its midpoints [255]
    # sizes
    n, nblocks,
    # fp32 scalars of this step (reference.adamw8bit_scalars)
    beta1, beta2, eps, decay, step_size, bc2_sqrt,
    # meta-parameters
    BLOCK: tl.constexpr,            # block_size, a power of two
    ROWS: tl.constexpr,             # quantization blocks per program
):
    """p = p * decay - step_size * m / (sqrt(v) / bc2_sqrt + eps) after m, v take their Adam
    update; m, v re-encoded per block of BLOCK with fresh absmaxes. In place."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = rows.to(tl.int64)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    row_ok = rows < nblocks
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    qm = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.int32)
    qv = tl.load(v_ptr + offs, mask=mask, other=0).to(tl.int32)
    am = tl.load(m_absmax_ptr + rows, mask=row_ok, other=0.0)
    av = tl.load(v_absmax_ptr + rows, mask=row_ok, other=0.0)
    m = tl.load(m_code_ptr + qm) * am[:, None]
    v = tl.load(v_code_ptr + qv) * av[:, None]

    m = m * beta1 + (1.0 - beta1) * g
    v = v * beta2 + (1.0 - beta2) * g * g
    m = tl.where(mask, m, 0.0)      # lanes past n hold decoded garbage: keep them out of the absmax
    v = tl.where(mask, v, 0.0)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p * decay - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)

    am = tl.max(tl.abs(m), axis=1)
    av = tl.max(v, axis=1)
    tl.store(m_absmax_ptr + rows, am, mask=row_ok)
    tl.store(v_absmax_ptr + rows, av, mask=row_ok)
    qm = _nearest_code(tl.div_rn(m, tl.where(am > 0, am, 1.0)[:, None]), m_mids_ptr)
    qv = _nearest_code(tl.div_rn(v, tl.where(av > 0, av, 1.0)[:, None]), v_mids_ptr)
    tl.store(m_ptr + offs, qm.to(tl.uint8), mask=mask)
    tl.store(v_ptr + offs, qv.to(tl.uint8), mask=mask)


def _check(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name}: expected contiguous {list(shape)} {dtype} on {device}, "
                         f"got {list(t.shape)} {t.dtype} on {t.device}")


def adamw8bit_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                     exp_avg_absmax: torch.Tensor, exp_avg_sq: torch.Tensor,
                     exp_avg_sq_absmax: torch.Tensor, maps: tuple, *, lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, step: int,
                     block_size: int) -> None:
    """One fused AdamW step with 8-bit blockwise states, all in place, in one launch.

    param: [n] fp32|fp16|bf16 contiguous; grad: [n] param.dtype contiguous; exp_avg, exp_avg_sq:
    uint8 [n] contiguous (signed and unsigned map codes); exp_avg_absmax, exp_avg_sq_absmax: fp32
    [ceil(n / block_size)]; maps: `reference.adamw8bit_maps()` on param's device (fp32 [256],
    [255], [256], [255]); step: the 1-based step this update makes; block_size: a power of two.
    """
    if param.dtype not in _DTYPES:
        raise ValueError(f"param: dtype must be float32|float16|bfloat16, got {param.dtype}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a positive power of two, got {block_size}")
    n, dev = param.numel(), param.device
    nblocks = triton.cdiv(n, block_size)
    _check("param", param, (n,), param.dtype, dev)
    _check("grad", grad, (n,), param.dtype, dev)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check(name, t, (n,), torch.uint8, dev)
    for name, t in (("exp_avg_absmax", exp_avg_absmax), ("exp_avg_sq_absmax", exp_avg_sq_absmax)):
        _check(name, t, (nblocks,), torch.float32, dev)
    for name, t, size in zip(("signed map", "its midpoints", "unsigned map", "its midpoints"), maps,
                             (256, 255, 256, 255)):
        _check(name, t, (size,), torch.float32, dev)
    if not interpreting(_adamw8bit_kernel) and not param.is_cuda:
        raise ValueError(f"param is on {dev}: Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before triton is imported)")
    if n == 0:
        return
    rows = max(1, _PROGRAM_ELEMS // block_size)

    def _grid(meta):
        return (triton.cdiv(nblocks, meta["ROWS"]),)

    _adamw8bit_kernel[_grid](
        param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, *maps,
        n, nblocks,
        *adamw8bit_scalars(lr, beta1, beta2, eps, weight_decay, step),
        BLOCK=block_size, ROWS=rows, num_warps=_NUM_WARPS,
    )
