"""What every op of `fastpeft.ops` shares: the backend choice, the kernel module it picks, and the
argument checks, written once.

Backends, chosen per call by `resolve_backend` (no import-time state):
  ``"triton"``  the fused kernels of `fastpeft.kernels` (CPU tensors: ``TRITON_INTERPRET=1`` only);
  ``"torch"``   `fastpeft.kernels.reference`, the fp32 PyTorch oracle (the CPU path);
  ``"auto"``    triton when the input is on CUDA and triton imports, else torch (float64 inputs:
                torch, the only backend that computes in float64).
The ``backend=`` argument wins, then the ``FASTPEFT_BACKEND`` environment variable read at call
time, then ``"auto"``. Triton is imported only when the ``"triton"`` backend runs.
"""
from __future__ import annotations

import contextlib
import os
from types import ModuleType

import torch
from torch import Tensor

from fastpeft.kernels import nf4_cpu, reference

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_backend(x: Tensor, backend: str | None = None) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose activation is `x`.

    `backend` (``"auto"|"triton"|"torch"``, case-insensitive) wins; ``None`` reads the
    ``FASTPEFT_BACKEND`` environment variable now (so tests can force it per test), defaulting to
    ``"auto"``: triton when `x` is on CUDA and triton imports, else torch. Unknown names raise
    ValueError.
    """
    source = "backend"
    if backend is None:
        backend, source = os.environ.get("FASTPEFT_BACKEND") or "auto", "FASTPEFT_BACKEND"
    choice = str(backend).strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not one of {'|'.join(BACKENDS)}")
    if choice != "auto":
        return choice
    if not x.is_cuda or x.dtype == torch.float64:
        return "torch"
    try:
        import triton  # noqa: F401  (only probing that it imports)
    except ImportError:
        return "torch"
    return "triton"


def kernels(backend: str, family: str) -> ModuleType:
    """The module whose launchers run op `family` (``lora|nf4|multi_lora|adapter|optim``) on
    `backend`: ``fastpeft.kernels.<family>`` (imported, with triton, on first use) for
    ``"triton"``, else `reference`, which holds a function of the same name for every launcher
    (for ``nf4``: `nf4_cpu`, the CPU twins of the NF4 launchers; reference stays the oracle)."""
    if backend != "triton":
        return nf4_cpu if family == "nf4" else reference  # NF4 on the CPU: kernels/nf4_cpu.py
    if family == "lora":
        from fastpeft.kernels import lora as module
    elif family == "nf4":
        from fastpeft.kernels import nf4 as module
    elif family == "multi_lora":
        from fastpeft.kernels import multi_lora as module
    elif family == "adapter":
        from fastpeft.kernels import adapter as module
    elif family == "optim":
        from fastpeft.kernels import optim as module
    else:
        raise ValueError(f"no kernel family {family!r}")
    return module


def describe(t: Tensor) -> str:
    return f"{list(t.shape)} {t.dtype} on {t.device}"


def check_types(op: str, named: dict) -> None:
    """Every entry of `named` that is not None is a tensor (TypeError naming it)."""
    for name, t in named.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(op: str, x: Tensor, name: str = "x", *, fp64: bool = False, backend: str | None = None) -> None:
    """x is fp32|fp16|bf16; with `fp64`, also float64 when the op runs on the torch (reference)
    backend (`backend` as the op was given it): the Triton kernels have no fp64 path."""
    if fp64 and x.dtype == torch.float64:
        if resolve_backend(x, backend) == "torch":
            return
        raise ValueError(f"{op}: {name} is float64, which the Triton kernels do not support (on GPU or "
                         f"interpreted); float64 runs on the PyTorch reference path only: pass "
                         f"backend='torch' (or FASTPEFT_BACKEND=torch|auto), or use float32|float16|bfloat16")
    if x.dtype not in FLOAT_DTYPES:
        allowed = "float32|float16|bfloat16" + ("|float64 (torch backend)" if fp64 else "")
        raise ValueError(f"{op}: {name} dtype must be {allowed}, got {name} {x.dtype}")


def check_like(op: str, named: dict, x: Tensor) -> None:
    """Every tensor of `named` (None skipped) has x's dtype and device."""
    for name, t in named.items():
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{op}: {name} {describe(t)} must match x {describe(x)}")


def check_dropout(op: str, p: float, *, closed: bool = True) -> None:
    """p in [0, 1] (`closed`), or in [0, 1)."""
    if not (0.0 <= p <= 1.0 if closed else 0.0 <= p < 1.0):
        raise ValueError(f"{op}: dropout must be in [0, 1{']' if closed else ')'}, got {p}")


def check_scale_shapes(op: str, rank_scale, col_scale, lora_A, N: int, n_source: str) -> None:
    """AdaLoRA's rank scale must be [r] (r from lora_A), DoRA's column scale [N] (N from the base
    weight, described by `n_source`); dtypes and devices are checked with the other tensors."""
    check_types(op, {"rank_scale": rank_scale, "col_scale": col_scale})
    if rank_scale is not None:
        if lora_A is None:
            raise ValueError(f"{op}: rank_scale scales the LoRA ranks: pass it with lora_A and lora_B")
        r = lora_A.shape[0]
        if tuple(rank_scale.shape) != (r,):
            raise ValueError(f"{op}: rank_scale must be [r] = [{r}] (r from lora_A); got "
                             f"rank_scale {list(rank_scale.shape)}, lora_A {list(lora_A.shape)}")
    if col_scale is not None and tuple(col_scale.shape) != (N,):
        raise ValueError(f"{op}: col_scale must be [N] = [{N}] (N from the base weight); got "
                         f"col_scale {list(col_scale.shape)}, {n_source}")


def needs_grad(*tensors) -> bool:
    """Whether an op on these inputs must record autograd (else it skips the Function's overhead)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def autocast_cast(x: Tensor, *tensors):
    """Under ``torch.autocast(x.device.type, dtype)``, x and the float `tensors` (None kept) in the
    autocast dtype (the dtype PEFT's layers compute and return in there); else as given."""
    dev = x.device.type if isinstance(x, Tensor) else None
    if dev is None or not torch.amp.is_autocast_available(dev) or not torch.is_autocast_enabled(dev):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in (x, *tensors))


def no_autocast(x: Tensor):
    """A context in which an op's real kernel runs in its inputs' dtype (autocast is off)."""
    dev = x.device.type
    return torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()
