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


def _check_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout,
                       rank_scale=None, col_scale=None) -> None:
    """Validate everything before any kernel runs; errors name the tensors and both sides."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    if rank_scale is not None:
        named["rank_scale"] = rank_scale
    if col_scale is not None:
        named["col_scale"] = col_scale
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
    _check_scale_shapes("lora_linear", rank_scale, col_scale, lora_A, N, f"weight {list(weight.shape)}")

    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"lora_linear: x dtype must be float32|float16|bfloat16, got x {x.dtype}")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise ValueError(f"lora_linear: {name} dtype {t.dtype} differs from x dtype {x.dtype} "
                             f"({name} {_describe(t)}, x {_describe(x)})")
        if t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device} but x is on {x.device} "
                             f"({name} {_describe(t)}, x {_describe(x)})")


def _check_scale_shapes(op: str, rank_scale, col_scale, lora_A, N: int, n_source: str) -> None:
    """AdaLoRA's rank scale must be [r] (r from lora_A), DoRA's column scale [N] (N from the base
    weight, described by `n_source`); dtypes and devices are checked with the other tensors."""
    for name, t in (("rank_scale", rank_scale), ("col_scale", col_scale)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
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


def _fused_fwd(backend, nf4_args, x2d, weight, bias, lora_A, lora_B, scaling, rank_scale, col_scale):
    """The forward kernel (or reference) of a LoRA linear on a dense `weight`, or, when `nf4_args`
    is given (see `_nf4_args`), on that NF4 weight."""
    if nf4_args is None:
        return _lora_kernels(backend).lora_fwd(x2d, weight, bias, lora_A, lora_B, scaling,
                                               rank_scale=rank_scale, col_scale=col_scale)
    packed, absmax, shape, blocksize, nested, code4 = nf4_args
    if backend == "triton":
        return _nf4_kernels(backend).nf4_linear_fwd(
            x2d, packed, absmax, shape, blocksize, nested, bias, lora_A, lora_B, scaling, code4,
            rank_scale=rank_scale, col_scale=col_scale)
    return reference.nf4_linear_fwd(x2d, packed, absmax, shape, blocksize, nested, bias, lora_A,
                                    lora_B, scaling, rank_scale=rank_scale, col_scale=col_scale)


def _fused_bwd_dx(backend, nf4_args, dz, weight, lora_A, lora_B, scaling, rank_scale):
    """``dX = dZ W + s ((dZ B) diag(e)) A`` on the same base as `_fused_fwd`."""
    if nf4_args is None:
        return _lora_kernels(backend).lora_bwd_dx(dz, weight, lora_A, lora_B, scaling,
                                                  rank_scale=rank_scale)
    packed, absmax, shape, blocksize, nested, code4 = nf4_args
    if backend == "triton":
        return _nf4_kernels(backend).nf4_linear_bwd_dx(
            dz, packed, absmax, shape, blocksize, nested, lora_A, lora_B, scaling, code4,
            rank_scale=rank_scale)
    return reference.nf4_linear_bwd_dx(dz, packed, absmax, shape, blocksize, nested, lora_A,
                                       lora_B, scaling, rank_scale=rank_scale)


def _dropout_lora(base, x, lora_A, lora_B, scaling, dropout, rank_scale, col_scale):
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


class LoraLinearFunction(torch.autograd.Function):
    """Fused LoRA linear on 2-D activations, over a dense or an NF4 base: the one place that
    holds the backward maths of the LoRA factors and the AdaLoRA/DoRA scales.

    forward(x2d [M, K], weight [N, K]|None, bias [N]|None, lora_A [r, K]|None, lora_B [N, r]|None,
    scaling: float, backend: "triton"|"torch", rank_scale [r]|None, col_scale [N]|None,
    nf4_args: tuple|None) -> [M, N] x2d.dtype, ``y = f * (x W^T + s ((x A^T) diag(e)) B^T) + b``
    (e, f = 1 when None). The base is `weight`, or with `nf4_args` (see `_nf4_args`; weight None)
    a frozen NF4 weight whose forward and dX run the fused dequant kernels of `kernels/nf4.py`;
    lora_A/lora_B may be None only on an NF4 base (the bare 4-bit layer). The backend is fixed at
    forward time.
    Backward returns grads only for the inputs that need them: dX through the fused kernel
    (``dX = dZ W + s ((dZ B) diag(e)) A`` with dZ = f * dY, the same kernel as the forward with
    operands swapped), dA = s ((dZ B) diag(e))^T X and dB = s dZ^T (X A^T) diag(e) as plain GEMMs
    (X A^T is recomputed, not saved: it costs an [M, r] GEMM and saves an activation per layer),
    de = s colsum((X A^T) * (dZ B)), dW = dZ^T X, dbias = sum(dY) only when trainable.
    df = colsum(dY * Z) needs the pre-scale output Z: only when f requires grad (DoRA training)
    does the forward run the kernel without f and bias, keep Z, and apply ``Z * f + b`` itself.
    """

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_A, lora_B, scaling, backend, rank_scale=None,
                col_scale=None, nf4_args=None):
        need = ctx.needs_input_grad
        need_f = col_scale is not None and need[8]
        if need_f:
            z = _fused_fwd(backend, nf4_args, x2d, weight, None, lora_A, lora_B, scaling,
                           rank_scale, None)
            y = z * col_scale if bias is None else torch.addcmul(bias, z, col_scale)
        else:
            z = None
            y = _fused_fwd(backend, nf4_args, x2d, weight, bias, lora_A, lora_B, scaling,
                           rank_scale, col_scale)
        # X is needed only for the weight-side grads; dX needs just W, A, B (and the scales).
        ctx.save_for_backward(x2d if (need[1] or need[3] or need[4] or need[7]) else None,
                              weight, lora_A, lora_B, rank_scale, col_scale, z)
        ctx.scaling, ctx.backend, ctx.nf4_args = scaling, backend, nf4_args
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_A, lora_B, e, f, z = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        need_e, need_f = ctx.needs_input_grad[7:9]
        dx = dw = db = dA = dB = de = df = None
        dz = dy if f is None else dy * f
        if need_x:
            dx = _fused_bwd_dx(ctx.backend, ctx.nf4_args, dz, weight, lora_A, lora_B, s, e)
        if need_A or need_e:
            dzb = dz @ lora_B                             # [M, N] @ [N, r]
            if need_A:
                dA = (s * (dzb if e is None else dzb * e)).t() @ x2d   # [r, M] @ [M, K]
        if need_B or need_e:
            xa = x2d @ lora_A.t()                         # [M, K] @ [K, r]
            if need_B:
                dB = dz.t() @ (s * (xa if e is None else xa * e))      # [N, M] @ [M, r]
        if need_e:
            de = s * (xa * dzb).sum(0)
        if need_f:
            df = (dy * z).sum(0)
        if need_w:
            dw = dz.t() @ x2d                             # [N, M] @ [M, K]
        if need_b:
            db = dy.sum(0)
        return dx, dw, db, dA, dB, None, None, de, df, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, *, dropout: float = 0.0, backend: str | None = None,
                rank_scale: Tensor | None = None, col_scale: Tensor | None = None) -> Tensor:
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

    Variants (both fused into the same kernel, both differentiable):
      rank_scale: [r] x.dtype or None, AdaLoRA's singular values E: the LoRA term becomes
         ``s ((x A^T) diag(e)) B^T``; zero entries (masked ranks) contribute nothing.
      col_scale: [N] x.dtype or None, DoRA's ``m / ||W + s B A||`` (the caller detaches the
         norm, as PEFT does): ``y = f * (x W^T + s (x A^T) B^T) + b``. With dropout, PEFT's DoRA
         applies the correction to the dropped-out input:
         ``x W^T + b + (f - 1) * (x_d W^T) + f * s (x_d A^T) B^T`` with ``x_d = dropout(x)``.
    """
    _check_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout, rank_scale, col_scale)
    which = resolve_backend(x, backend)  # validates the name even on the dropout path
    scaling = float(scaling)
    if dropout > 0.0:
        return _dropout_lora(lambda inp, with_bias: F.linear(inp, weight, bias if with_bias else None),
                             x, lora_A, lora_B, scaling, dropout, rank_scale, col_scale)
    K, N = x.shape[-1], weight.shape[0]
    x2d = x.reshape(-1, K)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
            x, weight, bias, lora_A, lora_B, rank_scale, col_scale)):
        y = LoraLinearFunction.apply(x2d, weight, bias, lora_A, lora_B, scaling, which,
                                     rank_scale, col_scale)
    else:  # inference: skip the autograd.Function's per-call overhead
        y = _lora_kernels(which).lora_fwd(x2d, weight, bias, lora_A, lora_B, scaling,
                                          rank_scale=rank_scale, col_scale=col_scale)
    return y.reshape(*x.shape[:-1], N)


