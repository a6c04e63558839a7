"""Fused bottleneck adapter: out = res + s * (act(x Wd^T + bd) Wu^T + bu), in two launches.

  x [M, H] -> down [M, b] -> act -> up [M, H], scaled by s and added to the residual `res`
  (res = x for the serial adapters of Houlsby / Pfeiffer; the sub-layer's output for He et al.'s
  parallel adapter, which reads the sub-layer's input x).

A single launch that owns whole rows (the bottleneck plus every output column) runs one program
per row block: at decode (M <= 16) that is ONE program for a 4096-wide layer on a 132-SM GPU.
So the work is split on both projections, deterministically (no atomics):
  pass 1 `_adapter_down_kernel`, grid (row blocks x bottleneck blocks, SPLIT_K): program (m, s)
      accumulates ``x[rows, K-slice s] @ Wd^T[K-slice s, b-block]`` in fp32 and writes it to a
      workspace part [SPLIT_K, M, B_PAD]; SPLIT_K comes from `configs.decode_split`, so a
      4096-wide layer at M = 1 launches >= 256 programs.
  pass 2 `_adapter_up_kernel`, grid (row blocks, column blocks): sums the partials in split
      order (every run the same bits), adds bd and applies the activation in registers, then
      multiplies by its [B_PAD, BLOCK_N] tile of Wu^T, adds bu, scales by s, adds the residual
      tile and stores. Column blocks are 16 wide at decode: 256 programs on a 4096-wide layer.
The bottleneck activation never goes to HBM; only its fp32 partials do (SPLIT_K * M * B_PAD * 4
bytes, L2-resident: 16 KB at M = 1, b = 64). Each pass-2 program re-reads them, which costs far
less than recomputing the down-projection per column block (that would read Wd once per
program). x is read once by pass 1 (and by pass 2 only as the serial adapters' residual).
The backward (fastpeft/ops/adapter.py) recomputes the [M, b] down-projection with plain GEMMs:
it is b/H of the forward's bytes, and saving it would cost an activation per adapter.

jit code and launchers only: no autograd, no nn (see fastpeft/ops/adapter.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels import configs
from fastpeft.kernels._common import DTYPES, alloc_out, check_device, check_tensor, dot_meta, interpreting

__all__ = ["adapter_fwd", "ACTIVATIONS", "MAX_BOTTLENECK"]

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
def _adapter_down_kernel(
    x_ptr, wd_ptr, part_ptr,
    # sizes: x [M, H], wd [B, H], part [SPLIT_K, M, B_PAD]; k_per_split: a multiple of BLOCK_K
    M, H, B, k_per_split,
    stride_xm, stride_xh, stride_wdb, stride_wdh,
    B_PAD: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """part[s, rows, b-block] = x[rows, K-slice s] @ wd[b-block, K-slice s]^T in fp32."""
    NUM_B: tl.constexpr = B_PAD // BLOCK_B
    pid = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = pid // NUM_B
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = (pid % NUM_B) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_b = offs_b < B
    rows = offs_m.to(tl.int64)
    k_lo = split * k_per_split
    k_len = tl.minimum(k_per_split, H - k_lo)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_lo + offs_k)[None, :] * stride_xh
    wd_ptrs = wd_ptr + (k_lo + offs_k)[:, None] * stride_wdh + offs_b[None, :] * stride_wdb
    z = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_len, BLOCK_K)):
        mask_k = offs_k < k_len - k * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wd = tl.load(wd_ptrs, mask=mask_k[:, None] & mask_b[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            wd = wd.to(tl.float32)
        z = tl.dot(x, wd, z, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        wd_ptrs += BLOCK_K * stride_wdh
    part = part_ptr + (split * M + rows[:, None]) * B_PAD + offs_b[None, :]
    tl.store(part, z, mask=mask_m[:, None])


@triton.jit
def _adapter_up_kernel(
    part_ptr, bd_ptr, wu_ptr, bu_ptr, res_ptr, y_ptr,
    # sizes: part [SPLIT_K, M, B_PAD], bd [B], wu [H, B], bu [H], res [M, H], y [M, H]
    M, H, B, SPLIT_K,
    stride_wuh, stride_wub, stride_bd, stride_bu,
    stride_rm, stride_rh, stride_ym, stride_yh,
    scaling,
    B_PAD: tl.constexpr, ACT: tl.constexpr,
    HAS_DOWN_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y[rows, cols] = res + scaling * (act(sum_s part[s] + bd) @ wu^T[:, cols] + bu), fp32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, B_PAD)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_b = offs_b < B
    mask_n = ns < H
    rows = offs_m.to(tl.int64)

    z = tl.zeros((BLOCK_M, B_PAD), dtype=tl.float32)
    part = part_ptr + rows[:, None] * B_PAD + offs_b[None, :]
    for s in range(0, SPLIT_K):   # split order: the same sum every run
        z += tl.load(part + s * M * B_PAD, mask=mask_m[:, None], other=0.0)
    if HAS_DOWN_BIAS:
        bd = tl.load(bd_ptr + offs_b * stride_bd, mask=mask_b, other=0.0)
        z += bd.to(tl.float32)[None, :]
    a = _activation(z, ACT)
    a = tl.where(mask_b[None, :], a, 0.0)  # padded bottleneck columns contribute nothing

    wu = tl.load(wu_ptr + offs_b[:, None] * stride_wub + ns[None, :] * stride_wuh,
                 mask=mask_b[:, None] & mask_n[None, :], other=0.0)
    if UPCAST:
        up = tl.dot(a, wu.to(tl.float32), input_precision=INPUT_PRECISION)
    else:
        up = tl.dot(a.to(wu.dtype), wu, input_precision=INPUT_PRECISION)
    if HAS_UP_BIAS:
        bu = tl.load(bu_ptr + ns * stride_bu, mask=mask_n, other=0.0)
        up += bu.to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    res = tl.load(res_ptr + rows[:, None] * stride_rm + ns[None, :] * stride_rh, mask=mask, other=0.0)
    out = res.to(tl.float32) + scaling * up
    tl.store(y_ptr + rows[:, None] * stride_ym + ns[None, :] * stride_yh,
             out.to(y_ptr.dtype.element_ty), mask=mask)


def launch_config(M: int, H: int, b_pad: int, interpret: bool = False) -> dict:
    """Fixed launch settings (no hot-path autotune, CUDA-graph safe). Decode (M <= 16): 16-row
    blocks, 16-wide bottleneck and column blocks and a K tile of 16, so that pass 1's split-K and
    pass 2's column blocks each give a 4096-wide layer >= 256 programs at M = 1. Prefill: 64-row
    blocks, the whole bottleneck per pass-1 program (x is read once), 64-wide column blocks."""
    if interpret:
        cfg = dict(BLOCK_M=32, BLOCK_B=16, BLOCK_K=32, BLOCK_N=32)
    elif M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_B=16, BLOCK_K=16, BLOCK_N=16, num_warps=4)
    else:
        # 8 warps, K tile 32: fp32 ("ieee" dots on FMA) spilled on 4 warps with a 64-wide K tile
        cfg = dict(BLOCK_M=64, BLOCK_B=b_pad, BLOCK_K=32, BLOCK_N=64, num_warps=8)
    cells = triton.cdiv(M, cfg["BLOCK_M"]) * (b_pad // cfg["BLOCK_B"])
    split, per_split = configs.decode_split(cells * cfg["BLOCK_B"], H, cfg["BLOCK_B"], cfg["BLOCK_K"])
    return dict(cfg, SPLIT_K=split, k_per_split=per_split)


def adapter_fwd(x2d: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor | None,
                up_w: torch.Tensor, up_b: torch.Tensor | None, scaling: float, activation: str,
                residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = res + s * (act(x Wd^T + bd) Wu^T + bu) in two launches (res = x when residual is None).

    x2d: [M, H] fp32|fp16|bf16 any strides; down_w: [b, H] x2d.dtype any strides, 1 <= b <= 256;
    down_b: [b] or None; up_w: [H, b] x2d.dtype any strides; up_b: [H] or None; scaling: float;
    activation: one of ACTIVATIONS; residual: [M, H] x2d.dtype any strides or None; out: [M, H]
    x2d.dtype any strides, or None to allocate -> out, [M, H] x2d.dtype. fp32 accumulation.
    """
    if x2d.dim() != 2:
        raise ValueError(f"x2d: expected [M, H], got {list(x2d.shape)}")
    if x2d.dtype not in DTYPES:
        raise ValueError(f"x2d: dtype must be float32|float16|bfloat16, got {x2d.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    (M, H), B = x2d.shape, down_w.shape[0]
    if not 1 <= B <= MAX_BOTTLENECK:
        raise ValueError(f"bottleneck size down_w.shape[0] must be in 1..{MAX_BOTTLENECK}, got {B}")
    check_tensor("down_w", down_w, (B, H), x2d)
    check_tensor("up_w", up_w, (H, B), x2d)
    for name, t, shape in (("down_b", down_b, (B,)), ("up_b", up_b, (H,)), ("residual", residual, (M, H))):
        if t is not None:
            check_tensor(name, t, shape, x2d)
    check_device(_adapter_down_kernel, x2d, "x2d")
    out = alloc_out(out, (M, H), x2d)
    if M == 0 or H == 0:
        return out
    interpret = interpreting(_adapter_down_kernel)
    b_pad = max(16, triton.next_power_of_2(B))
    cfg = launch_config(M, H, b_pad, interpret)
    split, per_split, block_n = cfg.pop("SPLIT_K"), cfg.pop("k_per_split"), cfg.pop("BLOCK_N")
    dots = dot_meta(_adapter_down_kernel, x2d.dtype)
    warps = {} if interpret else dict(num_warps=cfg.pop("num_warps"))
    part = torch.empty((split, M, b_pad), dtype=torch.float32, device=x2d.device)
    m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    _adapter_down_kernel[(m_blocks * (b_pad // cfg["BLOCK_B"]), split)](
        x2d, down_w, part, M, H, B, per_split,
        x2d.stride(0), x2d.stride(1), down_w.stride(0), down_w.stride(1),
        B_PAD=b_pad, **dots, **cfg, **warps)
    res = x2d if residual is None else residual
    _adapter_up_kernel[(m_blocks, triton.cdiv(H, block_n))](
        part, x2d if down_b is None else down_b, up_w, x2d if up_b is None else up_b, res, out,
        M, H, B, split,
        up_w.stride(0), up_w.stride(1),
        0 if down_b is None else down_b.stride(0), 0 if up_b is None else up_b.stride(0),
        res.stride(0), res.stride(1), out.stride(0), out.stride(1),
        float(scaling),
        B_PAD=b_pad, ACT=ACTIVATIONS.index(activation),
        HAS_DOWN_BIAS=down_b is not None, HAS_UP_BIAS=up_b is not None,
        **dots, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, **warps)
    return out
