"""LoRA, AdaLoRA and DoRA linears (and the fused base of QLoRA): `lora_linear`, run as the custom
op `torch.ops.fastpeft.lora_linear` (fake kernel + registered autograd, dX by its own op).
Kernels: `fastpeft/kernels/lora.py` (dense base), `fastpeft/kernels/nf4.py` (NF4 base); their
PyTorch reference, the CPU path and the tests' oracle: `fastpeft/kernels/reference.py`.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpeft.ops._backend import (autocast_cast, check_dropout, check_float, check_scale_shapes,
                                   check_types, describe, kernels, no_autocast, resolve_backend)

__all__ = ["lora_linear"]


def _check_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout,
                       rank_scale=None, col_scale=None, backend=None) -> None:
    """Validate everything before any kernel runs; errors name the tensors and both sides."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    if rank_scale is not None:
        named["rank_scale"] = rank_scale
    if col_scale is not None:
        named["col_scale"] = col_scale
    check_types("lora_linear", named)
    if not isinstance(scaling, numbers.Real):
        raise TypeError(f"lora_linear: scaling must be a python float, "
                        f"got {type(scaling).__name__}")
    check_dropout("lora_linear", dropout)

    want_dims = {"weight": 2, "lora_A": 2, "lora_B": 2, "bias": 1}
    if x.dim() < 1:
        raise ValueError(f"lora_linear: x must be [..., K] (at least 1 dim), got x {describe(x)}")
    for name, dims in want_dims.items():
        if name in named and named[name].dim() != dims:
            raise ValueError(f"lora_linear: {name} must have {dims} dims, got {name} "
                             f"{describe(named[name])} (x {describe(x)})")

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
    check_scale_shapes("lora_linear", rank_scale, col_scale, lora_A, N, f"weight {list(weight.shape)}")

    check_float("lora_linear", x, fp64=True, backend=backend)
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise ValueError(f"lora_linear: {name} dtype {t.dtype} differs from x dtype {x.dtype} "
                             f"({name} {describe(t)}, x {describe(x)})")
        if t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device} but x is on {x.device} "
                             f"({name} {describe(t)}, x {describe(x)})")



def fused_fwd(backend, nf4_args, x2d, weight, bias, lora_A, lora_B, scaling, rank_scale, col_scale):
    """The forward kernel (or reference) of a LoRA linear on a dense `weight`, or, when `nf4_args`
    is given (see `fastpeft.ops.nf4.nf4_args`), on that NF4 weight."""
    if nf4_args is None:
        return kernels(backend, "lora").lora_fwd(x2d, weight, bias, lora_A, lora_B, scaling,
                                                 rank_scale=rank_scale, col_scale=col_scale)
    packed, absmax, shape, blocksize, nested, code4 = nf4_args
    return kernels(backend, "nf4").nf4_linear_fwd(
        x2d, packed, absmax, shape, blocksize, nested, bias, lora_A, lora_B, scaling, code4,
        rank_scale=rank_scale, col_scale=col_scale)


def fused_bwd_dx(backend, nf4_args, dz, weight, lora_A, lora_B, scaling, rank_scale):
    """``dX = dZ W + s ((dZ B) diag(e)) A`` on the same base as `fused_fwd`."""
    if nf4_args is None:
        return kernels(backend, "lora").lora_bwd_dx(dz, weight, lora_A, lora_B, scaling,
                                                    rank_scale=rank_scale)
    packed, absmax, shape, blocksize, nested, code4 = nf4_args
    return kernels(backend, "nf4").nf4_linear_bwd_dx(
        dz, packed, absmax, shape, blocksize, nested, lora_A, lora_B, scaling, code4,
        rank_scale=rank_scale)


def dropout_lora(base, x, lora_A, lora_B, scaling, dropout, rank_scale, col_scale):
    """PEFT's LoRA layer when its dropout is on: the LoRA branch (and DoRA's correction) sees a
    dropped-out ``x_d``, the base path does not, so nothing is fused and plain autograd runs:
    ``base(x) + s lora(x_d)``, with DoRA ``base(x) + (f - 1) * (x_d W^T) + f * s lora(x_d)``
    (``lora(x) = ((x A^T) diag(e)) B^T``). `base(inp, with_bias)` is the bare base layer."""
    xd = F.dropout(x, dropout, training=True)
    xa = F.linear(xd, lora_A)
    lora = F.linear(xa if rank_scale is None else xa * rank_scale, lora_B)
    if col_scale is None:
        return base(x, True) + scaling * lora
    return base(x, True) + (col_scale - 1) * base(xd, False) + col_scale * (scaling * lora)


# -- torch.library: `torch.ops.fastpeft.lora_linear` (+ its dX op), opaque to torch.compile with a
# fake (meta) kernel and an autograd formula, so a compiled model traces one node per layer.
@torch.library.custom_op("fastpeft::lora_linear", mutates_args=())
def _lora_linear_op(x2d: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                    scaling: float, backend: str, rank_scale: Tensor | None,
                    col_scale: Tensor | None) -> Tensor:
    """[M, K] -> [M, N]: `fused_fwd` on a dense base (checked inputs, see `lora_linear`)."""
    with no_autocast(x2d):
        return fused_fwd(backend, None, x2d, weight, bias, lora_A, lora_B, scaling, rank_scale, col_scale)


@_lora_linear_op.register_fake
def _(x2d, weight, bias, lora_A, lora_B, scaling, backend, rank_scale, col_scale):
    return x2d.new_empty((x2d.shape[0], weight.shape[0]))


