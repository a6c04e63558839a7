"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): `bottleneck_adapter`, the custom op
`torch.ops.fastpeft.bottleneck_adapter` (fake kernel + registered autograd).
Kernel: `fastpeft/kernels/adapter.py`; reference: `fastpeft/kernels/reference.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpeft.kernels import reference
from fastpeft.ops._backend import (check_dropout, check_float, check_like, check_types, describe,
                                   kernels, autocast_cast, no_autocast, resolve_backend)

__all__ = ["bottleneck_adapter"]


def activation_grad(z: Tensor, activation: str) -> Tensor:
    """d act(z) / dz, elementwise, for the activations of `reference.adapter_activation` (gelu: the
    exact, erf form), written out so that the backward traces as plain ops (no nested autograd)."""
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        return 0.5 * (1.0 + torch.erf(z * _SQRT1_2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    if activation == "silu":
        sig = torch.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))
    if activation == "tanh":
        return 1.0 - torch.tanh(z).square()
    raise ValueError(f"unknown adapter activation {activation!r}")


_SQRT1_2, _INV_SQRT_2PI = 0.7071067811865476, 0.3989422804014327


# -- torch.library: `torch.ops.fastpeft.bottleneck_adapter`, one opaque node per adapter under
# torch.compile, with a fake kernel and an autograd formula.
@torch.library.custom_op("fastpeft::bottleneck_adapter", mutates_args=())
def _adapter_op(x2d: Tensor, down_w: Tensor, down_b: Tensor | None, up_w: Tensor, up_b: Tensor | None,
                residual: Tensor | None, scaling: float, activation: str, backend: str) -> Tensor:
    """[M, H] -> [M, H]: ``res + s (act(x Wd^T + bd) Wu^T + bu)`` (res = x when residual is None),
    one fused launch (checked inputs, see `bottleneck_adapter`)."""
    with no_autocast(x2d):
        return kernels(backend, "adapter").adapter_fwd(x2d, down_w, down_b, up_w, up_b, scaling, activation,
                                                       residual)


@_adapter_op.register_fake
def _(x2d, down_w, down_b, up_w, up_b, residual, scaling, activation, backend):
    return x2d.new_empty(x2d.shape)


def _adapter_setup(ctx, inputs, output):
    x2d, down_w, down_b, up_w, up_b, residual, scaling, activation, _ = inputs
    ctx.save_for_backward(x2d, down_w, down_b, up_w, up_b)
    ctx.scaling, ctx.activation, ctx.serial = scaling, activation, residual is None


def _adapter_backward(ctx, dy):
    """Plain GEMMs in fp32 from a recomputed ``z = x Wd^T + bd`` (not saved: [M, b] per adapter):
    a = act(z); dWu = s dY^T a, dbu = s colsum(dY); dz = act'(z) * (s dY Wu); dWd = dz^T X,
    dbd = colsum(dz); dX = dz Wd (+ dY for the serial form, whose residual is x); dres = dY."""
    x2d, down_w, down_b, up_w, up_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    s, dyf, xf = ctx.scaling, dy.float(), x2d.float()
    z = F.linear(xf, down_w.float(), None if down_b is None else down_b.float())  # [M, b]
    dz = activation_grad(z, ctx.activation) * (s * (dyf @ up_w.float()))          # [M, H] @ [H, b]
    dx = dwd = dbd = dwu = dbu = dres = None
    if need[0]:
        dx = dz @ down_w.float()                                                  # [M, b] @ [b, H]
        dx = (dx + dyf if ctx.serial else dx).to(x2d.dtype)
    if need[1]:
        dwd = (dz.t() @ xf).to(down_w.dtype)                                      # [b, M] @ [M, H]
    if need[2]:
        dbd = dz.sum(0).to(down_b.dtype)
    if need[3]:
        a = reference.adapter_activation(z, ctx.activation)
        dwu = (s * (dyf.t() @ a)).to(up_w.dtype)                                  # [H, M] @ [M, b]
    if need[4]:
        dbu = (s * dyf.sum(0)).to(up_b.dtype)
    if need[5]:
        dres = dy
    return dx, dwd, dbd, dwu, dbu, dres, None, None, None


_adapter_op.register_autograd(_adapter_backward, setup_context=_adapter_setup)


def bottleneck_adapter(x: Tensor, down_w: Tensor, down_b: Tensor | None, up_w: Tensor, up_b: Tensor | None,
                       scaling: float, activation: str, *, residual: Tensor | None = None,
                       dropout: float = 0.0, backend: str | None = None) -> Tensor:
    """A bottleneck adapter: ``res + s * (act(dropout(x) Wd^T + bd) Wu^T + bu)``.

    x: [..., H] fp32|fp16|bf16; down_w: [b, H]; down_b: [b] or None; up_w: [H, b]; up_b: [H] or
    None (all x.dtype, same device, 1 <= b <= 256); activation: relu|gelu|silu|tanh; residual:
    [..., H] like x, or None for the serial form (res = x: Houlsby / Pfeiffer) -> [..., H] x.dtype.
    `dropout` > 0 (modules pass it only in training) drops the adapter's input, never the residual.
    Checked before any kernel runs; differentiable in every tensor. Under
    ``torch.autocast(x.device.type, dtype)`` every tensor is cast to that dtype first, and the
    result is in it (as a linear layer's under autocast).
    """
    x, down_w, down_b, up_w, up_b, residual = autocast_cast(x, down_w, down_b, up_w, up_b, residual)
    named = {"x": x, "down_w": down_w, "up_w": up_w, "down_b": down_b, "up_b": up_b, "residual": residual}
    named = {k: v for k, v in named.items() if v is not None}
    check_types("bottleneck_adapter", named)
    if x.dim() < 1 or down_w.dim() != 2 or down_w.shape[1] != x.shape[-1]:
        raise ValueError(f"bottleneck_adapter: down_w must be [b, H] with H = x.shape[-1]; got down_w "
                         f"{describe(down_w)}, x {describe(x)}")
    (b, H) = down_w.shape
    if not 1 <= b <= 256:
        raise ValueError(f"bottleneck_adapter: bottleneck size b = down_w.shape[0] must be in 1..256, got {b}")
    want = {"up_w": (H, b), "down_b": (b,), "up_b": (H,), "residual": tuple(x.shape)}
    for name, shape in want.items():
        if name in named and tuple(named[name].shape) != shape:
            raise ValueError(f"bottleneck_adapter: {name} must be {list(shape)} (b = {b}, H = {H}), got "
                             f"{describe(named[name])}")
    check_float("bottleneck_adapter", x, fp64=True, backend=backend)
    check_like("bottleneck_adapter", named, x)
    if activation not in ("relu", "gelu", "silu", "tanh"):
        raise ValueError(f"bottleneck_adapter: activation must be relu|gelu|silu|tanh, got {activation!r}")
    check_dropout("bottleneck_adapter", dropout, closed=False)
    which = resolve_backend(x, backend)
    inp = x
    if dropout > 0.0:
        inp, residual = F.dropout(x, dropout, training=True), x if residual is None else residual
    x2d = inp.reshape(-1, H)
    res2d = None if residual is None else residual.reshape(-1, H)
    y = torch.ops.fastpeft.bottleneck_adapter(x2d, down_w, down_b, up_w, up_b, res2d, float(scaling),
                                              activation, which)
    return y.reshape(x.shape)

