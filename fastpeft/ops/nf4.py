"""NF4 (QLoRA): quantize, dequantize, and `nf4_linear`, the 4-bit base layer with its LoRA term in
one launch (`torch.ops.fastpeft.nf4_linear`; the backward maths lives in `fastpeft.ops.lora`).
Kernels: `fastpeft/kernels/nf4.py`; reference: `fastpeft/kernels/reference.py`.

An NF4 weight is any object with bnb's quant-state fields (fastpeft.quant.nf4.NF4Weight, or a
fastpeft Linear4bit's `nf4_weight()`): `packed` uint8 [(N*K+1)//2, 1], `absmax` (fp32 [B], or
uint8 [B] with double quant), `quant_map` fp32 [16], `nested_absmax` fp32 | None,
`nested_quant_map` fp32 [256] | None, `offset` fp32 0-d | None, `shape` (N, K), `blocksize`.
ops reads the fields and never imports the module that defines the container (layering).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastpeft.kernels import reference
from fastpeft.ops._backend import (autocast_cast, check_dropout, check_float, check_like,
                                   check_scale_shapes, describe, kernels, no_autocast, resolve_backend)
from fastpeft.ops.lora import dropout_lora, fused_bwd_dx, fused_fwd, lora_grads, scaled_outside

__all__ = ["NF4Quantized", "nf4_quantize", "nf4_dequantize", "nf4_linear"]

# the format's constants, for the modules above ops (fastpeft.quant)
NF4_BLOCKSIZES, NESTED_BLOCKSIZE = reference.NF4_BLOCKSIZES, reference.NESTED_BLOCKSIZE

_NF4_FIELDS = ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset", "shape",
               "blocksize")


class NF4Quantized(dict):
    """What `nf4_quantize` returns: a dict of the six state tensors ("packed", "absmax",
    "quant_map", "nested_absmax", "nested_quant_map", "offset"; the nested ones None without
    double quant) that is also an NF4 weight: the same fields as attributes, plus `shape`,
    `blocksize` and `dtype` (the quantized weight's), so `nf4_dequantize` and `nf4_linear` take it."""

    def __init__(self, tensors: dict, shape: tuple[int, int], blocksize: int, dtype: torch.dtype):
        super().__init__(tensors)
        self.shape, self.blocksize, self.dtype = tuple(shape), blocksize, dtype

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def nf4_args(qweight, op: str = "nf4_linear") -> tuple:
    """(packed, absmax, shape, blocksize, nested, code4) from an NF4 weight (an object with the
    fields above, or a dict with them all as keys), nested = None or (code8, nested_absmax,
    offset). The state's tensors are checked by the kernels; here only what ops itself reads."""
    if hasattr(qweight, "packed") and not isinstance(qweight, Tensor):
        try:
            fields = {k: getattr(qweight, k) for k in _NF4_FIELDS}
        except AttributeError as e:
            raise ValueError(f"{op}: the NF4 weight {type(qweight).__name__} lacks its field {e}") from None
    elif isinstance(qweight, dict):
        missing = [k for k in _NF4_FIELDS if k not in qweight]
        if missing:
            raise ValueError(f"{op}: the NF4 weight dict lacks {missing} (keys {sorted(qweight)})")
        fields = dict(qweight)
    else:
        raise TypeError(f"{op}: expected an NF4 weight (fastpeft.quant.nf4.NF4Weight, Linear4bit."
                        f"nf4_weight() or what nf4_quantize returns), got {type(qweight).__name__}")
    shape, blocksize = fields["shape"], fields["blocksize"]
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"{op}: the NF4 weight's shape must be (N, K), two non-negative ints, got {shape!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise ValueError(f"{op}: the NF4 weight's blocksize must be an int, got {blocksize!r}")
    for name in ("packed", "absmax", "quant_map"):
        if not isinstance(fields[name], Tensor):
            raise TypeError(f"{op}: the NF4 weight's {name} must be a torch.Tensor, got "
                            f"{type(fields[name]).__name__}")
    nested = None
    if fields["nested_absmax"] is not None:
        nested = (fields["nested_quant_map"], fields["nested_absmax"], fields["offset"])
    return (fields["packed"], fields["absmax"], tuple(shape), blocksize, nested, fields["quant_map"])


def nf4_quantize(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Quantized:
    """Quantize an [N, K] weight to NF4 exactly as bitsandbytes' CPU backend does.

    weight: [N, K] fp32|fp16|bf16 (any device); blocksize in 32..4096 (powers of two) ->
    an `NF4Quantized`: the dict {"packed", "absmax", "quant_map", "nested_absmax",
    "nested_quant_map", "offset"} (the nested entries None without double quant) that also
    carries `shape`, `blocksize` and `dtype` (the weight's), an NF4 weight for `nf4_dequantize`
    and `nf4_linear`. Runs the PyTorch reference on every backend: quantizing
    happens once per weight, and a Triton quantizer has not been shown to pay yet.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"nf4_quantize: weight must be a 2-D [out, in] tensor, got "
                         f"{describe(weight) if isinstance(weight, Tensor) else type(weight).__name__}")
    check_float("nf4_quantize", weight, "weight")
    if blocksize not in reference.NF4_BLOCKSIZES:
        raise ValueError(f"nf4_quantize: blocksize must be one of {reference.NF4_BLOCKSIZES}, got {blocksize}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"nf4_quantize: weight {describe(weight)} has NaN or inf values")
    packed, absmax = reference.nf4_quantize(weight, blocksize)
    out = NF4Quantized({"packed": packed, "absmax": absmax, "quant_map": reference.nf4_code(weight.device),
                        "nested_absmax": None, "nested_quant_map": None, "offset": None},
                       weight.shape, blocksize, weight.dtype)
    if double_quant:
        code8 = reference.dynamic_map(weight.device)
        out["absmax"], out["nested_absmax"], out["offset"] = reference.nf4_double_quantize(absmax, code8)
        out["nested_quant_map"] = code8
    return out


def nf4_dequantize(qweight, dtype: torch.dtype | None = None, *, backend: str | None = None) -> Tensor:
    """The [N, K] weight of an NF4 weight in `dtype`, bit-identical to bnb's `dequantize_4bit`.

    qweight: an NF4 weight (see the block comment above), e.g. the `NF4Quantized` that
    `nf4_quantize` returns, so ``nf4_dequantize(nf4_quantize(w))`` is a tensor like `w` (its
    shape, dtype and device) holding w's 4-bit approximation. dtype: the output dtype; None means
    the dtype an `NF4Quantized` records, else float32 (an NF4Weight does not record one).
    """
    packed, absmax, shape, blocksize, nested, code4 = nf4_args(qweight, "nf4_dequantize")
    if dtype is None:
        dtype = qweight.dtype if isinstance(qweight, NF4Quantized) else torch.float32
    return kernels(resolve_backend(packed, backend), "nf4").nf4_dequantize(
        packed, absmax, shape, blocksize, dtype, code4, nested)


# -- torch.library: `torch.ops.fastpeft.nf4_linear` (+ its dX op); the NF4 state travels flattened
def unflat_nf4(packed, absmax, N, K, blocksize, code4, code8, nested_absmax, offset) -> tuple:
    """`nf4_args` back from the flat arguments of `flat_nf4`."""
    nested = None if nested_absmax is None else (code8, nested_absmax, offset)
    return (packed, absmax, (N, K), blocksize, nested, code4)


def flat_nf4(args) -> tuple:
    """`nf4_args` as the ops' flat arguments: packed, absmax, N, K, blocksize, code4, code8,
    nested_absmax, offset."""
    packed, absmax, (N, K), blocksize, nested, code4 = args
    code8, nested_absmax, offset = nested if nested is not None else (None, None, None)
    return packed, absmax, N, K, blocksize, code4, code8, nested_absmax, offset


@torch.library.custom_op("fastpeft::nf4_linear", mutates_args=())
def _nf4_linear_op(x2d: Tensor, packed: Tensor, absmax: Tensor, N: int, K: int, blocksize: int,
                   code4: Tensor, code8: Tensor | None, nested_absmax: Tensor | None,
                   offset: Tensor | None, bias: Tensor | None, lora_A: Tensor | None,
                   lora_B: Tensor | None, scaling: float, backend: str, rank_scale: Tensor | None,
                   col_scale: Tensor | None) -> Tensor:
    """[M, K] -> [M, N]: `fused_fwd` on an NF4 base (checked inputs, see `nf4_linear`)."""
    args = unflat_nf4(packed, absmax, N, K, blocksize, code4, code8, nested_absmax, offset)
    with no_autocast(x2d):
        return fused_fwd(backend, args, x2d, None, bias, lora_A, lora_B, scaling, rank_scale, col_scale)


@_nf4_linear_op.register_fake
def _(x2d, packed, absmax, N, K, blocksize, code4, code8, nested_absmax, offset, bias, lora_A, lora_B,
      scaling, backend, rank_scale, col_scale):
    return x2d.new_empty((x2d.shape[0], N))


@torch.library.custom_op("fastpeft::nf4_linear_dx", mutates_args=())
def _nf4_linear_dx_op(dz: Tensor, packed: Tensor, absmax: Tensor, N: int, K: int, blocksize: int,
                      code4: Tensor, code8: Tensor | None, nested_absmax: Tensor | None,
                      offset: Tensor | None, lora_A: Tensor | None, lora_B: Tensor | None,
                      scaling: float, backend: str, rank_scale: Tensor | None) -> Tensor:
    """[M, N] -> [M, K]: ``dX = dZ dequant(Wq) + s ((dZ B) diag(e)) A`` (`fused_bwd_dx`)."""
    args = unflat_nf4(packed, absmax, N, K, blocksize, code4, code8, nested_absmax, offset)
    with no_autocast(dz):
        return fused_bwd_dx(backend, args, dz, None, lora_A, lora_B, scaling, rank_scale)


@_nf4_linear_dx_op.register_fake
def _(dz, packed, absmax, N, K, blocksize, code4, code8, nested_absmax, offset, lora_A, lora_B,
      scaling, backend, rank_scale):
    return dz.new_empty((dz.shape[0], K))


def _nf4_setup(ctx, inputs, output):
    x2d, *state, bias, lora_A, lora_B, scaling, backend, rank_scale, col_scale = inputs
    ctx.save_for_backward(x2d, lora_A, lora_B, rank_scale, col_scale, *(state[i] for i in (0, 1, 5, 6, 7, 8)))
    ctx.ints, ctx.scaling, ctx.backend = (state[2], state[3], state[4]), scaling, backend


def _nf4_backward(ctx, dy):
    x2d, lora_A, lora_B, e, f, packed, absmax, code4, code8, nested_absmax, offset = ctx.saved_tensors
    (N, K, blocksize), s, backend, n = ctx.ints, ctx.scaling, ctx.backend, ctx.needs_input_grad
    if n[1] or n[2] or n[16]:
        raise RuntimeError("fastpeft::nf4_linear: the NF4 state is frozen, and a col_scale needing a "
                           "grad is applied outside the op")
    dx, _, db, dA, dB, de = lora_grads(
        (n[0], False, n[10], n[11], n[12], n[15]), dy, x2d, None, lora_A, lora_B, s, e, f,
        lambda dz: torch.ops.fastpeft.nf4_linear_dx(dz, packed, absmax, N, K, blocksize, code4, code8,
                                                    nested_absmax, offset, lora_A, lora_B, s, backend, e))
    return (dx,) + (None,) * 9 + (db, dA, dB, None, None, de, None)


_nf4_linear_op.register_autograd(_nf4_backward, setup_context=_nf4_setup)


def nf4_linear(x: Tensor, qweight, bias: Tensor | None = None, lora_A: Tensor | None = None,
               lora_B: Tensor | None = None, scaling: float = 1.0, *, dropout: float = 0.0,
               backend: str | None = None, rank_scale: Tensor | None = None,
               col_scale: Tensor | None = None) -> Tensor:
    """y = x dequant(Wq)^T + b + scaling * (dropout(x) A^T) B^T, a QLoRA layer in one launch.

    x: [..., K] fp32|fp16|bf16 (the compute dtype); qweight: an NF4 weight of shape (N, K) (see
    the module docstring); bias: [N] x.dtype or None; lora_A [r, K] and lora_B [N, r] in
    x.dtype, or both None for the bare 4-bit layer; scaling: python float -> [..., N] x.dtype.
    Checked before any kernel runs. `dropout` > 0 runs the LoRA branch unfused on a dropped-out x
    (PEFT's semantics) next to the fused base layer.

    rank_scale: [r] x.dtype or None (AdaLoRA's E, needs the LoRA factors) and col_scale: [N]
    x.dtype or None (DoRA's ``m / ||W + s B A||``, the norm detached by the caller) work as in
    `lora_linear`, fused into the same kernel and differentiable, dropout formula included.
    """
    packed, absmax, shape, blocksize, nested, code4 = args = nf4_args(qweight)
    N, K = shape
    x, bias, lora_A, lora_B, rank_scale, col_scale = autocast_cast(x, bias, lora_A, lora_B, rank_scale,
                                                                   col_scale)
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"nf4_linear: x must be [..., {K}] for an NF4 weight of shape {[N, K]}, "
                         f"got {describe(x) if isinstance(x, Tensor) else type(x).__name__}")
    check_float("nf4_linear", x)
    if (lora_A is None) != (lora_B is None):
        raise ValueError("nf4_linear: pass lora_A and lora_B together, or neither")
    if lora_A is not None:
        r = lora_A.shape[0] if lora_A.dim() == 2 else -1
        if lora_A.dim() != 2 or lora_A.shape[1] != K or r < 1 or tuple(lora_B.shape) != (N, r):
            raise ValueError(f"nf4_linear: lora_A must be [r, {K}] and lora_B [{N}, r], got "
                             f"{describe(lora_A)} and {describe(lora_B)}")
    check_scale_shapes("nf4_linear", rank_scale, col_scale, lora_A, N,
                        f"the NF4 weight of shape {[N, K]}")
    check_like("nf4_linear", {"bias": bias, "lora_A": lora_A, "lora_B": lora_B,
                              "rank_scale": rank_scale, "col_scale": col_scale}, x)
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"nf4_linear: bias must be [{N}], got {list(bias.shape)}")
    if packed.device != x.device:
        raise ValueError(f"nf4_linear: the NF4 weight is on {packed.device} but x is on {x.device}")
    check_dropout("nf4_linear", dropout)
    which = resolve_backend(x, backend)
    scaling = float(scaling)
    if dropout > 0.0 and lora_A is not None:
        return dropout_lora(
            lambda inp, with_bias: nf4_linear(inp, qweight, bias if with_bias else None, backend=which),
            x, lora_A, lora_B, scaling, dropout, rank_scale, col_scale)
    x2d = x.reshape(-1, K)
    flat = flat_nf4(args)
    y = scaled_outside(lambda b, f: torch.ops.fastpeft.nf4_linear(
        x2d, *flat, b, lora_A, lora_B, scaling, which, rank_scale, f), x2d, bias, col_scale)
    return y.reshape(*x.shape[:-1], N)


