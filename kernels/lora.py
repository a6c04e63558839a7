"""Fused LoRA linear: y = x W^T + b + s (x A^T) B^T, forward and input gradient.

One generic kernel computes

    out[M, P] = inp[M, Q] @ Wt[Q, P] + bias[P] + s (inp @ At[Q, R]) @ Bt[R, P]

from strides alone, so transposes are free and nothing is copied:

  forward  `lora_fwd`:    inp = x  [M, K], Wt = W^T, At = A^T, Bt = B^T, Q = K, P = N, with bias;
  backward `lora_bwd_dx`: inp = dY [M, N], Wt = W,   At = B,   Bt = A,   Q = N, P = K, no bias
                          (dX = dY W + s (dY B) A has the same shape of computation).

Optional scales and switches, constexpr-switched so plain LoRA compiles exactly as before:
  HAS_RANK_SCALE  (AdaLoRA's singular values E) multiplies the [BLOCK_M, R_PAD] register tile
                  ``inp @ At`` by e[R] before the up-projection: ``s ((x A^T) diag(e)) B^T``; a
                  masked (zero) rank contributes nothing. The backward uses it too:
                  ``dX = dY W + s ((dY B) diag(e)) A``.
  HAS_COL_SCALE   (DoRA's ``m / ||W + s B A||``) multiplies the whole pre-bias accumulator by
                  f[P]: ``out = f * (inp @ Wt + s (inp @ At) @ Bt) + bias``.
  HAS_IN_SCALE    (IA3's feedforward vector) multiplies each `inp` tile by g[Q] inside the K-loop,
                  in fp32, rounded back to the operand dtype: ``out = (inp * g) @ Wt + ...``.
  HAS_LORA        off runs the bare base GEMM (with the scales and bias): `scaled_linear_fwd`,
                  IA3's forward and both of its input gradients.

Fusion: the K-loop that streams each `inp` tile for the base GEMM also accumulates ``inp @ At``
into an fp32 [BLOCK_M, R_PAD] register tile; the epilogue multiplies it by the [R_PAD, BLOCK_N]
tile of Bt, so the [M, r] intermediate never goes to HBM. The price is that every column block
recomputes its row block's ``inp @ At`` (R_PAD / BLOCK_N extra FLOPs), cheap for r << BLOCK_N.

jit code and launchers only: no autograd, no nn (see fastpeft/ops.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels import configs
from fastpeft.kernels._common import (DTYPES, INTERPRET_CONFIG, alloc_out, check_device, check_tensor, dot_meta,
                                      grouped_tile,                                       interpreting, k_loop, lora_epilogue)

__all__ = ["lora_fwd", "lora_bwd_dx", "scaled_linear_fwd"]

_DTYPES = DTYPES


@triton.jit
def _lora_fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr,
    e_ptr, f_ptr,                   # rank scale [R], column scale [P] (read only when switched on)
    g_ptr,                          # input scale [Q] (read only when HAS_IN_SCALE)
    # sizes: x [M, Q], w [Q, P], a [Q, R], b [R, P], y [M, P]; M_BUCKET only keys the autotuner
    M, P, Q, R, M_BUCKET,
    # strides, in elements
    stride_xm, stride_xq,
    stride_wq, stride_wp,
    stride_aq, stride_ar,
    stride_br, stride_bp,
    stride_bias,
    stride_ym, stride_yp,
    stride_e, stride_f, stride_g,
    # the LoRA scale s
    scaling,
    # meta-parameters
    R_PAD: tl.constexpr,            # max(16, next_power_of_2(R)): tl.dot needs dims >= 16
    HAS_BIAS: tl.constexpr,
    HAS_RANK_SCALE: tl.constexpr,   # xa *= e[None, :] before the epilogue dot (AdaLoRA)
    HAS_COL_SCALE: tl.constexpr,    # acc *= f[None, :] before the bias (DoRA, IA3)
    HAS_IN_SCALE: tl.constexpr,     # x *= g[None, :] in the K-loop (IA3 feedforward)
    HAS_LORA: tl.constexpr,         # False: no A, B; the bare scaled base GEMM
    UPCAST: tl.constexpr,           # interpreter + bf16: compute in fp32 right after each load
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (no tf32), ignored for fp16/bf16
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[M, P] = f[P] * (x[M, Q] @ w[Q, P] + scaling * ((x @ a[Q, R]) * e[R]) @ b[R, P]) + bias[P],
    fp32 acc; e and f are 1 unless HAS_RANK_SCALE / HAS_COL_SCALE."""
    pid_m, pid_n = grouped_tile(M, P, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < P
    mask_r = offs_r < R

    # int64 row offsets: M * stride_xm may exceed 2**31 for long prefill batches.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    acc, xa = k_loop(acc, xa, x_ptr, offs_m.to(tl.int64) * stride_xm, mask_m, stride_xq,
                     w_ptr, stride_wq, stride_wp,
                     x_ptr, x_ptr, x_ptr, x_ptr, x_ptr, 0, 0,
                     a_ptr, stride_aq, stride_ar, mask_r, g_ptr, stride_g,
                     offs_n, mask_n, pid_n * BLOCK_N, 0, Q,
                     False, False, 1, False, False, HAS_LORA, HAS_IN_SCALE, UPCAST, INPUT_PRECISION,
                     R_PAD, BLOCK_K)

    acc = lora_epilogue(acc, xa, b_ptr, e_ptr, f_ptr, bias_ptr, offs_r, offs_n, mask_r, mask_n,
                        stride_br, stride_bp, stride_e, stride_f, stride_bias, scaling,
                        HAS_LORA, HAS_RANK_SCALE, HAS_COL_SCALE, HAS_BIAS, UPCAST, INPUT_PRECISION)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yp
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# The autotuned wrapper of the same kernel, used only on a real GPU, over the arch table's LORA_FWD
# candidates (kernels/configs/), pruned to those that fit the arch. It is keyed on the
# power-of-two bucket of M rather than M itself so that every new sequence length does not
# re-tune. Autotune benchmarks on first sight of a key: warm up before CUDA-graph capture.
_lora_fwd_kernel_tuned = configs.autotuned(
    _lora_fwd_kernel, "LORA_FWD", key=["M_BUCKET", "P", "Q", "R_PAD", "HAS_LORA", "HAS_IN_SCALE"])


