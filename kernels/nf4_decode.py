"""The NF4 decode path (M <= 16): a split-K GEMV over the packed weight, with the LoRA epilogue.

At decode a layer sees a handful of tokens, so the tiled kernel in nf4.py would launch only
``ceil(N / BLOCK_N)`` programs for a [N, K] layer (64 for 4096x4096): too few to keep an
H100/H200's memory system busy. Here the reduction axis is split too:

  pass 1 `_nf4_splitk_fwd_kernel`, grid (column blocks + 1, SPLIT_K): program (n, s) streams the
      packed bytes of its [K-slice s, column block n] of the weight once, decodes them in
      registers (`nf4._nf4_decode`, nested absmax included) and writes the fp32 partial
      ``inp[:, slice] @ W[slice, block]`` to a workspace [SPLIT_K, M, P]. The extra column of
      programs (n = column blocks, only with LoRA) computes ``inp[:, slice] @ A^T[slice]`` into
      [SPLIT_K, M, R_PAD]: the LoRA down-projection is done once per slice, not once per column block.
  pass 2 `_nf4_splitk_reduce_kernel`, grid (column blocks,): sums the partials in split order,
      sums the x @ A^T partials into the full [M, r] tile, and finishes with the same
      `tiles.lora_epilogue` as the tiled kernel: ``f * (acc + s ((xa * e) @ Bt)) + bias``.

Why a deterministic two-pass reduction rather than fp32 atomics: atomics need a zeroed fp32
buffer (a memset launch) and a separate cast (another launch) anyway, and their summation
order changes from run to run; two passes give bit-reproducible outputs (and dX in training)
for the same launch count, and the reduce pass is the natural single place for the epilogue, so
bias and the DoRA column scale are applied exactly once, after the full sum, and the AdaLoRA
rank scale multiplies the complete x @ A^T tile (the order the tiled kernel and reference use).
The price is the workspace round trip, ``SPLIT_K * M * N * 4`` bytes (it stays in L2), which
the autotuner weighs when it picks SPLIT_K; for M = 1 it is a few % of the weight bytes.

Forward and dX go through the same launcher (strides in the weight's flat index, as in nf4.py).
jit code and launchers only: no autograd, no nn. Reached through `nf4._launch` for M <= 16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels.nf4 import _nf4_decode
from fastpeft.kernels.tiles import interpreting, lora_epilogue

__all__ = ["launch_split_k"]

_BLOCK_M = 16  # every M <= 16 fits one row block; tl.dot needs >= 16 rows on a GPU


@triton.jit
def _nf4_splitk_fwd_kernel(
    # pointers: activations, NF4 state, LoRA down-projection, workspaces
    x_ptr, packed_ptr, absmax_ptr, code4_ptr, code8_ptr, nested_absmax_ptr, offset_ptr, a_ptr,
    part_ptr, xa_part_ptr,
    # sizes: x [M, Q], W^(T) [Q, P], a [Q, R]; part [SPLIT_K, M, P], xa_part [SPLIT_K, M, R_PAD]
    M, P, Q, R, M_BUCKET, blocksize,
    # strides: x and a in elements, the weight's in its flat [N*K] index, workspaces contiguous
    stride_xm, stride_xq,
    stride_wq, stride_wp,
    stride_aq, stride_ar,
    # meta-parameters
    NESTED: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """part[s] = x[:, Ks] @ dequant(W)[Ks, block n] (or xa_part[s] = x[:, Ks] @ a[Ks] for the
    extra program column), Ks the s-th run of whole BLOCK_K tiles of the reduction axis."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    k_per_split = tl.cdiv(tl.cdiv(Q, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_s * k_per_split
    k_len = tl.minimum(Q - k_lo, k_per_split)  # <= 0 for an empty trailing split: no iterations
    num_iters = tl.cdiv(tl.maximum(k_len, 0), BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_lo + offs_k)[None, :] * stride_xq

    if pid_n < tl.cdiv(P, BLOCK_N):  # a column block of the base weight
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < P
        w_idx = (k_lo + offs_k).to(tl.int64)[:, None] * stride_wq + offs_n.to(tl.int64)[None, :] * stride_wp
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, num_iters):
            mask_k = offs_k < k_len - k * BLOCK_K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = _nf4_decode(packed_ptr, absmax_ptr, code4_ptr, code8_ptr, nested_absmax_ptr,
                            offset_ptr, w_idx, mask_k[:, None] & mask_n[None, :], blocksize, NESTED)
            if UPCAST:
                x = x.to(tl.float32)
            else:
                w = w.to(x.dtype)  # the weight bnb would dequantize to, and tensor-core operands
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xq
            w_idx += BLOCK_K * stride_wq
        part_ptrs = part_ptr + (pid_s * M + offs_m.to(tl.int64))[:, None] * P + offs_n[None, :]
        tl.store(part_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:  # the LoRA column: this slice's x @ A^T, once for all column blocks
        if HAS_LORA:
            offs_r = tl.arange(0, R_PAD)
            mask_r = offs_r < R
            a_ptrs = a_ptr + (k_lo + offs_k)[:, None] * stride_aq + offs_r[None, :] * stride_ar
            xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            for k in range(0, num_iters):
                mask_k = offs_k < k_len - k * BLOCK_K
                x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                if UPCAST:
                    x = x.to(tl.float32)
                    a = a.to(tl.float32)
                xa = tl.dot(x, a, xa, input_precision=INPUT_PRECISION)
                x_ptrs += BLOCK_K * stride_xq
                a_ptrs += BLOCK_K * stride_aq
            xa_ptrs = xa_part_ptr + (pid_s * M + offs_m.to(tl.int64))[:, None] * R_PAD + offs_r[None, :]
            tl.store(xa_ptrs, xa, mask=mask_m[:, None])


@triton.jit
def _nf4_splitk_reduce_kernel(
    # pointers: workspaces, epilogue operands, output
    part_ptr, xa_part_ptr, bias_ptr, b_ptr, e_ptr, f_ptr, y_ptr,
    # sizes: part [SPLIT_K, M, P], xa_part [SPLIT_K, M, R_PAD], b [R, P], y [M, P]
    M, P, R,
    stride_br, stride_bp, stride_bias, stride_ym, stride_yp, stride_e, stride_f,
    scaling,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_RANK_SCALE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """y = f * (sum_s part[s] + scaling * ((sum_s xa_part[s]) * e) @ b) + bias, summed in split order."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < P
    mask_r = offs_r < R
    mask = mask_m[:, None] & mask_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        rows = (s * M + offs_m.to(tl.int64))[:, None]
        acc += tl.load(part_ptr + rows * P + offs_n[None, :], mask=mask, other=0.0)
        if HAS_LORA:
            xa += tl.load(xa_part_ptr + rows * R_PAD + offs_r[None, :], mask=mask_m[:, None], other=0.0)
    acc = lora_epilogue(acc, xa, b_ptr, e_ptr, f_ptr, bias_ptr, offs_r, offs_n, mask_r, mask_n,
                        stride_br, stride_bp, stride_e, stride_f, stride_bias, scaling,
                        HAS_LORA, HAS_RANK_SCALE, HAS_COL_SCALE, HAS_BIAS, UPCAST, INPUT_PRECISION)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yp
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# Autotune space on a GPU (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages): enough programs
# for ~130 SMs on 4096-wide layers (e.g. 64 column blocks x 8 splits), long K runs per program.
_GPU_SHAPES = [
    (32, 128, 4, 4, 3), (64, 128, 4, 4, 3), (64, 128, 8, 4, 3), (64, 256, 8, 8, 2),
    (128, 64, 8, 4, 3), (128, 128, 4, 8, 3), (32, 256, 8, 4, 3), (64, 64, 16, 4, 4),
    (128, 128, 2, 8, 3), (256, 64, 4, 8, 3),
]
# Interpreter: one fixed small config with 3 splits, so the tests' odd K spans full, partial and
# empty splits.
_INTERPRET_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 3}
_MAX_SPLIT_K = max(max(s[2] for s in _GPU_SHAPES), _INTERPRET_CONFIG["SPLIT_K"])
_REDUCE_BLOCK_N = 64

_nf4_splitk_fwd_kernel_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=nw, num_stages=ns)
             for bn, bk, sk, nw, ns in _GPU_SHAPES],
    key=["M_BUCKET", "P", "Q", "R_PAD", "NESTED", "HAS_LORA"],
)(_nf4_splitk_fwd_kernel)


def launch_split_k(inp, state, is_nested, blocksize, stride_wq, stride_wp, P, bias, at, bt, scaling,
                   out, rank_scale=None, col_scale=None):
    """out[M, P] = f * (inp[M, Q] @ dequant(W)[Q, P] + scaling * ((inp @ at) * e) @ bt) + bias
    for 1 <= M <= 16, in two launches (see the module docstring).

    Called by `nf4._launch` after it validated everything and allocated `out` ([M, P], any
    strides); `state` is `nf4._state_args`'s tuple; at [Q, R] and bt [R, P] any strides, or None.
    """
    M, Q = inp.shape
    if not 1 <= M <= _BLOCK_M:
        raise ValueError(f"launch_split_k: M must be in [1, {_BLOCK_M}], got {M}")
    has_lora = at is not None
    R = at.shape[1] if has_lora else 1
    R_PAD = max(16, triton.next_power_of_2(R))
    interpret = interpreting(_nf4_splitk_fwd_kernel)
    upcast = interpret and inp.dtype == torch.bfloat16
    precision = "ieee" if inp.dtype == torch.float32 else "tf32"
    part = torch.empty((_MAX_SPLIT_K, M, P), dtype=torch.float32, device=inp.device)
    xa_part = torch.empty((_MAX_SPLIT_K, M, R_PAD) if has_lora else (1,), dtype=torch.float32,
                          device=inp.device)

    def _grid(meta):
        return (triton.cdiv(P, meta["BLOCK_N"]) + has_lora, meta["SPLIT_K"])

    meta = dict(NESTED=is_nested, HAS_LORA=has_lora, R_PAD=R_PAD, UPCAST=upcast,
                INPUT_PRECISION=precision, BLOCK_M=_BLOCK_M)
    kernel = _nf4_splitk_fwd_kernel if interpret else _nf4_splitk_fwd_kernel_tuned
    if interpret:
        meta.update(_INTERPRET_CONFIG)
    kernel[_grid](
        inp, *state, at if has_lora else inp, part, xa_part,
        M, P, Q, R, triton.next_power_of_2(M), blocksize,
        inp.stride(0), inp.stride(1),
        stride_wq, stride_wp,
        at.stride(0) if has_lora else 0, at.stride(1) if has_lora else 0,
        **meta,
    )
    # the split count the partials were written with (the tuner's pick: host state, no sync)
    split_k = _INTERPRET_CONFIG["SPLIT_K"] if interpret else kernel.best_config.kwargs["SPLIT_K"]

    dummy = inp
    reduce_n = 32 if interpret else _REDUCE_BLOCK_N
    _nf4_splitk_reduce_kernel[(triton.cdiv(P, reduce_n),)](
        part, xa_part, dummy if bias is None else bias, bt if has_lora else dummy,
        dummy if rank_scale is None else rank_scale, dummy if col_scale is None else col_scale, out,
        M, P, R,
        bt.stride(0) if has_lora else 0, bt.stride(1) if has_lora else 0,
        0 if bias is None else bias.stride(0),
        out.stride(0), out.stride(1),
        0 if rank_scale is None else rank_scale.stride(0),
        0 if col_scale is None else col_scale.stride(0),
        float(scaling),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_RANK_SCALE=rank_scale is not None,
        HAS_COL_SCALE=col_scale is not None, R_PAD=R_PAD, UPCAST=upcast, INPUT_PRECISION=precision,
        BLOCK_M=_BLOCK_M, BLOCK_N=reduce_n, SPLIT_K=split_k,
    )
    return out
