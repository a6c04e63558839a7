"""Tile math shared by the fused linear kernels (dense LoRA in lora.py, NF4 in nf4.py).

`grouped_tile` orders programs so consecutive ones share column blocks of the weight (they stay
in L2); `lora_epilogue` finishes an fp32 accumulator of the base GEMM with the LoRA up-projection
of the register tile ``x @ A^T``, the optional AdaLoRA rank scale e and DoRA column scale f, and
the bias: ``f * (acc + s ((x A^T) * e) @ B^T) + bias``. jit helpers only: no launchers here.
"""
from __future__ import annotations

import triton
import triton.language as tl


def interpreting(kernel) -> bool:
    """True when `kernel` was built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def gpu_configs(shapes) -> list:
    """Autotune configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=nw, num_stages=ns)
            for bm, bn, bk, nw, ns in shapes]


# Interpreter: one fixed small config (it cannot autotune). Large-ish tiles keep the number of
# Python-emulated programs low; the tests' odd shapes still span several blocks on each axis.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


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
