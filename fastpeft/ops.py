"""The bridge between modules and kernels: autograd Functions plus a per-call backend switch.

This is the only module that imports `fastpeft.kernels`. Triton itself is imported lazily, only
when the ``"triton"`` backend is chosen, so ``import fastpeft`` works on machines without it.

Backends, chosen per call by `resolve_backend` (no import-time state):
  ``"triton"``  the fused kernels of `fastpeft.kernels` (CPU tensors: ``TRITON_INTERPRET=1`` only);
  ``"torch"``   `fastpeft.kernels.reference`, the fp32 PyTorch oracle (the CPU path);
  ``"auto"``    triton when the input is on CUDA and triton imports, else torch.
The ``backend=`` argument wins, then the ``FASTPEFT_BACKEND`` environment variable read at call
time, then ``"auto"``.
"""
from __future__ import annotations

import numbers
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpeft.kernels import reference

__all__ = ["LoraLinearFunction", "lora_linear", "resolve_backend"]

_BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    if choice not in _BACKENDS:
        raise ValueError(f"{source}={backend!r} is not one of {'|'.join(_BACKENDS)}")
    if choice != "auto":
        return choice
    if not x.is_cuda:
        return "torch"
    try:
        import triton  # noqa: F401  (only probing that it imports)
    except ImportError:
        return "torch"
    return "triton"


def _lora_kernels(backend: str):
    """The module holding `lora_fwd` / `lora_bwd_dx` for `backend` (imports triton lazily)."""
    if backend == "triton":
        from fastpeft.kernels import lora

        return lora
    return reference


def _describe(t: Tensor) -> str:
    return f"{list(t.shape)} {t.dtype} on {t.device}"