@torch.library.custom_op("fastpeft::lora_linear_dx", mutates_args=())
def _lora_linear_dx_op(dz: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                       backend: str, rank_scale: Tensor | None) -> Tensor:
    """[M, N] -> [M, K]: ``dX = dZ W + s ((dZ B) diag(e)) A`` (`fused_bwd_dx`)."""
    with no_autocast(dz):
        return fused_bwd_dx(backend, None, dz, weight, lora_A, lora_B, scaling, rank_scale)


@_lora_linear_dx_op.register_fake
def _(dz, weight, lora_A, lora_B, scaling, backend, rank_scale):
    return dz.new_empty((dz.shape[0], weight.shape[1]))


def lora_grads(needs, dy, x2d, weight, lora_A, lora_B, s, e, f, dx_fn):
    """The grads of ``y = f * (x W^T + s ((x A^T) diag(e)) B^T) + b`` for f constant (a DoRA scale
    that needs its own grad is applied outside the op): (dx, dw, db, dA, dB, de) as `needs`
    (the same six flags) asks, dX through `dx_fn(dz)` (the fused kernel op)."""
    need_x, need_w, need_b, need_A, need_B, need_e = needs
    dx = dw = db = dA = dB = de = None
    dz = dy if f is None else dy * f
    if need_x:
        dx = dx_fn(dz)
    if need_A or need_e:
        dzb = dz @ lora_B
        if need_A:
            dA = (s * (dzb if e is None else dzb * e)).t() @ x2d
    if need_B or need_e:
        xa = x2d @ lora_A.t()
        if need_B:
            dB = dz.t() @ (s * (xa if e is None else xa * e))
    if need_e:
        de = s * (xa * dzb).sum(0)
    if need_w:
        dw = dz.t() @ x2d
    if need_b:
        db = dy.sum(0)
    return dx, dw, db, dA, dB, de


def _lora_setup(ctx, inputs, output):
    x2d, weight, _, lora_A, lora_B, scaling, backend, rank_scale, col_scale = inputs
    ctx.save_for_backward(x2d, weight, lora_A, lora_B, rank_scale, col_scale)
    ctx.scaling, ctx.backend = scaling, backend


def _lora_backward(ctx, dy):
    x2d, weight, lora_A, lora_B, e, f = ctx.saved_tensors
    s, backend, n = ctx.scaling, ctx.backend, ctx.needs_input_grad
    dx, dw, db, dA, dB, de = lora_grads(
        (n[0], n[1], n[2], n[3], n[4], n[7]), dy, x2d, weight, lora_A, lora_B, s, e, f,
        lambda dz: torch.ops.fastpeft.lora_linear_dx(dz, weight, lora_A, lora_B, s, backend, e))
    if n[8]:
        raise RuntimeError("fastpeft::lora_linear: col_scale needing a grad is applied outside the op")
    return dx, dw, db, dA, dB, None, None, de, None


_lora_linear_op.register_autograd(_lora_backward, setup_context=_lora_setup)


def scaled_outside(op, x2d, bias, col_scale, *args):
    """Run `op(x2d, ..., bias, ..., col_scale)` -- given as a callable of (bias, col_scale) -- with
    DoRA's scale applied outside when it needs a grad: ``z * f + b``, so autograd gives df."""
    if col_scale is not None and col_scale.requires_grad and torch.is_grad_enabled():
        z = op(None, None)
        return z * col_scale if bias is None else torch.addcmul(bias, z, col_scale)
    return op(bias, col_scale)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, *, dropout: float = 0.0, backend: str | None = None,
                rank_scale: Tensor | None = None, col_scale: Tensor | None = None) -> Tensor:
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, one LoRA linear layer (PEFT's semantics).

    Shapes and layout:
      x: [..., K] fp32|fp16|bf16 (fp64 on the torch backend only), any strides (a 2-D view is taken, copying only if the leading
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
    GEMMs no longer share their input and cannot be fused. Otherwise `torch.ops.fastpeft.lora_linear` runs the
    fused kernels (or the reference) on `backend`, see `resolve_backend`.

    Variants (both fused into the same kernel, both differentiable):
      rank_scale: [r] x.dtype or None, AdaLoRA's singular values E: the LoRA term becomes
         ``s ((x A^T) diag(e)) B^T``; zero entries (masked ranks) contribute nothing.
      col_scale: [N] x.dtype or None, DoRA's ``m / ||W + s B A||`` (the caller detaches the
         norm, as PEFT does): ``y = f * (x W^T + s (x A^T) B^T) + b``. With dropout, PEFT's DoRA
         applies the correction to the dropped-out input:
         ``x W^T + b + (f - 1) * (x_d W^T) + f * s (x_d A^T) B^T`` with ``x_d = dropout(x)``.
    """
    x, weight, bias, lora_A, lora_B, rank_scale, col_scale = autocast_cast(
        x, weight, bias, lora_A, lora_B, rank_scale, col_scale)
    _check_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout, rank_scale, col_scale, backend)
    which = resolve_backend(x, backend)  # validates the name even on the dropout path
    scaling = float(scaling)
    if dropout > 0.0:
        return dropout_lora(lambda inp, with_bias: F.linear(inp, weight, bias if with_bias else None),
                             x, lora_A, lora_B, scaling, dropout, rank_scale, col_scale)
    K, N = x.shape[-1], weight.shape[0]
    x2d = x.reshape(-1, K)
    y = scaled_outside(lambda b, f: torch.ops.fastpeft.lora_linear(
        x2d, weight, b, lora_A, lora_B, scaling, which, rank_scale, f), x2d, bias, col_scale)
    return y.reshape(*x.shape[:-1], N)