def _check_layer(ref, weight, lora_A, lora_B, N, K, **optional) -> None:
    """weight [N, K], lora_A [r, K], lora_B [N, r] and the optional vectors (bias and col_scale
    [N], rank_scale [r]) in ref's dtype and device."""
    r = lora_A.shape[0]
    check_tensor("weight", weight, (N, K), ref)
    check_tensor("lora_A", lora_A, (r, K), ref)
    check_tensor("lora_B", lora_B, (N, r), ref)
    sizes = {"bias": N, "col_scale": N, "rank_scale": r}
    for name, t in optional.items():
        if t is not None:
            check_tensor(name, t, (sizes[name],), ref)


def _launch(x, wt, bias, at, bt, scaling, out, rank_scale=None, col_scale=None, in_scale=None):
    """out[M, P] = col_scale[P] * ((x * in_scale[Q]) @ wt[Q, P] + scaling * ((x @ at[Q, R]) *
    rank_scale[R]) @ bt[R, P]) + bias[P] (views); any scale may be None (= 1); at, bt None: no
    LoRA term."""
    M, Q = x.shape
    has_lora = at is not None
    P, R = wt.shape[1], (at.shape[1] if has_lora else 1)
    if x.dtype not in _DTYPES:
        raise ValueError(f"x: dtype must be float32|float16|bfloat16, got {x.dtype}")
    if R < 1:
        raise ValueError(f"rank must be >= 1, got {R}")
    check_device(_lora_fwd_kernel, x)
    interpret = interpreting(_lora_fwd_kernel)
    out = alloc_out(out, (M, P), x)
    if M == 0 or P == 0:
        return out

    def _grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(P, meta["BLOCK_N"]),)

    has_bias = bias is not None
    meta = dict(
        R_PAD=max(16, triton.next_power_of_2(R)),
        HAS_BIAS=has_bias,
        HAS_RANK_SCALE=rank_scale is not None,
        HAS_COL_SCALE=col_scale is not None,
        HAS_IN_SCALE=in_scale is not None,
        HAS_LORA=has_lora,
        **dot_meta(_lora_fwd_kernel, x.dtype),
    )
    kernel = _lora_fwd_kernel if interpret else _lora_fwd_kernel_tuned.get()
    if interpret:
        meta.update(INTERPRET_CONFIG)
    kernel[_grid](
        x, wt, bias if has_bias else x, at if has_lora else x, bt if has_lora else x, out,
        x if rank_scale is None else rank_scale, x if col_scale is None else col_scale,
        x if in_scale is None else in_scale,
        M, P, Q, R, triton.next_power_of_2(M),
        x.stride(0), x.stride(1),
        wt.stride(0), wt.stride(1),
        at.stride(0) if has_lora else 0, at.stride(1) if has_lora else 0,
        bt.stride(0) if has_lora else 0, bt.stride(1) if has_lora else 0,
        bias.stride(0) if has_bias else 0,
        out.stride(0), out.stride(1),
        0 if rank_scale is None else rank_scale.stride(0),
        0 if col_scale is None else col_scale.stride(0),
        0 if in_scale is None else in_scale.stride(0),
        float(scaling),
        **meta,
    )
    return out