# -- IA3 -------------------------------------------------------------------------------------------
# (IA)^3 rescales a linear layer with a learned vector: on its input columns for feedforward
# modules, ``y = (x * g) W^T + b``, else on its output, ``y = f * (x W^T + b)`` (PEFT scales the
# bias too). Both scales run inside the LoRA kernel with its LoRA term switched off
# (`scaled_linear_fwd`): g as a prologue of the K-loop, f in the epilogue (bias pre-scaled, f * b).
__all__ += ["IA3LinearFunction", "ia3_linear"]


def _scaled_linear(backend: str, x2d, weight, bias, in_scale=None, col_scale=None) -> Tensor:
    return _lora_kernels(backend).scaled_linear_fwd(x2d, weight, bias, in_scale=in_scale,
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
    -> [..., N] x.dtype. Checked before any kernel runs; differentiable in all tensors.
    """
    named = {"x": x, "weight": weight, "scale": scale, **({} if bias is None else {"bias": bias})}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"ia3_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"ia3_linear: weight must be [N, K] with K = x.shape[-1]; got weight "
                         f"{_describe(weight)}, x {_describe(x)}")
    N, K = weight.shape
    want = K if feedforward else N
    if tuple(scale.shape) != (want,):
        raise ValueError(f"ia3_linear: scale must be [{want}] ({'in' if feedforward else 'out'} features "
                         f"of weight {list(weight.shape)}, feedforward={feedforward}); got scale {list(scale.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"ia3_linear: bias must be [{N}], got bias {list(bias.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"ia3_linear: x dtype must be float32|float16|bfloat16, got x {x.dtype}")
    for name, t in named.items():
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"ia3_linear: {name} {_describe(t)} must match x {_describe(x)}")
    which = resolve_backend(x, backend)
    x2d = x.reshape(-1, K)
    if torch.is_grad_enabled() and any(t.requires_grad for t in named.values()):
        y = IA3LinearFunction.apply(x2d, weight, bias, scale, bool(feedforward), which)
    elif feedforward:  # inference: skip the autograd.Function's per-call overhead
        y = _scaled_linear(which, x2d, weight, bias, in_scale=scale)
    else:
        y = _scaled_linear(which, x2d, weight, None if bias is None else bias * scale, col_scale=scale)
    return y.reshape(*x.shape[:-1], N)


# -- bottleneck adapter ------------------------------------------------------------------------------
__all__ += ["AdapterFunction", "bottleneck_adapter"]


def _adapter_kernels(backend: str):
    if backend == "triton":
        from fastpeft.kernels import adapter

        return adapter
    return reference


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
        return _adapter_kernels(backend).adapter_fwd(x2d, down_w, down_b, up_w, up_b, scaling, activation, residual)

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
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"bottleneck_adapter: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1 or down_w.dim() != 2 or down_w.shape[1] != x.shape[-1]:
        raise ValueError(f"bottleneck_adapter: down_w must be [b, H] with H = x.shape[-1]; got down_w "
                         f"{_describe(down_w)}, x {_describe(x)}")
    (b, H) = down_w.shape
    if not 1 <= b <= 256:
        raise ValueError(f"bottleneck_adapter: bottleneck size b = down_w.shape[0] must be in 1..256, got {b}")
    want = {"up_w": (H, b), "down_b": (b,), "up_b": (H,), "residual": tuple(x.shape)}
    for name, shape in want.items():
        if name in named and tuple(named[name].shape) != shape:
            raise ValueError(f"bottleneck_adapter: {name} must be {list(shape)} (b = {b}, H = {H}), got "
                             f"{_describe(named[name])}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"bottleneck_adapter: x dtype must be float32|float16|bfloat16, got x {x.dtype}")
    for name, t in named.items():
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"bottleneck_adapter: {name} {_describe(t)} must match x {_describe(x)}")
    if activation not in ("relu", "gelu", "silu", "tanh"):
        raise ValueError(f"bottleneck_adapter: activation must be relu|gelu|silu|tanh, got {activation!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"bottleneck_adapter: dropout must be in [0, 1), got {dropout}")
    which = resolve_backend(x, backend)
    inp = x
    if dropout > 0.0:
        inp, residual = F.dropout(x, dropout, training=True), x if residual is None else residual
    x2d = inp.reshape(-1, H)
    res2d = None if residual is None else residual.reshape(-1, H)
    args = (x2d, down_w, down_b, up_w, up_b, res2d, float(scaling), activation, which)
    if torch.is_grad_enabled() and any(t.requires_grad for t in named.values()):
        y = AdapterFunction.apply(*args)
    else:  # inference: skip the autograd.Function's per-call overhead
        y = _adapter_kernels(which).adapter_fwd(x2d, down_w, down_b, up_w, up_b, float(scaling), activation, res2d)
    return y.reshape(x.shape)


# -- NF4 (QLoRA) ------------------------------------------------------------------------------
# An NF4 weight is any object with bnb's quant-state fields (fastpeft.quant.nf4.NF4Weight, or a
# fastpeft Linear4bit's `nf4_weight()`): `packed` uint8 [(N*K+1)//2, 1], `absmax` (fp32 [B], or
# uint8 [B] with double quant), `quant_map` fp32 [16], `nested_absmax` fp32 | None,
# `nested_quant_map` fp32 [256] | None, `offset` fp32 0-d | None, `shape` (N, K), `blocksize`.
# ops reads the fields and never imports the module that defines the container (layering).
__all__ += ["NF4LinearFunction", "nf4_quantize", "nf4_dequantize", "nf4_linear"]


def _nf4_kernels(backend: str):
    if backend == "triton":
        from fastpeft.kernels import nf4

        return nf4
    return reference


def _nf4_args(qweight) -> tuple:
    """(packed, absmax, shape, blocksize, nested, code4) from an NF4 weight, nested = None or
    (code8, nested_absmax, offset)."""
    nested = None
    if qweight.nested_absmax is not None:
        nested = (qweight.nested_quant_map, qweight.nested_absmax, qweight.offset)
    return (qweight.packed, qweight.absmax, tuple(qweight.shape), int(qweight.blocksize), nested,
            qweight.quant_map)


def nf4_quantize(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> dict:
    """Quantize an [N, K] weight to NF4 exactly as bitsandbytes' CPU backend does.

    weight: [N, K] fp32|fp16|bf16 (any device); blocksize in 32..4096 (powers of two) ->
    {"packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset"} (the nested
    entries None without double quant). Runs the PyTorch reference on every backend: quantizing
    happens once per weight, and a Triton quantizer has not been shown to pay yet.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"nf4_quantize: weight must be a 2-D [out, in] tensor, got "
                         f"{_describe(weight) if isinstance(weight, Tensor) else type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"nf4_quantize: weight dtype must be float32|float16|bfloat16, got {weight.dtype}")
    if blocksize not in reference.NF4_BLOCKSIZES:
        raise ValueError(f"nf4_quantize: blocksize must be one of {reference.NF4_BLOCKSIZES}, got {blocksize}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"nf4_quantize: weight {_describe(weight)} has NaN or inf values")
    packed, absmax = reference.nf4_quantize(weight, blocksize)
    out = {"packed": packed, "absmax": absmax, "quant_map": reference.nf4_code(weight.device),
           "nested_absmax": None, "nested_quant_map": None, "offset": None}
    if double_quant:
        code8 = reference.dynamic_map(weight.device)
        out["absmax"], out["nested_absmax"], out["offset"] = reference.nf4_double_quantize(absmax, code8)
        out["nested_quant_map"] = code8
    return out


def nf4_dequantize(qweight, dtype: torch.dtype = torch.float32, *, backend: str | None = None) -> Tensor:
    """The [N, K] weight of an NF4 weight in `dtype`, bit-identical to bnb's `dequantize_4bit`."""
    packed, absmax, shape, blocksize, nested, code4 = _nf4_args(qweight)
    if resolve_backend(packed, backend) == "torch":
        return reference.nf4_dequantize(packed, absmax, shape, blocksize, dtype, nested)
    return _nf4_kernels("triton").nf4_dequantize(packed, absmax, shape, blocksize, dtype, code4, nested)


class NF4LinearFunction:
    """The NF4 Function's former entry point, kept for callers: `LoraLinearFunction` on an NF4
    base (same maths; the 4-bit weight never gets a gradient).

    apply(x2d [M, K], bias [N]|None, lora_A [r, K]|None, lora_B [N, r]|None, scaling, args,
    backend, rank_scale [r]|None, col_scale [N]|None) -> [M, N], args from `_nf4_args`.
    """

    @staticmethod
    def apply(x2d, bias, lora_A, lora_B, scaling, args, backend, rank_scale=None, col_scale=None):
        return LoraLinearFunction.apply(x2d, None, bias, lora_A, lora_B, scaling, backend,
                                        rank_scale, col_scale, args)


def nf4_linear(x: Tensor, qweight, bias: Tensor | None = None, lora_A: Tensor | None = None,
               lora_B: Tensor | None = None, scaling: float = 1.0, *, dropout: float = 0.0,
               backend: str | None = None, rank_scale: Tensor | None = None,
               col_scale: Tensor | None = None) -> Tensor:
    """y = x dequant(Wq)^T + b + scaling * (dropout(x) A^T) B^T, a QLoRA layer in one launch.

    x: [..., K] fp32|fp16|bf16 (the compute dtype); qweight: an NF4 weight of shape (N, K) (see
    the block comment above); bias: [N] x.dtype or None; lora_A [r, K] and lora_B [N, r] in
    x.dtype, or both None for the bare 4-bit layer; scaling: python float -> [..., N] x.dtype.
    Checked before any kernel runs. `dropout` > 0 runs the LoRA branch unfused on a dropped-out x
    (PEFT's semantics) next to the fused base layer.

    rank_scale: [r] x.dtype or None (AdaLoRA's E, needs the LoRA factors) and col_scale: [N]
    x.dtype or None (DoRA's ``m / ||W + s B A||``, the norm detached by the caller) work as in
    `lora_linear`, fused into the same kernel and differentiable, dropout formula included.
    """
    packed, absmax, shape, blocksize, nested, code4 = args = _nf4_args(qweight)
    N, K = shape
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"nf4_linear: x must be [..., {K}] for an NF4 weight of shape {[N, K]}, "
                         f"got {_describe(x) if isinstance(x, Tensor) else type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"nf4_linear: x dtype must be float32|float16|bfloat16, got {x.dtype}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("nf4_linear: pass lora_A and lora_B together, or neither")
    if lora_A is not None:
        r = lora_A.shape[0] if lora_A.dim() == 2 else -1
        if lora_A.dim() != 2 or lora_A.shape[1] != K or r < 1 or tuple(lora_B.shape) != (N, r):
            raise ValueError(f"nf4_linear: lora_A must be [r, {K}] and lora_B [{N}, r], got "
                             f"{_describe(lora_A)} and {_describe(lora_B)}")
    _check_scale_shapes("nf4_linear", rank_scale, col_scale, lora_A, N,
                        f"the NF4 weight of shape {[N, K]}")
    for name, t in {"bias": bias, "lora_A": lora_A, "lora_B": lora_B, "rank_scale": rank_scale,
                    "col_scale": col_scale}.items():
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"nf4_linear: {name} {_describe(t)} must match x {_describe(x)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"nf4_linear: bias must be [{N}], got {list(bias.shape)}")
    if packed.device != x.device:
        raise ValueError(f"nf4_linear: the NF4 weight is on {packed.device} but x is on {x.device}")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"nf4_linear: dropout must be in [0, 1], got {dropout}")
    which = resolve_backend(x, backend)
    scaling = float(scaling)
    if dropout > 0.0 and lora_A is not None:
        return _dropout_lora(
            lambda inp, with_bias: nf4_linear(inp, qweight, bias if with_bias else None, backend=which),
            x, lora_A, lora_B, scaling, dropout, rank_scale, col_scale)
    x2d = x.reshape(-1, K)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
            x, bias, lora_A, lora_B, rank_scale, col_scale)):
        y = LoraLinearFunction.apply(x2d, None, bias, lora_A, lora_B, scaling, which, rank_scale,
                                     col_scale, args)
    else:  # inference: skip the autograd.Function's per-call overhead
        y = _fused_fwd(which, args, x2d, None, bias, lora_A, lora_B, scaling, rank_scale, col_scale)
    return y.reshape(*x.shape[:-1], N)


