"""The optimizers' bridge to `fastpeft.kernels`: argument checks and the backend choice for the
8-bit AdamW update that `fastpeft.optim` runs.

Backends as everywhere in fastpeft (`fastpeft.ops.resolve_backend`): the fused Triton kernel
(kernels/optim.py) when the parameter is on CUDA or ``FASTPEFT_BACKEND=triton``, else
`reference.adamw8bit_update`, the PyTorch path. Triton is imported only on the Triton path.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastpeft.kernels import reference
from fastpeft.ops._backend import FLOAT_DTYPES, kernels, resolve_backend

__all__ = ["adamw8bit_maps", "adamw8bit_update"]

adamw8bit_maps = reference.adamw8bit_maps


def _check(param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, maps, block_size) -> None:
    """Everything the update relies on, checked before either backend runs."""
    if param.dtype not in FLOAT_DTYPES:
        raise ValueError(f"adamw8bit_update: param dtype must be float32|float16|bfloat16, got {param.dtype}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"adamw8bit_update: block_size must be a positive power of two, got {block_size}")
    n, nblocks = param.numel(), -(-param.numel() // block_size)
    expected = {
        "param": (param, (n,), param.dtype), "grad": (grad, (n,), param.dtype),
        "exp_avg": (exp_avg, (n,), torch.uint8), "exp_avg_sq": (exp_avg_sq, (n,), torch.uint8),
        "exp_avg_absmax": (exp_avg_absmax, (nblocks,), torch.float32),
        "exp_avg_sq_absmax": (exp_avg_sq_absmax, (nblocks,), torch.float32),
        **{name: (t, (size,), torch.float32)
           for name, t, size in zip(("maps[0]", "maps[1]", "maps[2]", "maps[3]"), maps, (256, 255, 256, 255))},
    }
    for name, (t, shape, dtype) in expected.items():
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != param.device or not t.is_contiguous():
            raise ValueError(f"adamw8bit_update: {name} must be a contiguous {list(shape)} {dtype} tensor on "
                             f"{param.device}, got {list(t.shape)} {t.dtype} on {t.device}")


def adamw8bit_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_absmax: Tensor,
                     exp_avg_sq: Tensor, exp_avg_sq_absmax: Tensor, maps: tuple, *, lr: float,
                     beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                     block_size: int, backend: str | None = None) -> None:
    """One AdamW step with 8-bit blockwise moments, in place (shapes: `reference.adamw8bit_update`).

    param: [n] fp32|fp16|bf16 contiguous; grad: [n] param.dtype; exp_avg / exp_avg_sq: uint8 [n];
    their absmaxes: fp32 [ceil(n / block_size)]; maps: `adamw8bit_maps(param.device)`; step: the
    1-based step this update makes. `backend`: ``"auto"|"triton"|"torch"`` (see module docstring).
    """
    _check(param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, maps, block_size)
    impl = kernels(resolve_backend(param, backend), "optim")
    impl.adamw8bit_update(param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, maps,
                          lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                          step=step, block_size=block_size)
