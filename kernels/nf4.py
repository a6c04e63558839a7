"""NF4 (bitsandbytes' 4-bit NormalFloat) kernels: dequantize, and the fused dequant-matmul with
an optional LoRA epilogue, forward and input gradient.

The weight is never materialized: every tile of the [N, K] weight comes from `_common.nf4_tile`,
the one NF4 tile loader (packed bytes as wide vector loads, each byte once with both nibbles
unpacked, each block's scale decoded once with double quant, the code table as constants).
NF4 blocks run over the flattened row-major weight, so a block may straddle rows: the loader
then works from the flat element index ``n * K + k`` (ALIGNED off), never assuming K is a
multiple of anything.

One generic kernel serves both directions (TRANS picks which axis of W the reduction runs on):

  forward `nf4_linear_fwd`:    out[M, N] = x[M, K] @ W^T + b + s (x A^T) B^T   (Q = K, P = N)
  backward `nf4_linear_bwd_dx`: dX[M, K] = dY[M, N] @ W + s (dY B) A          (Q = N, P = K)

The K-loop is `_common.k_loop` (shared with kernels/lora.py, the decode and the multi-adapter
kernels): it also accumulates ``inp @ At`` into an fp32 [BLOCK_M, R_PAD] tile that meets the Bt
tile in `_common.lora_epilogue`, so a QLoRA layer is one launch.

Two paths, picked by `path_for(M)` in `_launch` for forward and dX alike: the tiled kernel here
for M > 16 (autotuned over `configs` NF4_TILED of the arch), and for decode (M <= 16) the GEMV /
split-K kernels of `kernels/nf4_decode.py`. A Triton quantizer is not done (quantizing runs the
PyTorch reference).

jit code and launchers only: no autograd, no nn (see fastpeft/ops.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels import configs, nf4_decode
from fastpeft.kernels._common import (DTYPES, INTERPRET_CONFIG, alloc_out, check_device, dot_meta, grouped_tile,
                                      interpreting, k_loop, lora_epilogue, nf4_meta, nf4_tile)
from fastpeft.kernels.reference import NF4_CODE

__all__ = ["nf4_dequantize", "nf4_linear_fwd", "nf4_linear_bwd_dx", "path_for", "DECODE_MAX_M"]

_DTYPES = DTYPES
_NESTED_BLOCKSIZE = 256
DECODE_MAX_M = nf4_decode.DECODE_MAX_M  # the split-K decode path serves M <= this; the tiled kernel the rest


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr, out_ptr,
                        N, K, row_bytes,
                        NESTED: tl.constexpr, BS: tl.constexpr, ALIGNED: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[N, K] = code4[q] * scale[block] for a [BLOCK_R, BLOCK_C] tile, cast once at the store."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)
    mask_r = rows < N
    w = nf4_tile(packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
                 rows, mask_r, col0, K, row_bytes, BLOCK_C, BS, NESTED, ALIGNED)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & (cols < K)[None, :])


@triton.jit
def _nf4_linear_fwd_kernel(
    # pointers: activations, NF4 state, bias, LoRA factors, output
    x_ptr, packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
    bias_ptr, a_ptr, b_ptr, y_ptr,
    e_ptr, f_ptr,                   # rank scale [R], column scale [P] (read only when switched on)
    # sizes: x [M, Q], W^(T) [Q, P], a [Q, R], b [R, P], y [M, P]; M_BUCKET only keys the autotuner;
    # the NF4 weight W [N, K] has rows of row_len = K elements, row_bytes = K // 2 bytes
    M, P, Q, R, M_BUCKET, row_len, row_bytes,
    # strides, in elements
    stride_xm, stride_xq,
    stride_aq, stride_ar,
    stride_br, stride_bp,
    stride_bias,
    stride_ym, stride_yp,
    stride_e, stride_f,
    scaling,
    # meta-parameters
    NESTED: tl.constexpr, BS: tl.constexpr, ALIGNED: tl.constexpr,
    TRANS: tl.constexpr,            # False: forward (Q = K, P = N); True: dX (Q = N, P = K)
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    HAS_RANK_SCALE: tl.constexpr,   # AdaLoRA's E on the x @ A^T tile
    HAS_COL_SCALE: tl.constexpr,    # DoRA's m / ||W + s B A|| on the pre-bias accumulator
    R_PAD: tl.constexpr,            # max(16, next_power_of_2(R)): tl.dot needs dims >= 16
    UPCAST: tl.constexpr,           # interpreter + bf16: compute in fp32 right after each load
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (no tf32)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = f * (x @ dequant(W)[Q, P] + scaling * ((x @ a) * e) @ b) + bias, fp32 accumulation."""
    pid_m, pid_n = grouped_tile(M, P, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < P
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    acc, xa = k_loop(acc, xa, x_ptr, offs_m.to(tl.int64) * stride_xm, mask_m, stride_xq,
                     x_ptr, 0, 0,
                     packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr, row_len, row_bytes,
                     a_ptr, stride_aq, stride_ar, mask_r, x_ptr, 0,
                     offs_n, mask_n, pid_n * BLOCK_N, 0, Q,
                     True, NESTED, BS, ALIGNED, TRANS, HAS_LORA, False, UPCAST, INPUT_PRECISION,
                     R_PAD, BLOCK_K)
    acc = lora_epilogue(acc, xa, b_ptr, e_ptr, f_ptr, bias_ptr, offs_r, offs_n, mask_r, mask_n,
                        stride_br, stride_bp, stride_e, stride_f, stride_bias, scaling,
                        HAS_LORA, HAS_RANK_SCALE, HAS_COL_SCALE, HAS_BIAS, UPCAST, INPUT_PRECISION)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yp
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_DEQUANT_TILE = (16, 256)   # (BLOCK_R, BLOCK_C): 128 packed bytes per row, 16-byte loads

_nf4_linear_fwd_kernel_tuned = configs.autotuned(
    _nf4_linear_fwd_kernel, "NF4_TILED", key=["M_BUCKET", "P", "Q", "R_PAD", "NESTED", "HAS_LORA"], nf4=True)


def _interpreting() -> bool:
    return interpreting(_nf4_linear_fwd_kernel)


def _check_device(t: torch.Tensor) -> None:
    check_device(_nf4_linear_fwd_kernel, t, "tensor")


def _state_args(packed, absmax, shape, blocksize, nested, code4):
    """Flatten the NF4 state into kernel arguments, checking shapes and dtypes first."""
    N, K = shape
    numel = N * K
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
        raise ValueError(f"packed: expected uint8 with {(numel + 1) // 2} elements for shape "
                         f"{[N, K]}, got {packed.dtype} {list(packed.shape)}")
    nblocks = -(-numel // blocksize)
    want = torch.uint8 if nested is not None else torch.float32
    if absmax.dtype != want or absmax.numel() != nblocks:
        raise ValueError(f"absmax: expected {want} with {nblocks} elements, got {absmax.dtype} "
                         f"{list(absmax.shape)}")
    if code4.dtype != torch.float32 or code4.numel() != 16:
        raise ValueError(f"code4: expected fp32 [16], got {code4.dtype} {list(code4.shape)}")
    # The kernels hold NF4's table as constants (kernels/_common.py); checked where it costs no
    # device sync (a CUDA code4 is bnb's quant_map, which is this table).
    if code4.device.type == "cpu" and code4.reshape(-1).tolist() != list(NF4_CODE):
        raise ValueError("code4: the kernels implement bitsandbytes' NF4 table only, got another table")
    if nested is None:
        return (packed, absmax, absmax, absmax, absmax), False
    code8, nested_absmax, offset = nested
    if code8.dtype != torch.float32 or code8.numel() != 256:
        raise ValueError(f"code8: expected fp32 [256], got {code8.dtype} {list(code8.shape)}")
    if nested_absmax.numel() != -(-nblocks // _NESTED_BLOCKSIZE) or offset.numel() != 1:
        raise ValueError(f"nested_absmax/offset: expected {-(-nblocks // _NESTED_BLOCKSIZE)} and 1 "
                         f"elements, got {nested_absmax.numel()} and {offset.numel()}")
    return (packed, absmax, code8, nested_absmax.float(), offset.float().reshape(1)), True


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int],
                   blocksize: int, dtype: torch.dtype, code4: torch.Tensor,
                   nested=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The [N, K] weight in `dtype`, bit-identical to bnb's `dequantize_4bit` (fp32 products, FMA
    contraction off so the nested scale is a separate multiply and add, one cast at the store).

    packed: uint8 [(N*K+1)//2(, 1)] contiguous; absmax: fp32 [B], or uint8 [B] with `nested =
    (code8 fp32 [256], nested_absmax fp32 [ceil(B/256)], offset fp32 0-d)`; code4: fp32 [16];
    out: [N, K] dtype contiguous or None -> out.
    """
    state, is_nested = _state_args(packed, absmax, shape, blocksize, nested, code4)
    _check_device(packed)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    elif tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out: expected contiguous {list(shape)} {dtype}, got "
                         f"{list(out.shape)} {out.dtype}")
    N, K = shape
    if N * K == 0:
        return out
    extra = {} if _interpreting() else {"enable_fp_fusion": False}
    meta, row_bytes = nf4_meta(blocksize, K)
    block_r, block_c = _DEQUANT_TILE
    block_c = min(block_c, max(16, triton.next_power_of_2(K)))
    _nf4_dequant_kernel[(triton.cdiv(N, block_r), triton.cdiv(K, block_c))](
        *state, out, N, K, row_bytes, NESTED=is_nested, BLOCK_R=block_r, BLOCK_C=block_c, **meta, **extra)
    return out


def path_for(M: int) -> str:
    """Which kernel serves M rows: "decode" (split-K GEMV, nf4_decode.py) or "tiled" (here)."""
    return "decode" if M <= DECODE_MAX_M else "tiled"


def _launch(inp, state, is_nested, blocksize, stride_wq, stride_wp, P, bias, at, bt, scaling, out,
            rank_scale=None, col_scale=None):
    """out[M, P] = f * (inp[M, Q] @ dequant(W)[Q, P] + scaling * ((inp @ at) * e) @ bt) + bias.

    (stride_wq, stride_wp) are W^(T)'s strides in the flat [N*K] index: (1, K) forward, (K, 1) dX.
    """
    M, Q = inp.shape
    if inp.dtype not in _DTYPES:
        raise ValueError(f"x: dtype must be float32|float16|bfloat16, got {inp.dtype}")
    _check_device(inp)
    out = alloc_out(out, (M, P), inp)
    if M == 0 or P == 0:
        return out
    if path_for(M) == "decode":
        return nf4_decode.launch_split_k(inp, state, is_nested, blocksize, stride_wq, stride_wp, P, bias,
                                         at, bt, scaling, out, rank_scale, col_scale)
    has_lora, has_bias = at is not None, bias is not None
    R = at.shape[1] if has_lora else 1
    interpret = _interpreting()
    trans = stride_wq != 1
    row_len = stride_wq if trans else stride_wp
    nf4, row_bytes = nf4_meta(blocksize, row_len)

    def _grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(P, meta["BLOCK_N"]),)

    meta = dict(
        NESTED=is_nested, TRANS=trans, HAS_BIAS=has_bias, HAS_LORA=has_lora,
        HAS_RANK_SCALE=rank_scale is not None, HAS_COL_SCALE=col_scale is not None,
        R_PAD=max(16, triton.next_power_of_2(R)), **nf4, **dot_meta(_nf4_linear_fwd_kernel, inp.dtype),
    )
    kernel = _nf4_linear_fwd_kernel if interpret else _nf4_linear_fwd_kernel_tuned.get()
    if interpret:
        meta.update(INTERPRET_CONFIG)
    dummy = inp
    kernel[_grid](
        inp, *state, bias if has_bias else dummy, at if has_lora else dummy,
        bt if has_lora else dummy, out,
        dummy if rank_scale is None else rank_scale, dummy if col_scale is None else col_scale,
        M, P, Q, R, triton.next_power_of_2(M), row_len, row_bytes,
        inp.stride(0), inp.stride(1),
        at.stride(0) if has_lora else 0, at.stride(1) if has_lora else 0,
        bt.stride(0) if has_lora else 0, bt.stride(1) if has_lora else 0,
        bias.stride(0) if has_bias else 0,
        out.stride(0), out.stride(1),
        0 if rank_scale is None else rank_scale.stride(0),
        0 if col_scale is None else col_scale.stride(0),
        float(scaling),
        **meta,
    )
    return out


def _check_lora(lora_A, lora_B, N, K, ref):
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B: pass both or neither")
    if lora_A is None:
        return
    r = lora_A.shape[0]
    if tuple(lora_A.shape) != (r, K) or tuple(lora_B.shape) != (N, r) or r < 1:
        raise ValueError(f"lora_A must be [r, {K}] and lora_B [{N}, r] (r >= 1), got "
                         f"{list(lora_A.shape)} and {list(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != ref.dtype or t.device != ref.device:
            raise ValueError(f"{name}: expected {ref.dtype} on {ref.device}, got {t.dtype} on {t.device}")


def _check_scales(rank_scale, col_scale, lora_A, N, ref):
    if rank_scale is not None and (lora_A is None or tuple(rank_scale.shape) != (lora_A.shape[0],)):
        raise ValueError(f"rank_scale: expected [r] next to lora_A, got {list(rank_scale.shape)}")
    if col_scale is not None and tuple(col_scale.shape) != (N,):
        raise ValueError(f"col_scale: expected [{N}], got {list(col_scale.shape)}")
    for name, t in (("rank_scale", rank_scale), ("col_scale", col_scale)):
        if t is not None and (t.dtype != ref.dtype or t.device != ref.device):
            raise ValueError(f"{name}: expected {ref.dtype} on {ref.device}, got {t.dtype} on {t.device}")


def nf4_linear_fwd(x2d, packed, absmax, shape, blocksize, nested, bias, lora_A, lora_B, scaling,
                   code4, out=None, *, rank_scale=None, col_scale=None):
    """y = x dequant(Wq)^T + b + s (x A^T) B^T in one launch (the LoRA term only with A and B).

    x2d: [M, K] fp32|fp16|bf16 any strides; NF4 state as in `nf4_dequantize` with shape (N, K);
    bias: [N] x2d.dtype or None; lora_A: [r, K], lora_B: [N, r] x2d.dtype, or both None;
    scaling: float; out: [M, N] x2d.dtype any strides, or None -> out.
    rank_scale: [r] x2d.dtype or None, AdaLoRA's E: ``s ((x A^T) diag(e)) B^T``;
    col_scale: [N] x2d.dtype or None, DoRA's factor: ``y = f * (x W^T + s (x A^T) B^T) + b``.
    """
    if x2d.dim() != 2 or x2d.shape[1] != shape[1]:
        raise ValueError(f"x2d: expected [M, {shape[1]}], got {list(x2d.shape)}")
    N, K = shape
    state, is_nested = _state_args(packed, absmax, shape, blocksize, nested, code4)
    _check_lora(lora_A, lora_B, N, K, x2d)
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != x2d.dtype):
        raise ValueError(f"bias: expected [{N}] {x2d.dtype}, got {list(bias.shape)} {bias.dtype}")
    _check_scales(rank_scale, col_scale, lora_A, N, x2d)
    at = None if lora_A is None else lora_A.t()
    bt = None if lora_B is None else lora_B.t()
    return _launch(x2d, state, is_nested, blocksize, 1, K, N, bias, at, bt, scaling, out, rank_scale, col_scale)


def nf4_linear_bwd_dx(dy2d, packed, absmax, shape, blocksize, nested, lora_A, lora_B, scaling,
                      code4, out=None, *, rank_scale=None):
    """dX = dY dequant(Wq) + s (dY B) A: the same kernel over the transposed weight access.

    dy2d: [M, N] any strides; the rest as in `nf4_linear_fwd` -> out, [M, K] dy2d.dtype.
    rank_scale: ``dX = dY W + s ((dY B) diag(e)) A`` (DoRA's column scale: the caller scales dY).
    """
    if dy2d.dim() != 2 or dy2d.shape[1] != shape[0]:
        raise ValueError(f"dy2d: expected [M, {shape[0]}], got {list(dy2d.shape)}")
    N, K = shape
    state, is_nested = _state_args(packed, absmax, shape, blocksize, nested, code4)
    _check_lora(lora_A, lora_B, N, K, dy2d)
    _check_scales(rank_scale, None, lora_A, N, dy2d)
    return _launch(dy2d, state, is_nested, blocksize, K, 1, K, None, lora_B, lora_A, scaling, out, rank_scale)