# -- multi-adapter LoRA (mixed-adapter batches) -----------------------------------------------
# A bank (fastpeft.multi.AdapterBank, read here by its fields: lora_a [R, K], lora_b [R, N],
# offsets/ranks int32 [I], scalings fp32 [I], spans {id: (offset, rank)}, version) and the batch metadata
# (fastpeft.multi.TokenGroups: token_ids, perm, seg_start, seg_adapter, num_segments, max_segment).
__all__ += ["multi_lora_linear"]

_MULTI_PATHS = (None, "grouped", "gathered")


def _multi_kernels(backend: str):
    if backend == "triton":
        from fastpeft.kernels import multi_lora

        return multi_lora
    return reference


def _bank_tables(bank, max_rank: int) -> tuple[Tensor, Tensor]:
    """`reference.multi_lora_tables` of the bank at `max_rank`, cached on the bank until its
    `version` changes: per call they would cost ~10 small ops per layer."""
    cached = bank.__dict__.get("_reference_tables")
    if cached is None or cached[0] != bank.version:
        cached = bank.__dict__["_reference_tables"] = (bank.version, {})
    tables = cached[1].get(max_rank)
    if tables is None:
        tables = cached[1][max_rank] = reference.multi_lora_tables(bank.offsets, bank.ranks, bank.scalings, max_rank)
    return tables


