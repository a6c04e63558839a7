"""NF4 (QLoRA): quantize, dequantize, and `nf4_linear`, the 4-bit base layer with its LoRA term in
one launch (`LoraLinearFunction` on an NF4 base: the backward maths lives in `fastpeft.ops.lora`).
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
from fastpeft.ops._backend import (check_dropout, check_float, check_like, check_scale_shapes,
                                   describe, kernels, needs_grad, resolve_backend)
from fastpeft.ops.lora import LoraLinearFunction, dropout_lora, fused_fwd

__all__ = ["nf4_quantize", "nf4_dequantize", "nf4_linear"]

def nf4_args(qweight) -> tuple:
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
                         f"{describe(weight) if isinstance(weight, Tensor) else type(weight).__name__}")
    check_float("nf4_quantize", weight, "weight")
    if blocksize not in reference.NF4_BLOCKSIZES:
        raise ValueError(f"nf4_quantize: blocksize must be one of {reference.NF4_BLOCKSIZES}, got {blocksize}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"nf4_quantize: weight {describe(weight)} has NaN or inf values")
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
    packed, absmax, shape, blocksize, nested, code4 = nf4_args(qweight)
    if resolve_backend(packed, backend) == "torch":
        return reference.nf4_dequantize(packed, absmax, shape, blocksize, dtype, nested)
    return kernels("triton", "nf4").nf4_dequantize(packed, absmax, shape, blocksize, dtype, code4, nested)




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
    if needs_grad(x, bias, lora_A, lora_B, rank_scale, col_scale):
        y = LoraLinearFunction.apply(x2d, None, bias, lora_A, lora_B, scaling, which, rank_scale,
                                     col_scale, args)
    else:  # inference: skip the autograd.Function's per-call overhead
        y = fused_fwd(which, args, x2d, None, bias, lora_A, lora_B, scaling, rank_scale, col_scale)
    return y.reshape(*x.shape[:-1], N)


