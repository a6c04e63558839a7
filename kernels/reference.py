"""PyTorch references of every kernel in `fastpeft.kernels`.

Two jobs: the oracle that kernel tests compare against, and the CPU (``backend="torch"``) path of
`fastpeft.ops`. Each function mirrors a launcher's signature (minus ``out=``), computes in fp32
and returns the input dtype, so a kernel and its reference differ only by rounding order.
Future kernels add their references here, next to their siblings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lora_fwd", "lora_bwd_dx"]


def lora_fwd(x2d: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
             scaling: float) -> Tensor:
    """y = x W^T + b + s (x A^T) B^T, the forward of a LoRA linear.

    x2d: [M, K] fp32|fp16|bf16 any strides; weight: [N, K] any strides (e.g. ``Conv1D.weight.T``);
    bias: [N] or None; lora_A: [r, K]; lora_B: [N, r]; scaling: python float
    -> [M, N] x2d.dtype, contiguous.
    """
    xf = x2d.float()
    y = F.linear(xf, weight.float(), None if bias is None else bias.float())
    y.add_(F.linear(F.linear(xf, lora_A.float()), lora_B.float()), alpha=scaling)
    return y.to(x2d.dtype)


def lora_bwd_dx(dy2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                scaling: float) -> Tensor:
    """dX = dY W + s (dY B) A, the input gradient of `lora_fwd`.

    dy2d: [M, N] fp32|fp16|bf16 any strides; weight: [N, K] any strides; lora_A: [r, K];
    lora_B: [N, r]; scaling: python float -> [M, K] dy2d.dtype, contiguous.
    """
    dyf = dy2d.float()
    dx = dyf @ weight.float()
    dx.add_((dyf @ lora_B.float()) @ lora_A.float(), alpha=scaling)
    return dx.to(dy2d.dtype)