def _check_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout) -> None:
    """Validate everything before any kernel runs; errors name the tensors and both sides."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(scaling, numbers.Real):
        raise TypeError(f"lora_linear: scaling must be a python float, "
                        f"got {type(scaling).__name__}")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"lora_linear: dropout must be in [0, 1], got {dropout}")

    want_dims = {"weight": 2, "lora_A": 2, "lora_B": 2, "bias": 1}
    if x.dim() < 1:
        raise ValueError(f"lora_linear: x must be [..., K] (at least 1 dim), got x {_describe(x)}")
    for name, dims in want_dims.items():
        if name in named and named[name].dim() != dims:
            raise ValueError(f"lora_linear: {name} must have {dims} dims, got {name} "
                             f"{_describe(named[name])} (x {_describe(x)})")

    K, (N, Kw), (r, Ka) = x.shape[-1], weight.shape, lora_A.shape
    if Kw != K:
        raise ValueError(f"lora_linear: weight must be [N, K] with K = x.shape[-1] = {K}; "
                         f"got weight {list(weight.shape)} and x {list(x.shape)}")
    if Ka != K:
        raise ValueError(f"lora_linear: lora_A must be [r, K] with K = x.shape[-1] = {K}; "
                         f"got lora_A {list(lora_A.shape)} and x {list(x.shape)}")
    if r < 1:
        raise ValueError(f"lora_linear: rank r = lora_A.shape[0] must be >= 1, "
                         f"got lora_A {list(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_linear: lora_B must be [N, r] = [{N}, {r}] (N from weight, r from "
                         f"lora_A); got lora_B {list(lora_B.shape)}, weight {list(weight.shape)}, "
                         f"lora_A {list(lora_A.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"lora_linear: bias must be [N] = [{N}]; got bias {list(bias.shape)} "
                         f"and weight {list(weight.shape)}")

    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"lora_linear: x dtype must be float32|float16|bfloat16, got x {x.dtype}")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise ValueError(f"lora_linear: {name} dtype {t.dtype} differs from x dtype {x.dtype} "
                             f"({name} {_describe(t)}, x {_describe(x)})")
        if t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device} but x is on {x.device} "
                             f"({name} {_describe(t)}, x {_describe(x)})")


class LoraLinearFunction(torch.autograd.Function):
    """Fused LoRA linear on 2-D activations; the backend is fixed at forward time.

    forward(x2d [M, K], weight [N, K], bias [N]|None, lora_A [r, K], lora_B [N, r], scaling: float,
    backend: "triton"|"torch") -> [M, N] x2d.dtype. Backward returns grads only for the inputs
    that need them: dX through the fused kernel (``dX = dY W + s (dY B) A``, the same kernel as
    the forward with operands swapped), dA = s (dY B)^T X and dB = s dY^T (X A^T) as plain GEMMs
    (X A^T is recomputed, not saved: it costs an [M, r] GEMM and saves an activation per layer),
    and dW = dY^T X, dbias = sum(dY) only when the base layer is trainable.
    """

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_A, lora_B, scaling, backend):
        y = _lora_kernels(backend).lora_fwd(x2d, weight, bias, lora_A, lora_B, scaling)
        need = ctx.needs_input_grad
        # X is needed only for the weight-side grads; dX needs just W, A, B.
        ctx.save_for_backward(x2d if (need[1] or need[3] or need[4]) else None,
                              weight, lora_A, lora_B)
        ctx.scaling, ctx.backend = scaling, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        dx = dw = db = dA = dB = None
        if need_x:
            dx = _lora_kernels(ctx.backend).lora_bwd_dx(dy, weight, lora_A, lora_B, s)
        if need_A:
            dA = (s * (dy @ lora_B)).t() @ x2d            # [r, M] @ [M, K]
        if need_B:
            dB = dy.t() @ (s * (x2d @ lora_A.t()))        # [N, M] @ [M, r]
        if need_w:
            dw = dy.t() @ x2d                             # [N, M] @ [M, K]
        if need_b:
            db = dy.sum(0)
        return dx, dw, db, dA, dB, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, *, dropout: float = 0.0, backend: str | None = None) -> Tensor:
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, one LoRA linear layer (PEFT's semantics).

    Shapes and layout:
      x: [..., K] fp32|fp16|bf16, any strides (a 2-D view is taken, copying only if the leading
         dims cannot be flattened);
      weight: [N, K] x.dtype, any strides: pass ``conv1d.weight.T`` for GPT-2's Conv1D, it is
         read in place and never copied;
      bias: [N] x.dtype or None; lora_A: [r, K] x.dtype; lora_B: [N, r] x.dtype (r >= 1);
      scaling: python float (lora_alpha / r, or / sqrt(r) with rslora)
      -> [..., N] x.dtype.
    All tensors must share x's dtype and device; shapes, dtypes and devices are checked before any
    kernel runs (ValueError naming the tensors).

    `dropout` > 0 (modules pass their p only in training mode) runs the *unfused* path
    ``F.linear(x, W, b) + s * F.linear(F.linear(F.dropout(x, p), A), B)`` with plain autograd:
    the LoRA branch sees a dropped-out x while the base path does not, as in PEFT, so the two
    GEMMs no longer share their input and cannot be fused. Otherwise `LoraLinearFunction` runs the
    fused kernels (or the reference) on `backend`, see `resolve_backend`.
    """
    _check_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout)
    which = resolve_backend(x, backend)  # validates the name even on the dropout path
    scaling = float(scaling)
    if dropout > 0.0:
        lora = F.linear(F.linear(F.dropout(x, dropout, training=True), lora_A), lora_B)
        return F.linear(x, weight, bias) + scaling * lora
    K, N = x.shape[-1], weight.shape[0]
    x2d = x.reshape(-1, K)
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B)):
        y = LoraLinearFunction.apply(x2d, weight, bias, lora_A, lora_B, scaling, which)
    else:  # inference: skip the autograd.Function's per-call overhead
        y = _lora_kernels(which).lora_fwd(x2d, weight, bias, lora_A, lora_B, scaling)
    return y.reshape(*x.shape[:-1], N)
