"""Multi-adapter LoRA linear: every token may use a different adapter, base GEMM included.

    y[m] = x[m] W^T + b + s[id_m] (x[m] A_{id_m}^T) B_{id_m}^T      (id_m = -1: no LoRA term)

The adapters come from a bank (fastpeft/multi.py): all adapters' A rows stacked in one
``lora_a [R_total, K]`` buffer, their B^T rows in ``lora_b [R_total, N]``, adapter i at rows
``offsets[i] : offsets[i] + ranks[i]`` (each at its own rank: nothing is padded in memory) with
scale ``scalings[i]``. A rank of 0 means "not in this layer": base GEMM only, as for id -1.

Two kernels, one launch per layer each:
  grouped  (SGMV-style, prefill): tokens sorted by adapter into segments (``perm``,
           ``seg_start``, ``seg_adapter``); a program owns BLOCK_M tokens of ONE segment, so both
           LoRA GEMMs are `tl.dot`s on tiles of that segment's adapter, fused into the base GEMM's
           K-loop and epilogue exactly like kernels/lora.py. Grid: (segments, blocks of the
           longest segment, column blocks); programs past their segment's end do nothing.
  gathered (BGMV-style, decode): one adapter id per token (``token_ids``); each token's A and B
           rows are gathered into [BLOCK_M, R_PAD, *] register tiles and reduced on the CUDA
           cores. The grid depends only on M and N, so a decode step can be captured in a graph.
Heterogeneous ranks: R_PAD is the bank's largest rank rounded up to a power of two >= 16 (tl.dot
needs >= 16); the rank dimension is masked per adapter, never padded by copying weights.
NF4 base (multi-tenant QLoRA): the grouped kernel decodes each [BLOCK_K, BLOCK_N] tile of the
base in registers with `_common.nf4_tile` (constexpr NF4), so the 4-bit weight is never
materialized. The gathered (decode) launcher runs the base through kernels/nf4.py (its split-K
GEMV at M <= 16) into the output, then adds the gathered LoRA terms onto it (BASE_IN_Y).

jit code and launchers only: no autograd, no nn (see fastpeft/ops.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels import configs
from fastpeft.kernels._common import (DTYPES, INTERPRET_CONFIG, alloc_out, check_device, dot_meta, interpreting,
                                      lora_epilogue, nf4_meta, nf4_tile)
from fastpeft.kernels.nf4 import _state_args, nf4_linear_fwd

__all__ = ["multi_lora_grouped_fwd", "multi_lora_gathered_fwd", "rank_pad"]

# Fixed launch settings (no autotune: the grouped grid depends on BLOCK_M, which the batch
# metadata does not know; and autotuning in a decode loop would break graph capture).


def grouped_config(dtype: torch.dtype) -> dict:
    """The arch table's grouped (prefill) tiles; fp32 ("ieee" dots on FMA) on twice the warps and
    half the K tile, where the table's tiles spilled in the static check."""
    cfg = dict(configs.table().MULTI_GROUPED)
    if dtype == torch.float32:
        cfg["num_warps"], cfg["BLOCK_K"] = 8, max(16, cfg["BLOCK_K"] // 2)
    return cfg


def gathered_config(r_pad: int) -> dict:
    """The arch table's gathered (decode) tiles, BLOCK_K cut so the [BLOCK_M, R_PAD, BLOCK_K]
    register tile of gathered A rows stays <= 64 fp32 registers per thread (no spills at R_PAD 64)."""
    cfg = dict(configs.table().MULTI_GATHERED)
    budget = 64 * 32 * cfg["num_warps"]
    while cfg["BLOCK_K"] > 16 and cfg["BLOCK_M"] * r_pad * cfg["BLOCK_K"] > budget:
        cfg["BLOCK_K"] //= 2
    if cfg["BLOCK_M"] * r_pad * cfg["BLOCK_K"] > budget:
        cfg["num_warps"] = 8
    return cfg


def rank_pad(max_rank: int) -> int:
    """The kernels' rank tile: max(16, next power of two of the bank's largest rank)."""
    return max(16, triton.next_power_of_2(max(1, int(max_rank))))


@triton.jit
def _base_tile(w_ptrs, packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
               offs_n, k0, mask_k, mask_n, K, row_bytes, NF4: tl.constexpr, NESTED: tl.constexpr,
               BS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile of W^T at rows k0 + [0, BLOCK_K), columns offs_n: loaded from
    the dense weight (`w_ptrs`), or from the NF4 state by `_common.nf4_tile`, in w_ptrs' element
    type either way (with an NF4 base w_ptrs points at x: the activation dtype, the weight bnb
    would dequantize to). Both arms yield one type: the compiler rejects a constexpr branch whose
    arms differ."""
    if NF4:
        w = tl.trans(nf4_tile(packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
                              offs_n, mask_n, k0, K, row_bytes, BLOCK_K, BS, NESTED, ALIGNED))
        w = w.to(w_ptrs.dtype.element_ty)
    else:
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    return w


@triton.jit
def _multi_lora_grouped_fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr,
    packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,  # NF4 base only
    perm_ptr, seg_start_ptr, seg_adapter_ptr,       # int32 [M], [S + 1], [S]
    offsets_ptr, ranks_ptr, scalings_ptr,           # int32 [I], int32 [I], fp32 [I]
    # sizes: x [M, K], w [N, K], a [R_total, K], b [R_total, N], y [M, N]
    N, K, row_bytes,                                # row_bytes = K // 2: NF4 only
    # strides, in elements
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_br, stride_bn,
    stride_bias,
    stride_ym, stride_yn,
    # meta-parameters
    R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, NF4: tl.constexpr, NESTED: tl.constexpr,
    BS: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows perm[seg_start[s] + pid_m * BLOCK_M + i] of y for segment s, columns of pid_n."""
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    first = start + pid_m * BLOCK_M
    if first < end:
        adapter = tl.load(seg_adapter_ptr + seg)
        has = adapter >= 0
        slot = tl.maximum(adapter, 0)
        rank = tl.load(ranks_ptr + slot, mask=has, other=0)
        offset = tl.load(offsets_ptr + slot, mask=has, other=0)
        scaling = tl.load(scalings_ptr + slot, mask=has, other=0.0)

        pos = first + tl.arange(0, BLOCK_M)
        mask_m = pos < end
        tok = tl.load(perm_ptr + pos, mask=mask_m, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, R_PAD)
        mask_n = offs_n < N
        mask_r = offs_r < rank

        x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        a_ptrs = a_ptr + (offset + offs_r).to(tl.int64)[None, :] * stride_ar + offs_k[:, None] * stride_ak
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            mask_k = offs_k < K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = _base_tile(w_ptrs, packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
                           offs_n, k * BLOCK_K, mask_k, mask_n, K, row_bytes, NF4, NESTED, BS, ALIGNED,
                           BLOCK_K)
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                a = a.to(tl.float32)
            w = w.to(x.dtype)
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
            xa = tl.dot(x, a, xa, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
            a_ptrs += BLOCK_K * stride_ak

        acc = lora_epilogue(acc, xa, b_ptr + offset.to(tl.int64) * stride_br, b_ptr, b_ptr, bias_ptr,
                            offs_r, offs_n, mask_r, mask_n, stride_br, stride_bn, 0, 0, stride_bias,
                            scaling, True, False, False, HAS_BIAS, UPCAST, INPUT_PRECISION)
        y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _multi_lora_gathered_fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr,
    ids_ptr,                                        # int32 [M], -1 = no adapter
    offsets_ptr, ranks_ptr, scalings_ptr,           # int32 [I], int32 [I], fp32 [I]
    # sizes: x [M, K], w [N, K], a [R_total, K], b [R_total, N], y [M, N]
    M, N, K,
    # strides, in elements
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_br, stride_bn,
    stride_bias,
    stride_ym, stride_yn,
    # meta-parameters
    R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BASE_IN_Y: tl.constexpr,        # y already holds the base output (NF4 base): add the LoRA term
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[BLOCK_M tokens, BLOCK_N columns]: base by tl.dot (or read from y), each token's LoRA term
    gathered."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]

    ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)
    has = ids >= 0
    slot = tl.maximum(ids, 0)
    rank = tl.load(ranks_ptr + slot, mask=has, other=0)                 # [BLOCK_M]
    offset = tl.load(offsets_ptr + slot, mask=has, other=0).to(tl.int64)
    scaling = tl.load(scalings_ptr + slot, mask=has, other=0.0)
    mask_mr = offs_r[None, :] < rank[:, None]                           # [BLOCK_M, R_PAD]
    rows = offset[:, None] + offs_r[None, :]                            # bank rows per token

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    a_ptrs = a_ptr + rows[:, :, None] * stride_ar + offs_k[None, None, :] * stride_ak
    if BASE_IN_Y:
        acc = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        mask_k = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_mr[:, :, None] & mask_k[None, None, :], other=0.0)
        xf = x.to(tl.float32)
        if not BASE_IN_Y:
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                x = xf
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        xa += tl.sum(xf[:, None, :] * a.to(tl.float32), axis=2)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak

    b = tl.load(b_ptr + rows[:, :, None] * stride_br + offs_n[None, None, :] * stride_bn,
                mask=mask_mr[:, :, None] & mask_n[None, None, :], other=0.0)
    acc += scaling[:, None] * tl.sum(xa[:, :, None] * b.to(tl.float32), axis=1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _base(x2d, weight, nf4) -> tuple:
    """(N, kernel arguments of the base weight, NF4/NESTED meta) for a dense `weight` [N, K] or,
    with weight None, `nf4` = (packed, absmax, (N, K), blocksize, nested, code4) (see kernels/nf4.py)."""
    K = x2d.shape[1]
    if (weight is None) == (nf4 is None):
        raise ValueError("pass the base as a dense weight or as nf4=(...), exactly one of them")
    if nf4 is None:
        N = weight.shape[0]
        if tuple(weight.shape) != (N, K) or weight.dtype != x2d.dtype or weight.device != x2d.device:
            raise ValueError(f"weight: expected [N, {K}] {x2d.dtype} on {x2d.device}, got "
                             f"{list(weight.shape)} {weight.dtype} on {weight.device}")
        return N, (weight, weight.stride(0), weight.stride(1), *([weight] * 5), 0), dict(NF4=False, NESTED=False, BS=1, ALIGNED=False)
    packed, absmax, shape, blocksize, nested, code4 = nf4
    N = shape[0]
    if shape[1] != K or packed.device != x2d.device:
        raise ValueError(f"nf4: a weight of shape {list(shape)} on {packed.device} does not fit x2d "
                         f"{list(x2d.shape)} on {x2d.device}")
    state, is_nested = _state_args(packed, absmax, shape, blocksize, nested, code4)
    nf4_constexprs, row_bytes = nf4_meta(blocksize, K)
    return N, (x2d, 0, 0, *state, row_bytes), dict(NF4=True, NESTED=is_nested, **nf4_constexprs)


def _prepare(kernel, x2d, weight, nf4, bias, lora_a, lora_b, offsets, ranks, scalings, out):
    """Shared checks and output allocation; returns (out, interpret, base arguments, meta)."""
    if x2d.dim() != 2:
        raise ValueError(f"x2d: expected [M, K], got {list(x2d.shape)}")
    if x2d.dtype not in DTYPES:
        raise ValueError(f"x2d: dtype must be float32|float16|bfloat16, got {x2d.dtype}")
    M, K = x2d.shape
    N, base, base_meta = _base(x2d, weight, nf4)
    for name, t, shape in (("lora_a", lora_a, (lora_a.shape[0], K)),
                           ("lora_b", lora_b, (lora_a.shape[0], N)), ("bias", bias, (N,))):
        if t is None:
            continue
        if tuple(t.shape) != shape or t.dtype != x2d.dtype or t.device != x2d.device:
            raise ValueError(f"{name}: expected {list(shape)} {x2d.dtype} on {x2d.device}, "
                             f"got {list(t.shape)} {t.dtype} on {t.device}")
    for name, t, dtype in (("offsets", offsets, torch.int32), ("ranks", ranks, torch.int32),
                           ("scalings", scalings, torch.float32)):
        if t.dim() != 1 or t.dtype != dtype or t.device != x2d.device or t.shape != offsets.shape:
            raise ValueError(f"{name}: expected [{offsets.shape[0]}] {dtype} on {x2d.device}, "
                             f"got {list(t.shape)} {t.dtype} on {t.device}")
    check_device(kernel, x2d, "x2d")
    out = alloc_out(out, (M, N), x2d)
    meta = dict(HAS_BIAS=bias is not None, **dot_meta(kernel, x2d.dtype), **base_meta)
    return out, interpreting(kernel), base, meta


def multi_lora_grouped_fwd(x2d, weight, bias, lora_a, lora_b, offsets, ranks, scalings, max_rank,
                           perm, seg_start, seg_adapter, num_segments, max_segment,
                           out=None, *, nf4=None):
    """y = x W^T + b + per-segment LoRA, tokens grouped by adapter (SGMV-style, for prefill).

    x2d: [M, K] fp32|fp16|bf16 any strides; weight: [N, K] x2d.dtype any strides (``Conv1D.weight.T``
    is read in place), or None with nf4 = (packed, absmax, (N, K), blocksize, nested, code4), an
    NF4 base as in kernels/nf4.py; bias: [N] or None; lora_a: [R_total, K], lora_b: [R_total, N]
    x2d.dtype (the bank's A rows and B^T rows); offsets, ranks: int32 [I]; scalings: fp32 [I];
    max_rank: python int >= every rank (sets the rank tile); perm: int32 [M] token indices sorted
    by adapter; seg_start: int32 [>= num_segments + 1] segment bounds into perm; seg_adapter: int32
    [>= num_segments] adapter id per segment (-1: base only); num_segments, max_segment: python
    ints (the grid); out: [M, N] x2d.dtype any strides, or None -> out. perm must hold every token
    once (a token missing from it is not written).
    """
    out, interpret, base, meta = _prepare(_multi_lora_grouped_fwd_kernel, x2d, weight, nf4, bias,
                                          lora_a, lora_b, offsets, ranks, scalings, out)
    M, N = out.shape
    if M == 0 or N == 0 or num_segments == 0:
        return out
    cfg = dict(INTERPRET_CONFIG if interpret else grouped_config(x2d.dtype))
    cfg.pop("GROUP_M", None)
    grid = (num_segments, triton.cdiv(max_segment, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    w, stride_wn, stride_wk, *state, row_bytes = base
    _multi_lora_grouped_fwd_kernel[grid](
        x2d, w, x2d if bias is None else bias, lora_a, lora_b, out, *state,
        perm, seg_start, seg_adapter, offsets, ranks, scalings,
        N, x2d.shape[1], row_bytes,
        x2d.stride(0), x2d.stride(1), stride_wn, stride_wk,
        lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        0 if bias is None else bias.stride(0), out.stride(0), out.stride(1),
        R_PAD=rank_pad(max_rank), **meta, **cfg)
    return out


def multi_lora_gathered_fwd(x2d, weight, bias, lora_a, lora_b, offsets, ranks, scalings, max_rank,
                            token_ids, out=None, *, nf4=None):
    """y = x W^T + b + each token's own LoRA term (BGMV-style, for decode).

    Tensors as in `multi_lora_grouped_fwd` (a dense or an NF4 base); token_ids: int32 [M] adapter
    id per token (-1: base only) -> out [M, N] x2d.dtype. The grid depends on M and N only
    (CUDA-graph friendly).

    Dense base: one launch, base GEMM and LoRA term fused. NF4 base: the base (and bias) is
    `nf4.nf4_linear_fwd`'s launch (at M <= 16 its split-K GEMV, which streams the packed weight
    with wide loads over >= 264 programs), written to `out`; then this kernel adds each token's
    LoRA term onto it. A gathered kernel that decoded NF4 itself would stream the weight over
    only ceil(N / BLOCK_N) programs with [BLOCK_N, BLOCK_K] byte tiles too small for wide loads
    (its [BLOCK_M, R_PAD, BLOCK_K] gathered-A tile caps BLOCK_K). The base is rounded to the
    activation dtype once before the LoRA term is added, as PEFT's ``base(x) + lora(x)`` does.
    """
    out, interpret, base, meta = _prepare(_multi_lora_gathered_fwd_kernel, x2d, weight, nf4, bias,
                                          lora_a, lora_b, offsets, ranks, scalings, out)
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    cfg = dict(INTERPRET_CONFIG if interpret else gathered_config(rank_pad(max_rank)))
    cfg.pop("GROUP_M", None)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    base_in_y = nf4 is not None
    if base_in_y:
        packed, absmax, shape, blocksize, nested, code4 = nf4
        nf4_linear_fwd(x2d, packed, absmax, shape, blocksize, nested, bias, None, None, 0.0, code4, out=out)
    w, stride_wn, stride_wk = base[:3]
    for key in ("NF4", "NESTED", "BS", "ALIGNED"):
        meta.pop(key)
    meta["HAS_BIAS"] = bias is not None and not base_in_y
    _multi_lora_gathered_fwd_kernel[grid](
        x2d, w, x2d if bias is None else bias, lora_a, lora_b, out,
        token_ids, offsets, ranks, scalings,
        M, N, x2d.shape[1],
        x2d.stride(0), x2d.stride(1), stride_wn, stride_wk,
        lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        0 if bias is None else bias.stride(0), out.stride(0), out.stride(1),
        R_PAD=rank_pad(max_rank), BASE_IN_Y=base_in_y, **meta, **cfg)
    return out
