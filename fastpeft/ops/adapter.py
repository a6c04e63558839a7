"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): `AdapterFunction` and `bottleneck_adapter`.
Kernel: `fastpeft/kernels/adapter.py`; reference: `fastpeft/kernels/reference.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpeft.kernels import reference
from fastpeft.ops._backend import (check_dropout, check_float, check_like, check_types, describe,
                                   kernels, needs_grad, resolve_backend)

__all__ = ["AdapterFunction", "bottleneck_adapter"]


class AdapterFunction(torch.autograd.Function):
    """forward(x2d [M, H], down_w [b, H], down_b [b]|None, up_w [H, b], up_b [H]|None,
    residual [M, H]|None, scaling, activation, backend) -> [M, H] x2d.dtype,
    ``res + s (act(x Wd^T + bd) Wu^T + bu)`` (res = x when residual is None), one fused launch.

    Backward, plain GEMMs in fp32 from a recomputed ``z = x Wd^T + bd`` (not saved: [M, b] per
    adapter): a = act(z); dWu = s dY^T a, dbu = s colsum(dY); da = s dY Wu; dz = act'(z) da (by
    autograd of the activation); dWd = dz^T X, dbd = colsum(dz); dX = dz Wd (+ dY for the serial
    form, whose residual is x); dres = dY.
    """

    @staticmethod
    def forward(ctx, x2d, down_w, down_b, up_w, up_b, residual, scaling, activation, backend):
        ctx.save_for_backward(x2d, down_w, down_b, up_w, up_b)
        ctx.scaling, ctx.activation, ctx.serial = scaling, activation, residual is None
        return kernels(backend, "adapter").adapter_fwd(x2d, down_w, down_b, up_w, up_b, scaling, activation, residual)

    @staticmethod
    def backward(ctx, dy):
        x2d, down_w, down_b, up_w, up_b = ctx.saved_tensors
        need = ctx.needs_input_grad
        s, dyf, xf = ctx.scaling, dy.float(), x2d.float()
        z = F.linear(xf, down_w.float(), None if down_b is None else down_b.float())
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            a = reference.adapter_activation(zg, ctx.activation)
        da = s * (dyf @ up_w.float())                                     # [M, H] @ [H, b]
        dz = torch.autograd.grad(a, zg, da)[0]
        dx = dwd = dbd = dwu = dbu = dres = None
        if need[0]:
            dx = dz @ down_w.float()                                      # [M, b] @ [b, H]
            dx = (dx + dyf if ctx.serial else dx).to(x2d.dtype)
        if need[1]:
            dwd = (dz.t() @ xf).to(down_w.dtype)                          # [b, M] @ [M, H]
        if need[2]:
            dbd = dz.sum(0).to(down_b.dtype)
        if need[3]:
            dwu = (s * (dyf.t() @ a.detach())).to(up_w.dtype)             # [H, M] @ [M, b]
        if need[4]:
            dbu = (s * dyf.sum(0)).to(up_b.dtype)
        if need[5]:
            dres = dy
        return dx, dwd, dbd, dwu, dbu, dres, None, None, None


def bottleneck_adapter(x: Tensor, down_w: Tensor, down_b: Tensor | None, up_w: Tensor, up_b: Tensor | None,
                       scaling: float, activation: str, *, residual: Tensor | None = None,
                       dropout: float = 0.0, backend: str | None = None) -> Tensor:
    """A bottleneck adapter: ``res + s * (act(dropout(x) Wd^T + bd) Wu^T + bu)``.

    x: [..., H] fp32|fp16|bf16; down_w: [b, H]; down_b: [b] or None; up_w: [H, b]; up_b: [H] or
    None (all x.dtype, same device, 1 <= b <= 256); activation: relu|gelu|silu|tanh; residual:
    [..., H] like x, or None for the serial form (res = x: Houlsby / Pfeiffer) -> [..., H] x.dtype.
    `dropout` > 0 (modules pass it only in training) drops the adapter's input, never the residual.
    Checked before any kernel runs; differentiable in every tensor.
    """
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
    args = (x2d, down_w, down_b, up_w, up_b, res2d, float(scaling), activation, which)
    if needs_grad(*named.values()):
        y = AdapterFunction.apply(*args)
    else:  # inference: skip the autograd.Function's per-call overhead
        y = kernels(which, "adapter").adapter_fwd(x2d, down_w, down_b, up_w, up_b, float(scaling), activation, res2d)
    return y.reshape(x.shape)

