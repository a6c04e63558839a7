"""NF4 (bitsandbytes' 4-bit NormalFloat) kernels: dequantize, and the fused dequant-matmul with
an optional LoRA epilogue, forward and input gradient.

The weight is never materialized: each tile of the [N, K] weight is decoded in registers from
the packed bytes (even element in the high nibble), the 16-entry code table and its block's scale.
With double quantization the scale itself is decoded in the same place,
``code8[qabsmax[b]] * nested_absmax[b // 256] + offset``, so there is no separate absmax pass.
NF4 blocks run over the flattened row-major weight, so a block may straddle rows: the decoder
works from the flat element index ``n * K + k`` and never assumes K is a multiple of anything.

One generic kernel serves both directions from strides in that flat index:

  forward `nf4_linear_fwd`:    out[M, N] = x[M, K] @ W^T + b + s (x A^T) B^T   (Q = K, P = N)
  backward `nf4_linear_bwd_dx`: dX[M, K] = dY[M, N] @ W + s (dY B) A          (Q = N, P = K)

(the transposed access only swaps which flat-index stride belongs to the reduction axis). The LoRA
term is the epilogue of `kernels/lora.py`: the K-loop also accumulates ``inp @ At`` into an fp32
[BLOCK_M, R_PAD] tile that meets the Bt tile after the loop, so a QLoRA layer is one launch.

Two paths, picked by `path_for(M)` in `_launch` for forward and dX alike: the tiled kernel here
for M > 16, and for decode (M <= 16) the split-K GEMV of `kernels/nf4_decode.py`, which fills the
GPU by splitting the reduction axis as well. Not done yet (see the issue): a Triton quantizer
(quantizing runs the PyTorch reference).

jit code and launchers only: no autograd, no nn (see fastpeft/ops.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels.tiles import INTERPRET_CONFIG, gpu_configs, grouped_tile, interpreting, lora_epilogue

__all__ = ["nf4_dequantize", "nf4_linear_fwd", "nf4_linear_bwd_dx", "path_for", "DECODE_MAX_M"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NESTED_BLOCKSIZE = 256
DECODE_MAX_M = 16  # the split-K decode path serves M <= this; the tiled kernel the rest


@triton.jit
def _nf4_decode(packed_ptr, absmax_ptr, code4_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
                idx, mask, blocksize, NESTED: tl.constexpr):
    """fp32 weight values at flat indices `idx` (int64, any shape): code4[nibble] * scale."""
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((idx & 1) == 0, byte >> 4, byte & 0xF)
    value = tl.load(code4_ptr + nibble, mask=mask, other=0.0)
    block = idx // blocksize
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code8_ptr + q, mask=mask, other=0.0)
        scale = scale * tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return value * scale


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code4_ptr, code8_ptr, nested_absmax_ptr,
                        offset_ptr, out_ptr, numel, blocksize,
                        NESTED: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = code4[q_i] * scale[i // blocksize] for the flat weight, cast once at the store."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    w = _nf4_decode(packed_ptr, absmax_ptr, code4_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
                    idx, mask, blocksize, NESTED)
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_linear_fwd_kernel(
    # pointers: activations, NF4 state, bias, LoRA factors, output
    x_ptr, packed_ptr, absmax_ptr, code4_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
    bias_ptr, a_ptr, b_ptr, y_ptr,
    e_ptr, f_ptr,                   # rank scale [R], column scale [P] (read only when switched on)
    # sizes: x [M, Q], W^(T) [Q, P], a [Q, R], b [R, P], y [M, P]; M_BUCKET only keys the autotuner
    M, P, Q, R, M_BUCKET, blocksize,
    # strides: x, y, a, b, bias in elements; the weight's in its flat [N*K] index
    stride_xm, stride_xq,
    stride_wq, stride_wp,
    stride_aq, stride_ar,
    stride_br, stride_bp,
    stride_bias,
    stride_ym, stride_yp,
    stride_e, stride_f,
    scaling,
    # meta-parameters
    NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
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
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < P
    mask_r = offs_r < R

    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xq
    w_idx = offs_k.to(tl.int64)[:, None] * stride_wq + offs_n.to(tl.int64)[None, :] * stride_wp
    a_ptrs = a_ptr + offs_k[:, None] * stride_aq + offs_r[None, :] * stride_ar

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k in range(0, tl.cdiv(Q, BLOCK_K)):
        mask_k = offs_k < Q - k * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = _nf4_decode(packed_ptr, absmax_ptr, code4_ptr, code8_ptr, nested_absmax_ptr,
                        offset_ptr, w_idx, mask_k[:, None] & mask_n[None, :], blocksize, NESTED)
        if UPCAST:
            x = x.to(tl.float32)
        else:
            w = w.to(x.dtype)  # the weight bnb would dequantize to, and tensor-core operands
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        if HAS_LORA:
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
            xa = tl.dot(x, a, xa, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_aq
        x_ptrs += BLOCK_K * stride_xq
        w_idx += BLOCK_K * stride_wq

    acc = lora_epilogue(acc, xa, b_ptr, e_ptr, f_ptr, bias_ptr, offs_r, offs_n, mask_r, mask_n,
                        stride_br, stride_bp, stride_e, stride_f, stride_bias, scaling,
                        HAS_LORA, HAS_RANK_SCALE, HAS_COL_SCALE, HAS_BIAS, UPCAST, INPUT_PRECISION)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yp
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Autotune space on a GPU: BLOCK_M = 16 with long K tiles for decode, larger tiles for prefill.
_GPU_SHAPES = [
    # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
    (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 256, 4, 3), (16, 128, 64, 4, 4),
    (32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
    (128, 64, 64, 8, 3),
]
_DEQUANT_BLOCK = 1024

_nf4_linear_fwd_kernel_tuned = triton.autotune(
    configs=gpu_configs(_GPU_SHAPES), key=["M_BUCKET", "P", "Q", "R_PAD", "NESTED", "HAS_LORA"],
)(_nf4_linear_fwd_kernel)


def _interpreting() -> bool:
    return interpreting(_nf4_linear_fwd_kernel)


def _check_device(t: torch.Tensor) -> None:
    if not _interpreting() and not t.is_cuda:
        raise ValueError(f"tensor on {t.device}: Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before triton is imported)")


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
    if nested is None:
        return (packed, absmax, code4, absmax, absmax, absmax), False
    code8, nested_absmax, offset = nested
    if code8.dtype != torch.float32 or code8.numel() != 256:
        raise ValueError(f"code8: expected fp32 [256], got {code8.dtype} {list(code8.shape)}")
    if nested_absmax.numel() != -(-nblocks // _NESTED_BLOCKSIZE) or offset.numel() != 1:
        raise ValueError(f"nested_absmax/offset: expected {-(-nblocks // _NESTED_BLOCKSIZE)} and 1 "
                         f"elements, got {nested_absmax.numel()} and {offset.numel()}")
    return (packed, absmax, code4, code8, nested_absmax.float(), offset.float().reshape(1)), True


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
    numel = shape[0] * shape[1]
    if numel == 0:
        return out
    extra = {} if _interpreting() else {"enable_fp_fusion": False}
    _nf4_dequant_kernel[(triton.cdiv(numel, _DEQUANT_BLOCK),)](
        *state, out, numel, blocksize, NESTED=is_nested, BLOCK=_DEQUANT_BLOCK, **extra)
    return out


def path_for(M: int) -> str:
    """Which kernel serves M rows: "decode" (split-K GEMV, nf4_decode.py) or "tiled" (here)."""
    return "decode" if M <= DECODE_MAX_M else "tiled"


def _launch(inp, state, is_nested, blocksize, stride_wq, stride_wp, P, bias, at, bt, scaling, out,
            rank_scale=None, col_scale=None):
    """out[M, P] = f * (inp[M, Q] @ dequant(W)[Q, P] + scaling * ((inp @ at) * e) @ bt) + bias."""
    M, Q = inp.shape
    if inp.dtype not in _DTYPES:
        raise ValueError(f"x: dtype must be float32|float16|bfloat16, got {inp.dtype}")
    _check_device(inp)
    if out is None:
        out = torch.empty((M, P), dtype=inp.dtype, device=inp.device)
    elif tuple(out.shape) != (M, P) or out.dtype != inp.dtype:
        raise ValueError(f"out: expected [{M}, {P}] {inp.dtype}, got {list(out.shape)} {out.dtype}")
    if M == 0 or P == 0:
        return out
    if path_for(M) == "decode":
        from fastpeft.kernels import nf4_decode  # here, not at the top: it imports _nf4_decode from us

        return nf4_decode.launch_split_k(inp, state, is_nested, blocksize, stride_wq, stride_wp, P, bias,
                                         at, bt, scaling, out, rank_scale, col_scale)
    has_lora, has_bias = at is not None, bias is not None
    R = at.shape[1] if has_lora else 1
    interpret = _interpreting()

    def _grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(P, meta["BLOCK_N"]),)

    meta = dict(
        NESTED=is_nested, HAS_BIAS=has_bias, HAS_LORA=has_lora,
        HAS_RANK_SCALE=rank_scale is not None, HAS_COL_SCALE=col_scale is not None,
        R_PAD=max(16, triton.next_power_of_2(R)),
        UPCAST=interpret and inp.dtype == torch.bfloat16,
        INPUT_PRECISION="ieee" if inp.dtype == torch.float32 else "tf32",
    )
    kernel = _nf4_linear_fwd_kernel if interpret else _nf4_linear_fwd_kernel_tuned
    if interpret:
        meta.update(INTERPRET_CONFIG)
    dummy = inp
    kernel[_grid](
        inp, *state, bias if has_bias else dummy, at if has_lora else dummy,
        bt if has_lora else dummy, out,
        dummy if rank_scale is None else rank_scale, dummy if col_scale is None else col_scale,
        M, P, Q, R, triton.next_power_of_2(M), blocksize,
        inp.stride(0), inp.stride(1),
        stride_wq, stride_wp,
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
