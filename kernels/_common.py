"""Triton helpers every kernel shares, and the launchers' common host checks.

jit helpers:
  `grouped_tile`  orders programs so consecutive ones share column blocks of the weight (L2);
  `nf4_tile`      THE NF4 tile loader of every NF4 kernel (tiled GEMM, split-K/GEMV decode,
                  multi-adapter over NF4, backward dX, dequantize), see below;
  `k_loop`        the K-loop over a tile pair, ``acc += inp @ W`` with W dense or NF4, plus the
                  LoRA rank tile ``xa += inp @ A`` and IA3's input scale, over one K range;
  `lora_epilogue` finishes an fp32 accumulator: ``f * (acc + s ((xa * e) @ Bt)) + bias``.

The NF4 tile loader returns W[rows, col0 : col0 + COLS] in fp32 for bitsandbytes' layout (flat
row-major [N, K] weight, even element in the high nibble, one scale per `BS` flat elements):
  ALIGNED (the row length is a multiple of BS, so no block straddles rows; every real layer):
    the packed bytes of the tile are one [ROWS, COLS/2] load, contiguous along each row, so
    the compiler issues 16-byte vector loads when the row pitch in bytes divides by 16 (it is
    passed as its own argument so Triton specializes on it); each byte is read once and both
    nibbles are unpacked from it (`tl.interleave`); each block's scale is read and decoded once
    (double quant: ``code8[q] * nested[b // 256] + offset``) into a [ROWS, COLS/BS] tile and
    broadcast over its block.
  not ALIGNED (blocks straddle rows: odd test shapes): per-element flat index, the same values.
Both look the 4-bit code up in bnb's NF4 table held as compile-time constants (a `tl.where`
tree on the nibble's bits: no gather, no table in memory). The value is ``code * scale`` in fp32,
exactly what bnb's `dequantize_4bit` computes before its single cast.

Host helpers: `interpreting`, `check_device`, `check_tensor`, `alloc_out`, `dot_meta` (UPCAST/INPUT_PRECISION),
`nf4_meta` (BS/ALIGNED/row pitch), used by every launcher.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels.reference import NF4_CODE

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Interpreter: one fixed small config (it cannot autotune). Large-ish tiles keep the number of
# Python-emulated programs low; the tests' odd shapes still span several blocks on each axis.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def interpreting(kernel) -> bool:
    """True when `kernel` was built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_device(kernel, t: torch.Tensor, name: str = "x") -> None:
    if not interpreting(kernel) and not t.is_cuda:
        raise ValueError(f"{name} is on {t.device}: Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before triton is imported)")


