"""The NF4 decode path (M <= 16): a split-K GEMV over the packed weight, with the LoRA epilogue.

At decode a layer sees a handful of tokens, so the tiled kernel in nf4.py would launch only
``ceil(N / BLOCK_N)`` programs for a [N, K] layer (64 for 4096x4096): too few to keep an
H100/H200's memory system busy. Here the reduction axis is split too:

  pass 1 `_nf4_splitk_fwd_kernel`, grid (column blocks + 1, SPLIT_K): program (n, s) streams the
      packed bytes of its [K-slice s, column block n] of the weight once through `_common.nf4_tile`
      (wide loads, nested absmax decoded once per block) and writes the fp32 partial
      ``inp[:, slice] @ W[slice, block]`` to a workspace [SPLIT_K, M, P]. For M <= 4 (GEMV) the
      partial is a multiply-and-reduce in registers, one row at a time, as bitsandbytes'
      `gemv_4bit` does: no 16-row padding of a `tl.dot`; for 4 < M <= 16 it is `_common.k_loop`
      on a 16-row tile. The extra column of programs (only with LoRA) computes
      ``inp[:, slice] @ A^T[slice]`` into [SPLIT_K, M, R_PAD]: the LoRA down-projection is done
      once per slice, not once per column block.
  pass 2 `_nf4_splitk_reduce_kernel`, grid (column blocks,): sums the partials in split order,
      sums the x @ A^T partials into the full [M, r] tile, and finishes with the same
      `_common.lora_epilogue` as the tiled kernel: ``f * (acc + s ((xa * e) @ Bt)) + bias``.

Launch settings are fixed per arch (kernels/configs/, no hot-path autotune, CUDA-graph safe):
the tiles come from the arch table and SPLIT_K from `configs.decode_split`, so that a 4096x4096
layer at M = 1 launches >= 264 programs (2 x 132 SMs). The launcher knows its split count
without asking the autotuner.

Why a deterministic two-pass reduction rather than fp32 atomics: atomics need a zeroed fp32
buffer (a memset launch) and a separate cast (another launch) anyway, and their summation
order changes from run to run; two passes give bit-reproducible outputs (and dX in training)
for the same launch count, and the reduce pass is the natural single place for the epilogue, so
bias and the DoRA column scale are applied exactly once, after the full sum, and the AdaLoRA
rank scale multiplies the complete x @ A^T tile (the order the tiled kernel and reference use).
The price is the workspace round trip, ``SPLIT_K * M * N * 4`` bytes (it stays in L2); for M = 1
it is a few % of the weight bytes.

Forward and dX go through the same launcher (TRANS picks the weight axis the reduction runs on).
jit code and launchers only: no autograd, no nn. Reached through `nf4._launch` for M <= 16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels import configs
from fastpeft.kernels._common import dot_meta, interpreting, k_loop, lora_epilogue, nf4_meta, nf4_tile

__all__ = ["launch_split_k", "DECODE_MAX_M", "GEMV_MAX_M"]

DECODE_MAX_M = 16   # this path serves 1 <= M <= 16
GEMV_MAX_M = 4      # M <= 4: multiply-and-reduce in registers, no 16-row padding
_BLOCK_M = 16       # 4 < M <= 16 fits one row block; tl.dot needs >= 16 rows on a GPU


@triton.jit
def _nf4_splitk_fwd_kernel(
    # pointers: activations, NF4 state, LoRA down-projection, workspaces
    x_ptr, packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr, a_ptr,
    part_ptr, xa_part_ptr,
    # sizes: x [M, Q], W^(T) [Q, P], a [Q, R]; part [SPLIT_K, M, P], xa_part [SPLIT_K, M, R_PAD];
    # k_per_split: a multiple of BLOCK_K; the NF4 weight W [N, K] has rows of row_len = K elements
    M, P, Q, R, M_BUCKET, k_per_split, row_len, row_bytes,
    # strides: x and a in elements, workspaces contiguous
    stride_xm, stride_xq,
    stride_aq, stride_ar,
    # meta-parameters
    NESTED: tl.constexpr, BS: tl.constexpr, ALIGNED: tl.constexpr, TRANS: tl.constexpr,
    HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GEMV: tl.constexpr,             # M <= M_PAD: multiply-and-reduce, no tl.dot on padded rows
    M_PAD: tl.constexpr,            # GEMV rows: next power of two of M (1, 2, 4)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """part[s] = x[:, Ks] @ dequant(W)[Ks, block n] (or xa_part[s] = x[:, Ks] @ a[Ks] for the
    extra program column), Ks the s-th run of k_per_split elements of the reduction axis."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    k_lo = pid_s * k_per_split
    k_len = tl.minimum(Q - k_lo, k_per_split)  # <= 0 for an empty trailing split: no iterations
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R

    if pid_n < tl.cdiv(P, BLOCK_N):  # a column block of the base weight
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < P
        if GEMV:
            offs_g = tl.arange(0, M_PAD)
            mask_g = offs_g < M
            offs_k = tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + (k_lo + offs_k).to(tl.int64) * stride_xq
            gacc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
            for k in range(0, tl.cdiv(tl.maximum(k_len, 0), BLOCK_K)):
                mask_k = offs_k < k_len - k * BLOCK_K
                if TRANS:   # [BLOCK_K, BLOCK_N] = W[k rows, n block] -> [BLOCK_N, BLOCK_K]
                    wg = tl.trans(nf4_tile(packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
                                          k_lo + k * BLOCK_K + offs_k, mask_k, pid_n * BLOCK_N, row_len,
                                          row_bytes, BLOCK_N, BS, NESTED, ALIGNED))
                else:       # [BLOCK_N, BLOCK_K] = W[n block, k cols]
                    wg = nf4_tile(packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
                                 offs_n, mask_n, k_lo + k * BLOCK_K, row_len, row_bytes,
                                 BLOCK_K, BS, NESTED, ALIGNED)
                if not UPCAST:  # the weight bnb would dequantize to; products and sums in fp32
                    wg = wg.to(x_ptr.dtype.element_ty)
                wg = wg.to(tl.float32)
                for m in tl.static_range(M_PAD):  # one row at a time: the w tile stays the only big one
                    xg = tl.load(x_ptrs + m * stride_xm, mask=mask_k & (offs_k * 0 + m < M), other=0.0)
                    dot = tl.sum(wg * xg.to(tl.float32)[None, :], axis=1)
                    gacc += tl.where(offs_g[:, None] == m, dot[None, :], 0.0)
                x_ptrs += BLOCK_K * stride_xq
            part_ptrs = part_ptr + (pid_s * M + offs_g.to(tl.int64))[:, None] * P + offs_n[None, :]
            tl.store(part_ptrs, gacc, mask=mask_g[:, None] & mask_n[None, :])
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            acc, xa = k_loop(acc, xa, x_ptr, offs_m.to(tl.int64) * stride_xm, mask_m, stride_xq,
                             x_ptr, 0, 0,
                             packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
                             row_len, row_bytes, a_ptr, 0, 0, mask_r, x_ptr, 0,
                             offs_n, mask_n, pid_n * BLOCK_N, k_lo, k_len,
                             True, NESTED, BS, ALIGNED, TRANS, False, False, UPCAST, INPUT_PRECISION,
                             R_PAD, BLOCK_K)
            part_ptrs = part_ptr + (pid_s * M + offs_m.to(tl.int64))[:, None] * P + offs_n[None, :]
            tl.store(part_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:  # the LoRA column: this slice's x @ A^T, once for all column blocks
        if HAS_LORA:
            offs_d = tl.arange(0, 16)
            lacc = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
            lxa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            lacc, lxa = k_loop(lacc, lxa, x_ptr, offs_m.to(tl.int64) * stride_xm, mask_m, stride_xq,
                             x_ptr, 0, 0,
                             packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
                             row_len, row_bytes, a_ptr, stride_aq, stride_ar, mask_r, x_ptr, 0,
                             offs_d, offs_d < 0, 0, k_lo, k_len,
                             False, False, 1, False, False, True, False, UPCAST, INPUT_PRECISION,
                             R_PAD, BLOCK_K)
            xa_ptrs = xa_part_ptr + (pid_s * M + offs_m.to(tl.int64))[:, None] * R_PAD + offs_r[None, :]
            tl.store(xa_ptrs, lxa, mask=mask_m[:, None])


@triton.jit
def _nf4_splitk_reduce_kernel(
    # pointers: workspaces, epilogue operands, output
    part_ptr, xa_part_ptr, bias_ptr, b_ptr, e_ptr, f_ptr, y_ptr,
    # sizes: part [SPLIT_K, M, P], xa_part [SPLIT_K, M, R_PAD], b [R, P], y [M, P]
    M, P, R, SPLIT_K,
    stride_br, stride_bp, stride_bias, stride_ym, stride_yp, stride_e, stride_f,
    scaling,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_RANK_SCALE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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


# Interpreter: fixed small tiles and 3 splits, so the tests' odd K spans full, partial and empty
# splits.
_INTERPRET_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 3}
_REDUCE_BLOCK_N = 16  # 4096 outputs -> 256 programs: the reduce fills the GPU too


def decode_config(M: int, P: int, Q: int, has_lora: bool, interpret: bool = False) -> dict:
    """The launch config of the decode kernel for M rows, P outputs and a Q-long reduction: the
    arch table's GEMV (M <= 4) or split-K (M <= 16) tiles, SPLIT_K sized by `configs.decode_split`
    (>= 264 programs on a 4096x4096 layer where K allows); keys BLOCK_N, BLOCK_K, SPLIT_K,
    k_per_split, num_warps, num_stages, GEMV, M_PAD."""
    gemv = M <= GEMV_MAX_M
    if interpret:
        cfg = dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
        split = _INTERPRET_CONFIG["SPLIT_K"]
        per_split = triton.cdiv(triton.cdiv(Q, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    else:
        table = configs.table()
        cfg = dict(table.NF4_GEMV if gemv else table.NF4_SPLITK)
        split, per_split = configs.decode_split(P, Q, cfg["BLOCK_N"], cfg["BLOCK_K"], int(has_lora))
    return dict(cfg, SPLIT_K=split, k_per_split=per_split, GEMV=gemv,
                M_PAD=triton.next_power_of_2(M) if gemv else 1)


def launch_split_k(inp, state, is_nested, blocksize, stride_wq, stride_wp, P, bias, at, bt, scaling,
                   out, rank_scale=None, col_scale=None):
    """out[M, P] = f * (inp[M, Q] @ dequant(W)[Q, P] + scaling * ((inp @ at) * e) @ bt) + bias
    for 1 <= M <= 16, in two launches (see the module docstring).

    Called by `nf4._launch` after it validated everything and allocated `out` ([M, P], any
    strides); `state` is `nf4._state_args`'s tuple; (stride_wq, stride_wp) W^(T)'s strides in the
    flat [N*K] index ((1, K) forward, (K, 1) dX); at [Q, R] and bt [R, P] any strides, or None.
    """
    M, Q = inp.shape
    if not 1 <= M <= DECODE_MAX_M:
        raise ValueError(f"launch_split_k: M must be in [1, {DECODE_MAX_M}], got {M}")
    has_lora = at is not None
    R = at.shape[1] if has_lora else 1
    R_PAD = max(16, triton.next_power_of_2(R))
    interpret = interpreting(_nf4_splitk_fwd_kernel)
    dots = dot_meta(_nf4_splitk_fwd_kernel, inp.dtype)
    trans = stride_wq != 1
    row_len = stride_wq if trans else stride_wp
    nf4, row_bytes = nf4_meta(blocksize, row_len)
    cfg = decode_config(M, P, Q, has_lora, interpret)
    split_k, per_split = cfg.pop("SPLIT_K"), cfg.pop("k_per_split")
    if interpret:
        cfg.pop("num_warps"), cfg.pop("num_stages")
    part = torch.empty((split_k, M, P), dtype=torch.float32, device=inp.device)
    xa_part = torch.empty((split_k, M, R_PAD) if has_lora else (1,), dtype=torch.float32,
                          device=inp.device)
    grid = (triton.cdiv(P, cfg["BLOCK_N"]) + has_lora, split_k)
    _nf4_splitk_fwd_kernel[grid](
        inp, *state, at if has_lora else inp, part, xa_part,
        M, P, Q, R, triton.next_power_of_2(M), per_split, row_len, row_bytes,
        inp.stride(0), inp.stride(1),
        at.stride(0) if has_lora else 0, at.stride(1) if has_lora else 0,
        NESTED=is_nested, TRANS=trans, HAS_LORA=has_lora, R_PAD=R_PAD, BLOCK_M=_BLOCK_M,
        **nf4, **dots, **cfg,
    )

    dummy = inp
    reduce_n = 32 if interpret else _REDUCE_BLOCK_N
    _nf4_splitk_reduce_kernel[(triton.cdiv(P, reduce_n),)](
        part, xa_part, dummy if bias is None else bias, bt if has_lora else dummy,
        dummy if rank_scale is None else rank_scale, dummy if col_scale is None else col_scale, out,
        M, P, R, split_k,
        bt.stride(0) if has_lora else 0, bt.stride(1) if has_lora else 0,
        0 if bias is None else bias.stride(0),
        out.stride(0), out.stride(1),
        0 if rank_scale is None else rank_scale.stride(0),
        0 if col_scale is None else col_scale.stride(0),
        float(scaling),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_RANK_SCALE=rank_scale is not None,
        HAS_COL_SCALE=col_scale is not None, R_PAD=R_PAD, **dots,
        BLOCK_M=_BLOCK_M, BLOCK_N=reduce_n,
    )
    return out
