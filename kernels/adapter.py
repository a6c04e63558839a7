"""Fused bottleneck adapter: out = res + s * (act(x Wd^T + bd) Wu^T + bu), forward in one launch.

  x [M, H] -> down [M, b] -> act -> up [M, H], scaled by s and added to the residual `res`
  (res = x for the serial adapters of Houlsby / Pfeiffer; the sub-layer's output for He et al.'s
  parallel adapter, which reads the sub-layer's input x).

One program owns BLOCK_M rows and the whole bottleneck (b <= B_PAD <= 256, padded to a power of
two >= 16 with masks, so `tl.dot` gets dims >= 16 on a GPU without copying weights):
  1. a K-loop over H accumulates ``x @ Wd^T`` into an fp32 [BLOCK_M, B_PAD] register tile, then
     adds bd and applies the activation in registers;
  2. an N-loop over H multiplies that tile by [B_PAD, BLOCK_N] tiles of Wu^T, adds bu, scales by s,
     adds the residual tile and stores.
The bottleneck activation never goes to HBM; x is read once, the output written once. The
backward (fastpeft/ops.py) recomputes the [M, b] down-projection with plain GEMMs: it is r/H of
the forward's bytes, and saving it would cost an activation per adapter.

jit code and launchers only: no autograd, no nn (see fastpeft/ops.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels._common import interpreting

__all__ = ["adapter_fwd", "ACTIVATIONS", "MAX_BOTTLENECK"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
MAX_BOTTLENECK = 256  # the [BLOCK_M, B_PAD] fp32 tile must fit in registers


@triton.jit
def _activation(z, ACT: tl.constexpr):
    """fp32 z -> act(z); ACT indexes ACTIVATIONS (gelu is the exact, erf form)."""
    if ACT == 0:
        z = tl.maximum(z, 0.0)
    elif ACT == 1:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 2:
        z = z * tl.sigmoid(z)
    else:
        z = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    return z


@triton.jit
def _adapter_fwd_kernel(
    # pointers
    x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, res_ptr, y_ptr,
    # sizes: x [M, H], wd [B, H], bd [B], wu [H, B], bu [H], res [M, H], y [M, H]
    M, H, B,
    # strides, in elements
    stride_xm, stride_xh,
    stride_wdb, stride_wdh,
    stride_wuh, stride_wub,
    stride_bd, stride_bu,
    stride_rm, stride_rh,
    stride_ym, stride_yh,
    scaling,
    # meta-parameters
    B_PAD: tl.constexpr,            # max(16, next_power_of_2(B))
    ACT: tl.constexpr,              # index into ACTIVATIONS
    HAS_DOWN_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,     # False: the residual is x itself (serial adapter)
    UPCAST: tl.constexpr,           # interpreter + bf16: compute in fp32 right after each load
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[M, H] = res + scaling * (act(x @ wd^T + bd) @ wu^T + bu), fp32 accumulation."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, B_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_b = offs_b < B
    rows = offs_m.to(tl.int64)

    # 1. down-projection of this row block, kept in registers
    z = tl.zeros((BLOCK_M, B_PAD), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < H
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xh,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wd = tl.load(wd_ptr + ks[:, None] * stride_wdh + offs_b[None, :] * stride_wdb,
                     mask=mask_k[:, None] & mask_b[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            wd = wd.to(tl.float32)
        z = tl.dot(x, wd, z, input_precision=INPUT_PRECISION)
    if HAS_DOWN_BIAS:
        bd = tl.load(bd_ptr + offs_b * stride_bd, mask=mask_b, other=0.0)
        z += bd.to(tl.float32)[None, :]
    a = _activation(z, ACT)
    a = tl.where(mask_b[None, :], a, 0.0)  # padded bottleneck columns contribute nothing

    # 2. up-projection, scale and residual, one column block at a time
    for n0 in range(0, H, BLOCK_N):
        ns = n0 + offs_n
        mask_n = ns < H
        wu = tl.load(wu_ptr + offs_b[:, None] * stride_wub + ns[None, :] * stride_wuh,
                     mask=mask_b[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            wu = wu.to(tl.float32)
            up = tl.dot(a, wu, input_precision=INPUT_PRECISION)
        else:
            up = tl.dot(a.to(wu.dtype), wu, input_precision=INPUT_PRECISION)
        if HAS_UP_BIAS:
            bu = tl.load(bu_ptr + ns * stride_bu, mask=mask_n, other=0.0)
            up += bu.to(tl.float32)[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + rows[:, None] * stride_rm + ns[None, :] * stride_rh, mask=mask, other=0.0)
        else:
            res = tl.load(x_ptr + rows[:, None] * stride_xm + ns[None, :] * stride_xh, mask=mask, other=0.0)
        out = res.to(tl.float32) + scaling * up
        tl.store(y_ptr + rows[:, None] * stride_ym + ns[None, :] * stride_yh,
                 out.to(y_ptr.dtype.element_ty), mask=mask)


def _gpu_meta(M: int) -> dict:
    """Fixed launch settings (no hot-path autotune): small row blocks for decode."""
    return dict(BLOCK_M=16 if M <= 16 else 64, BLOCK_N=64, BLOCK_K=64, num_warps=4)


_INTERPRET_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)


def _check(name: str, t: torch.Tensor, shape: tuple, ref: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name}: expected {ref.dtype} on {ref.device}, got {t.dtype} on {t.device}")


def adapter_fwd(x2d: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor | None,
                up_w: torch.Tensor, up_b: torch.Tensor | None, scaling: float, activation: str,
                residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = res + s * (act(x Wd^T + bd) Wu^T + bu) in one launch (res = x when residual is None).

    x2d: [M, H] fp32|fp16|bf16 any strides; down_w: [b, H] x2d.dtype any strides, 1 <= b <= 256;
    down_b: [b] or None; up_w: [H, b] x2d.dtype any strides; up_b: [H] or None; scaling: float;
    activation: one of ACTIVATIONS; residual: [M, H] x2d.dtype any strides or None; out: [M, H]
    x2d.dtype any strides, or None to allocate -> out, [M, H] x2d.dtype. fp32 accumulation.
    """
    if x2d.dim() != 2:
        raise ValueError(f"x2d: expected [M, H], got {list(x2d.shape)}")
    if x2d.dtype not in _DTYPES:
        raise ValueError(f"x2d: dtype must be float32|float16|bfloat16, got {x2d.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    (M, H), B = x2d.shape, down_w.shape[0]
    if not 1 <= B <= MAX_BOTTLENECK:
        raise ValueError(f"bottleneck size down_w.shape[0] must be in 1..{MAX_BOTTLENECK}, got {B}")
    _check("down_w", down_w, (B, H), x2d)
    _check("up_w", up_w, (H, B), x2d)
    for name, t, shape in (("down_b", down_b, (B,)), ("up_b", up_b, (H,)), ("residual", residual, (M, H))):
        if t is not None:
            _check(name, t, shape, x2d)
    interpret = interpreting(_adapter_fwd_kernel)
    if not interpret and not x2d.is_cuda:
        raise ValueError(f"x2d is on {x2d.device}: Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before triton is imported)")
    if out is None:
        out = torch.empty((M, H), dtype=x2d.dtype, device=x2d.device)
    else:
        _check("out", out, (M, H), x2d)
    if M == 0 or H == 0:
        return out
    meta = _INTERPRET_META if interpret else _gpu_meta(M)

    def _grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    res = x2d if residual is None else residual
    _adapter_fwd_kernel[_grid](
        x2d, down_w, x2d if down_b is None else down_b, up_w, x2d if up_b is None else up_b, res, out,
        M, H, B,
        x2d.stride(0), x2d.stride(1),
        down_w.stride(0), down_w.stride(1),
        up_w.stride(0), up_w.stride(1),
        0 if down_b is None else down_b.stride(0), 0 if up_b is None else up_b.stride(0),
        res.stride(0), res.stride(1),
        out.stride(0), out.stride(1),
        float(scaling),
        B_PAD=max(16, triton.next_power_of_2(B)),
        ACT=ACTIVATIONS.index(activation),
        HAS_DOWN_BIAS=down_b is not None, HAS_UP_BIAS=up_b is not None,
        HAS_RESIDUAL=residual is not None,
        UPCAST=interpret and x2d.dtype == torch.bfloat16,
        INPUT_PRECISION="ieee" if x2d.dtype == torch.float32 else "tf32",
        **meta,
    )
    return out