def check_tensor(name: str, t: torch.Tensor, shape: tuple, ref: torch.Tensor) -> None:
    """ValueError unless `t` has `shape` and ref's dtype and device."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name}: expected {ref.dtype} on {ref.device}, got {t.dtype} on {t.device}")


def alloc_out(out, shape, ref: torch.Tensor) -> torch.Tensor:
    """`out` checked against ([M, P], ref's dtype and device), or a new tensor."""
    if out is None:
        return torch.empty(tuple(shape), dtype=ref.dtype, device=ref.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != ref.dtype or out.device != ref.device:
        raise ValueError(f"out: expected {list(shape)} {ref.dtype} on {ref.device}, "
                         f"got {list(out.shape)} {out.dtype} on {out.device}")
    return out


def dot_meta(kernel, dtype: torch.dtype) -> dict:
    """UPCAST (interpreter + bf16: fp32 math after each load) and the dot precision (fp32: ieee)."""
    return dict(UPCAST=interpreting(kernel) and dtype == torch.bfloat16,
                INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


def nf4_meta(blocksize: int, row_len: int) -> tuple[dict, int]:
    """(constexprs BS, ALIGNED, the row pitch in bytes) for a weight whose rows hold `row_len`
    elements (K): ALIGNED when no quantization block straddles two rows."""
    aligned = row_len % blocksize == 0 and row_len % 2 == 0
    return dict(BS=int(blocksize), ALIGNED=aligned), row_len // 2


# bnb's NF4 code values as compile-time constants (exact fp32 values, see reference.NF4_CODE).
_Q0: tl.constexpr = tl.constexpr(NF4_CODE[0])
_Q1: tl.constexpr = tl.constexpr(NF4_CODE[1])
_Q2: tl.constexpr = tl.constexpr(NF4_CODE[2])
_Q3: tl.constexpr = tl.constexpr(NF4_CODE[3])
_Q4: tl.constexpr = tl.constexpr(NF4_CODE[4])
_Q5: tl.constexpr = tl.constexpr(NF4_CODE[5])
_Q6: tl.constexpr = tl.constexpr(NF4_CODE[6])
_Q7: tl.constexpr = tl.constexpr(NF4_CODE[7])
_Q8: tl.constexpr = tl.constexpr(NF4_CODE[8])
_Q9: tl.constexpr = tl.constexpr(NF4_CODE[9])
_Q10: tl.constexpr = tl.constexpr(NF4_CODE[10])
_Q11: tl.constexpr = tl.constexpr(NF4_CODE[11])
_Q12: tl.constexpr = tl.constexpr(NF4_CODE[12])
_Q13: tl.constexpr = tl.constexpr(NF4_CODE[13])
_Q14: tl.constexpr = tl.constexpr(NF4_CODE[14])
_Q15: tl.constexpr = tl.constexpr(NF4_CODE[15])


@triton.jit
def nf4_lookup(nib):
    """fp32 NF4 code value of 4-bit codes `nib` (int32, any shape): a select tree on the bits."""
    b0 = (nib & 1) != 0
    b1 = (nib & 2) != 0
    b2 = (nib & 4) != 0
    b3 = (nib & 8) != 0
    v0 = tl.where(b1, tl.where(b0, _Q3, _Q2), tl.where(b0, _Q1, _Q0))
    v1 = tl.where(b1, tl.where(b0, _Q7, _Q6), tl.where(b0, _Q5, _Q4))
    v2 = tl.where(b1, tl.where(b0, _Q11, _Q10), tl.where(b0, _Q9, _Q8))
    v3 = tl.where(b1, tl.where(b0, _Q15, _Q14), tl.where(b0, _Q13, _Q12))
    return tl.where(b3, tl.where(b2, v3, v2), tl.where(b2, v1, v0))


@triton.jit
def nf4_scale(absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr, block, mask, NESTED: tl.constexpr):
    """fp32 scales of quantization blocks `block` (int64, any shape), double quant decoded."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code8_ptr + q, mask=mask, other=0.0)
        scale = scale * tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def nf4_tile(packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
             rows, mask_rows, col0, row_len, row_bytes,
             COLS: tl.constexpr, BS: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr):
    """fp32 [ROWS, COLS] = W[rows, col0 : col0 + COLS] of the NF4 weight W [*, row_len]; rows
    outside `mask_rows` and columns >= row_len read as 0. col0 is a multiple of COLS;
    row_bytes = row_len // 2 (used only when ALIGNED)."""
    ROWS: tl.constexpr = rows.shape[0]
    rows64 = rows.to(tl.int64)
    if ALIGNED:
        offs_b = tl.arange(0, COLS // 2)
        # col0 and row_len are multiples of 2 * GRP, so the column mask is constant over runs of
        # GRP bytes; written per run, the compiler sees that and keeps the loads GRP bytes wide
        HALF: tl.constexpr = BS // 2 if BS < COLS else COLS // 2
        GRP: tl.constexpr = HALF if HALF < 16 else 16
        mask_b = mask_rows[:, None] & ((col0 + 2 * GRP * (offs_b // GRP)) < row_len)[None, :]
        byte = tl.load(packed_ptr + rows64[:, None] * row_bytes + (col0 // 2 + offs_b)[None, :],
                       mask=mask_b, other=0).to(tl.int32)
        vals = tl.interleave(nf4_lookup(byte >> 4), nf4_lookup(byte & 15))    # even k: high nibble
        SPAN: tl.constexpr = BS if BS < COLS else COLS                         # elements per scale
        NB: tl.constexpr = COLS // SPAN
        offs_s = tl.arange(0, NB)
        block = rows64[:, None] * (row_len // BS) + (col0 // BS + offs_s)[None, :]
        mask_s = mask_rows[:, None] & ((col0 + offs_s * SPAN) < row_len)[None, :]
        scale = nf4_scale(absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr, block, mask_s, NESTED)
        w = tl.reshape(tl.reshape(vals, (ROWS, NB, SPAN)) * scale[:, :, None], (ROWS, COLS))
    else:
        cols = col0 + tl.arange(0, COLS)
        mask = mask_rows[:, None] & (cols < row_len)[None, :]
        idx = rows64[:, None] * row_len + cols[None, :]
        byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
        value = nf4_lookup(tl.where((idx & 1) == 0, byte >> 4, byte & 15))
        w = value * nf4_scale(absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr, idx // BS, mask, NESTED)
    return w


@triton.jit
def grouped_tile(M, P, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M row blocks walked column-block by column-block."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(P, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def k_loop(
    acc, xa,                        # fp32 [BLOCK_M, BLOCK_N] and [BLOCK_M, R_PAD] accumulators
    x_ptr, x_rows, mask_m, stride_xq,           # inp rows: x_rows int64 [BLOCK_M] row offsets
    w_ptr, stride_wq, stride_wp,                # dense W [Q, P] (NF4 off)
    packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr, row_len, row_bytes,  # NF4
    a_ptr, stride_aq, stride_ar, mask_r,        # LoRA down-projection A [Q, R] (HAS_LORA)
    g_ptr, stride_g,                            # input scale g [Q] (HAS_IN_SCALE)
    offs_n, mask_n, n0, k_lo, k_len,            # the column block; this K range [k_lo, k_lo + k_len)
    NF4: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, ALIGNED: tl.constexpr,
    TRANS: tl.constexpr,            # NF4: Q runs along W's rows (dX), else along its columns (forward)
    HAS_LORA: tl.constexpr, HAS_IN_SCALE: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc += (inp * g)[:, K] @ W[K, block], xa += inp[:, K] @ A[K] over the K range; returns both."""
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    x_ptrs = x_ptr + x_rows[:, None] + (k_lo + offs_k)[None, :] * stride_xq
    w_ptrs = w_ptr + (k_lo + offs_k)[:, None] * stride_wq + offs_n[None, :] * stride_wp
    a_ptrs = a_ptr + (k_lo + offs_k)[:, None] * stride_aq + offs_r[None, :] * stride_ar
    for k in range(0, tl.cdiv(tl.maximum(k_len, 0), BLOCK_K)):
        mask_k = offs_k < k_len - k * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if NF4:
            if TRANS:   # W^T tile [BLOCK_K, BLOCK_N] = W[k rows, n0 : n0 + BLOCK_N]
                w = nf4_tile(packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
                             k_lo + k * BLOCK_K + offs_k, mask_k, n0, row_len, row_bytes,
                             BLOCK_N, BS, NESTED, ALIGNED)
            else:       # W tile [BLOCK_N, BLOCK_K] = W[offs_n, k cols], transposed
                w = tl.trans(nf4_tile(packed_ptr, absmax_ptr, code8_ptr, nested_absmax_ptr, offset_ptr,
                                      offs_n, mask_n, k_lo + k * BLOCK_K, row_len, row_bytes,
                                      BLOCK_K, BS, NESTED, ALIGNED))
        else:
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(x.dtype)  # NF4: the weight bnb would dequantize to, and tensor-core operands
        if HAS_IN_SCALE:  # fp32 product, rounded once to the operand dtype (as PEFT's IA3 does)
            g = tl.load(g_ptr + (k_lo + k * BLOCK_K + offs_k) * stride_g, mask=mask_k, other=0.0)
            x = (x.to(tl.float32) * g.to(tl.float32)[None, :]).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        if HAS_LORA:
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
            xa = tl.dot(x, a, xa, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xq
        w_ptrs += BLOCK_K * stride_wq
        a_ptrs += BLOCK_K * stride_aq
    return acc, xa


@triton.jit
def lora_epilogue(
    acc, xa,                          # fp32 [BLOCK_M, BLOCK_N] base GEMM, fp32 [BLOCK_M, R_PAD] x @ A^T
    b_ptr, e_ptr, f_ptr, bias_ptr,    # up-projection Bt [R, P], rank scale [R], column scale [P], bias [P]
    offs_r, offs_n, mask_r, mask_n,
    stride_br, stride_bp, stride_e, stride_f, stride_bias,
    scaling,
    HAS_LORA: tl.constexpr, HAS_RANK_SCALE: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``f * (acc + scaling * ((xa * e) @ Bt)) + bias`` in fp32 (each term only when switched on)."""
    if HAS_LORA:
        b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bp,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if HAS_RANK_SCALE:  # in fp32, before the tile is rounded to the operand dtype
            e = tl.load(e_ptr + offs_r * stride_e, mask=mask_r, other=0.0)
            xa = xa * e.to(tl.float32)[None, :]
        if UPCAST:
            b = b.to(tl.float32)
        else:
            xa = xa.to(b.dtype)  # operand dtype, so tl.dot stays on tensor cores for fp16/bf16
        acc += scaling * tl.dot(xa, b, input_precision=INPUT_PRECISION)
    if HAS_COL_SCALE:
        f = tl.load(f_ptr + offs_n * stride_f, mask=mask_n, other=0.0)
        acc = acc * f.to(tl.float32)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    return acc
