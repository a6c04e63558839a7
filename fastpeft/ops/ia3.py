"""(IA)^3: `IA3LinearFunction` and `ia3_linear`, run inside the LoRA kernel with its LoRA term off
(`scaled_linear_fwd` of `fastpeft/kernels/lora.py`; reference: `fastpeft/kernels/reference.py`).

(IA)^3 rescales a linear layer with a learned vector: on its input columns for feedforward
modules, ``y = (x * g) W^T + b``, else on its output, ``y = f * (x W^T + b)`` (PEFT scales the
bias too). g runs as a prologue of the K-loop, f in the epilogue (bias pre-scaled, f * b).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastpeft.ops._backend import (autocast_cast, check_float, check_like, check_types, describe, kernels,
                                   needs_grad, no_autocast, resolve_backend)

__all__ = ["IA3LinearFunction", "ia3_linear"]


def _scaled_linear(backend: str, x2d, weight, bias, in_scale=None, col_scale=None) -> Tensor:
    return kernels(backend, "lora").scaled_linear_fwd(x2d, weight, bias, in_scale=in_scale,
                                                    col_scale=col_scale)


class IA3LinearFunction(torch.autograd.Function):
    """IA3 on 2-D activations: forward(x2d [M, K], weight [N, K], bias [N]|None, scale [K] (input,
    `feedforward`) or [N] (output), feedforward: bool, backend) -> [M, N] x2d.dtype.

    Input scale g:  y = (x g) W^T + b;  dX = (dY W) g (one launch: g as the dX kernel's column
    scale), dg = colsum(X * (dY W)) (then dY W is computed once and scaled outside),
    dW = dY^T (X g), db = colsum(dY).
    Output scale f: y = f (x W^T + b); dX = (dY f) W (one launch: f as the dX kernel's input
    scale), df = colsum(dY * Z) with Z = x W^T + b, which the forward keeps only when f needs a
    grad (it then runs the kernel without f and scales Z itself), dW = (dY f)^T X, db = colsum(dY f).
    """

    @staticmethod
    def forward(ctx, x2d, weight, bias, scale, feedforward, backend):
        need = ctx.needs_input_grad
        z = None
        if feedforward:
            y = _scaled_linear(backend, x2d, weight, bias, in_scale=scale)
        elif need[3]:
            z = _scaled_linear(backend, x2d, weight, bias)
            y = z * scale
        else:
            y = _scaled_linear(backend, x2d, weight, None if bias is None else bias * scale, col_scale=scale)
        ctx.save_for_backward(x2d if (need[1] or (feedforward and need[3])) else None, weight, scale, z)
        ctx.feedforward, ctx.backend = feedforward, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, scale, z = ctx.saved_tensors
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        dx = dw = db = ds = None
        wt = weight.t()  # dY W is a linear with weight W^T: [K, N]
        if ctx.feedforward:
            if need_s:
                dyw = _scaled_linear(ctx.backend, dy, wt, None)
                ds = (x2d * dyw).sum(0)
                dx = dyw * scale if need_x else None
            elif need_x:
                dx = _scaled_linear(ctx.backend, dy, wt, None, col_scale=scale)
            if need_w:
                dw = dy.t() @ (x2d * scale)
            if need_b:
                db = dy.sum(0)
        else:
            if need_x:
                dx = _scaled_linear(ctx.backend, dy, wt, None, in_scale=scale)
            if need_s:
                ds = (dy * z).sum(0)
            if need_w or need_b:
                dz = dy * scale
                dw = dz.t() @ x2d if need_w else None
                db = dz.sum(0) if need_b else None
        return dx, dw, db, ds, None, None


def ia3_linear(x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor, feedforward: bool, *,
               backend: str | None = None) -> Tensor:
    """One IA3 linear layer (PEFT's semantics): ``(x * scale) W^T + b`` when `feedforward`, else
    ``scale * (x W^T + b)``.

    x: [..., K] fp32|fp16|bf16 any strides; weight: [N, K] x.dtype any strides (``Conv1D.weight.T``
    is read in place); bias: [N] x.dtype or None; scale: [K] (feedforward) or [N] x.dtype
    -> [..., N] x.dtype. Checked before any kernel runs; differentiable in all tensors. Under
    ``torch.autocast(x.device.type, dtype)`` every tensor is cast to that dtype first (PEFT's
    layer returns the autocast dtype there, as its base linear does).
    """
    x, weight, bias, scale = autocast_cast(x, weight, bias, scale)
    named = {"x": x, "weight": weight, "scale": scale, **({} if bias is None else {"bias": bias})}
    check_types("ia3_linear", named)
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"ia3_linear: weight must be [N, K] with K = x.shape[-1]; got weight "
                         f"{describe(weight)}, x {describe(x)}")
    N, K = weight.shape
    want = K if feedforward else N
    if tuple(scale.shape) != (want,):
        raise ValueError(f"ia3_linear: scale must be [{want}] ({'in' if feedforward else 'out'} features "
                         f"of weight {list(weight.shape)}, feedforward={feedforward}); got scale {list(scale.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"ia3_linear: bias must be [{N}], got bias {list(bias.shape)}")
    check_float("ia3_linear", x, fp64=True, backend=backend)
    check_like("ia3_linear", named, x)
    which = resolve_backend(x, backend)
    x2d = x.reshape(-1, K)
    with no_autocast(x):
        if needs_grad(x, weight, bias, scale):
            y = IA3LinearFunction.apply(x2d, weight, bias, scale, bool(feedforward), which)
        elif feedforward:  # inference: skip the autograd.Function's per-call overhead
            y = _scaled_linear(which, x2d, weight, bias, in_scale=scale)
        else:
            y = _scaled_linear(which, x2d, weight, None if bias is None else bias * scale, col_scale=scale)
    return y.reshape(*x.shape[:-1], N)