def _check_bank(bank, K: int, N: int, x: Tensor) -> None:
    """The bank's buffers fit x (K in, N out, x's dtype and device); checked once per bank change
    (a bank changes through its methods only, each bumping `version`), not on every call."""
    key = (bank.version, K, N, x.dtype, x.device)
    if bank.__dict__.get("_checked_for") == key:
        return
    R = bank.lora_a.shape[0] if isinstance(bank.lora_a, Tensor) else 0
    for name, want in (("lora_a", (R, K)), ("lora_b", (R, N))):
        t = getattr(bank, name)
        if not isinstance(t, Tensor):
            raise TypeError(f"multi_lora_linear: bank.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != want or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"multi_lora_linear: bank.{name} must be {list(want)} {x.dtype} on {x.device} "
                             f"(K = x.shape[-1], N = weight.shape[0]); got bank.{name} {_describe(t)}")
    bank.__dict__["_checked_for"] = key


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, bank, token_adapter_ids, *,
                      backend: str | None = None, path: str | None = None) -> Tensor:
    """y[m] = x[m] W^T + b + s_i (x[m] A_i^T) B_i^T with i = token m's adapter (-1: base only).

    x: [..., K] fp32|fp16|bf16 (its rows flatten to M tokens); weight: [N, K] x.dtype any strides
    (``Conv1D.weight.T`` read in place), or an NF4 weight (see `nf4_linear`; x is then in the
    compute dtype): the 4-bit base decoded inside the same launch (multi-tenant QLoRA; the torch
    backend dequantizes it first); bias: [N] x.dtype or None; bank: the layer's adapters,
    in x.dtype on x.device; token_adapter_ids: a `fastpeft.multi.TokenGroups` for these M tokens
    (built once per forward and shared by all layers: no host sync here), or an integer tensor
    [M] of ids in [-1, bank.num_ids) (then grouped here, reading the ids on the host) -> [..., N].
    `path`: "grouped" (SGMV-style, tokens sorted into segments: prefill), "gathered" (BGMV-style,
    one id per token: decode), or None: gathered when segments average under 16 tokens (Triton);
    the torch path gathers per row when rows are at least rank-long or all on distinct adapters.

    Inference only (PEFT refuses `adapter_names` in training mode): no autograd; an input that
    requires grad while grad mode is on is an error rather than a silently detached result.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"multi_lora_linear: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES or x.dim() < 1:
        raise ValueError(f"multi_lora_linear: x must be [..., K] float32|float16|bfloat16, got {_describe(x)}")
    which = resolve_backend(x, backend)
    nf4_args = None
    if not isinstance(weight, Tensor) and hasattr(weight, "packed"):  # an NF4 weight
        nf4_args = _nf4_args(weight)
        packed, absmax, shape, blocksize, nested, _ = nf4_args
        if packed.device != x.device:
            raise ValueError(f"multi_lora_linear: the NF4 weight is on {packed.device}, x is {_describe(x)}")
        if which == "torch":  # the reference path: a dense weight
            weight, nf4_args = reference.nf4_dequantize(packed, absmax, shape, blocksize, x.dtype, nested), None
        else:
            weight = torch.empty(shape, dtype=x.dtype, device="meta")  # shape and dtype, for the checks
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, Tensor) and not (name == "bias" and t is None):
            raise TypeError(f"multi_lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    K, N = x.shape[-1], weight.shape[0]
    for name, t, want in (("weight", weight, (N, K)), ("bias", bias, (N,))):
        if t is not None and (t.shape != want or t.dtype != x.dtype or (
                t.device != x.device and t.device.type != "meta")):
            raise ValueError(f"multi_lora_linear: {name} must be {list(want)} {x.dtype} on {x.device} "
                             f"(K = x.shape[-1], N = weight.shape[0]); got {name} {_describe(t)}")
    _check_bank(bank, K, N, x)
    if path not in _MULTI_PATHS:
        raise ValueError(f"multi_lora_linear: path must be 'grouped', 'gathered' or None, got {path!r}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, bank.lora_a, bank.lora_b)):
        raise ValueError("multi_lora_linear is inference only (no backward): run it under torch.no_grad() "
                         "or with inputs that do not require grad")
    x2d = x.reshape(-1, K)
    M = x2d.shape[0]
    groups = token_adapter_ids
    if isinstance(groups, Tensor):
        if groups.dim() != 1 or groups.shape[0] != M or groups.dtype.is_floating_point or groups.dtype == torch.bool:
            raise ValueError(f"multi_lora_linear: token_adapter_ids must be integer [{M}] (one per token of x "
                             f"{list(x.shape)}), got {_describe(groups)}")
        from fastpeft import multi

        groups = multi.TokenGroups.from_token_ids(groups.to(x.device))
        if groups.min_id < -1:
            raise ValueError(f"multi_lora_linear: adapter id {groups.min_id} out of range [-1, {bank.num_ids})")
    if groups.M != M or groups.device != x.device:
        raise ValueError(f"multi_lora_linear: the batch metadata is for {groups.M} tokens on {groups.device}, "
                         f"x has {M} on {x.device}")
    if groups.max_id >= bank.num_ids:
        raise ValueError(f"multi_lora_linear: adapter id {groups.max_id} out of range [-1, {bank.num_ids}) "
                         f"of the bank")
    kernels = _multi_kernels(which)
    S, T = groups.num_segments, groups.tokens_per_row
    # the rank tile fits this batch's adapters, not every adapter registered (host ints: no sync)
    spans = bank.spans
    max_rank = max(1, max((spans[i][1] for i in groups.adapters if i in spans), default=0))
    # gathered (one adapter per token) when segments are short: on a GPU when they average under
    # 16 tokens (the grouped kernel's row tile). The CPU path gathers each ROW's factors and
    # multiplies its T tokens in place, which copies less than sorting tokens into segments when
    # a row has at least as many tokens as the rank, or when no two rows share an adapter.
    short = M < 16 * S if kernels is not reference else (max_rank <= T or groups.rows <= S)
    grouped = path == "grouped" or (path is None and not short)
    if kernels is reference:
        extra = {"tables": _bank_tables(bank, max_rank)}
        if grouped and M and S and groups.max_segment:  # per batch: cached on it
            slots = groups.__dict__.get("_reference_slots")
            if slots is None:
                slots = groups.__dict__["_reference_slots"] = reference.multi_lora_segment_slots(
                    groups.perm, groups.seg_start, S, groups.max_segment)
            extra["slots"] = slots
    else:
        extra = {"nf4": nf4_args} if nf4_args else {}
    common = (x2d, None if nf4_args else weight, bias, bank.lora_a, bank.lora_b, bank.offsets, bank.ranks,
              bank.scalings, max_rank)
    if not grouped and kernels is reference:  # per row (x as [rows, T, K]), or per token when T == 1
        table_slots = groups.__dict__.get("_reference_row_slots")  # per batch: cached on it
        if table_slots is None:
            table_slots = groups.__dict__["_reference_row_slots"] = groups.row_ids.long() + 1
        rows = x if x.shape[:-1] == (groups.rows, T) else x2d.reshape(groups.rows, T, K) if T > 1 else x2d
        y = kernels.multi_lora_gathered_fwd(rows, *common[1:], groups.row_ids, table_slots=table_slots, **extra)
    elif not grouped:
        y = kernels.multi_lora_gathered_fwd(*common, groups.token_ids, **extra)
    else:
        y = kernels.multi_lora_grouped_fwd(*common, groups.perm, groups.seg_start, groups.seg_adapter,
                                           groups.num_segments, groups.max_segment, **extra)
    return y if y.shape[:-1] == x.shape[:-1] else y.reshape(*x.shape[:-1], N)