def lora_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
             out: torch.Tensor | None = None, *, rank_scale: torch.Tensor | None = None,
             col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b + s (x A^T) B^T in one kernel.

    x2d: [M, K] fp32|fp16|bf16 any strides; weight: [N, K] x2d.dtype any strides (e.g.
    ``Conv1D.weight.T``, read in place); bias: [N] x2d.dtype or None; lora_A: [r, K] x2d.dtype;
    lora_B: [N, r] x2d.dtype; scaling: float; out: [M, N] x2d.dtype any strides, or None to
    allocate -> out, [M, N] x2d.dtype. fp32 accumulation; fp32 inputs use IEEE dots (no tf32).
    rank_scale: [r] x2d.dtype or None, AdaLoRA's E: ``s ((x A^T) diag(e)) B^T``;
    col_scale: [N] x2d.dtype or None, DoRA's factor: ``y = f * (x W^T + s (x A^T) B^T) + b``.
    """
    if x2d.dim() != 2:
        raise ValueError(f"x2d: expected [M, K], got {list(x2d.shape)}")
    K, N, r = x2d.shape[1], weight.shape[0], lora_A.shape[0]
    _check_layer(x2d, weight, lora_A, lora_B, N, K, bias=bias, rank_scale=rank_scale, col_scale=col_scale)
    return _launch(x2d, weight.t(), bias, lora_A.t(), lora_B.t(), scaling, out, rank_scale, col_scale)


def lora_bwd_dx(dy2d: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float,
                out: torch.Tensor | None = None, *,
                rank_scale: torch.Tensor | None = None) -> torch.Tensor:
    """dX = dY W + s (dY B) A, the input gradient of `lora_fwd`, with the same kernel.

    dy2d: [M, N] fp32|fp16|bf16 any strides (stride 0 from an expanded grad is fine); weight:
    [N, K] dy2d.dtype any strides; lora_A: [r, K] dy2d.dtype; lora_B: [N, r] dy2d.dtype;
    scaling: float; out: [M, K] dy2d.dtype any strides, or None -> out, [M, K] dy2d.dtype.
    rank_scale: [r] dy2d.dtype or None: ``dX = dY W + s ((dY B) diag(e)) A``. (DoRA's column
    scale is applied to dY by the caller: dX of ``f * z`` is the dX of z at ``f * dY``.)
    """
    if dy2d.dim() != 2:
        raise ValueError(f"dy2d: expected [M, N], got {list(dy2d.shape)}")
    N, K = dy2d.shape[1], weight.shape[1]
    _check_layer(dy2d, weight, lora_A, lora_B, N, K, rank_scale=rank_scale)
    return _launch(dy2d, weight, None, lora_B, lora_A, scaling, out, rank_scale)


def scaled_linear_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      out: torch.Tensor | None = None, *, in_scale: torch.Tensor | None = None,
                      col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = f * ((x * g) W^T) + b, a plain linear with IA3's scales, on the LoRA kernel (no LoRA).

    x2d: [M, K] fp32|fp16|bf16 any strides; weight: [N, K] x2d.dtype any strides (pass ``W.t()``
    for the input gradient ``dY W``); bias: [N] x2d.dtype or None; in_scale: [K] x2d.dtype or None
    (g, applied to x's columns inside the K-loop); col_scale: [N] x2d.dtype or None (f, applied
    before the bias); out: [M, N] x2d.dtype any strides, or None -> out, [M, N] x2d.dtype.
    """
    if x2d.dim() != 2:
        raise ValueError(f"x2d: expected [M, K], got {list(x2d.shape)}")
    K, N = x2d.shape[1], weight.shape[0]
    check_tensor("weight", weight, (N, K), x2d)
    if bias is not None:
        check_tensor("bias", bias, (N,), x2d)
    if in_scale is not None:
        check_tensor("in_scale", in_scale, (K,), x2d)
    if col_scale is not None:
        check_tensor("col_scale", col_scale, (N,), x2d)
    return _launch(x2d, weight.t(), bias, None, None, 0.0, out, None, col_scale, in_scale)
