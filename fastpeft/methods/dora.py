"""DoRA (Liu et al. 2024, weight-decomposed LoRA): the `LoraConfig(use_dora=True)` variant of
`LoraLinear`, with PEFT's semantics (`peft/tuners/lora/dora.py`).

The adapted weight is split into a magnitude m [out] and a direction ``V = W + s B A``:
``W' = m * V / ||V||_row`` (the norm of each output row, i.e. of each column of ``V^T``). With
``f = m / ||V||`` the layer computes

    y = f * (x W^T + s (x A^T) B^T) + b

which is PEFT's ``base(x) + (f - 1) * (x W^T) + f * s * lora(x)`` rewritten: the bias is added
once, unscaled. As in the paper (section 4.3) and PEFT, the norm is detached: it reflects the
current W, A, B but receives no gradient; m does. The factor f goes to the fused LoRA kernel as
its per-output-column epilogue scale (`ops.lora_linear(col_scale=)`), so inference costs one LoRA
launch plus, once per weight update, the norm.

Caching: in eval mode the norm (and, when m needs no grad, the factor itself) is kept on the
`DoraMagnitude` module, keyed on the identity (storage pointer) and autograd version counter of
W, A, B and m and on the scaling: any in-place update through autograd's view of a tensor
(optimizers, ``load_state_dict``, ``torch.no_grad()`` ops, merges) bumps the version and
invalidates it; `train()` clears it. Writes through ``.data`` bypass version counters: after such
a write call `clear_cache()`. Training mode never caches (W, A, B change every step).

Over an NF4 base (`NF4LoraLinear`) the same maths runs on the dequantized fp32 weight, which is
built only when the norm must be recomputed; the cache is keyed on the packed codes and block
scales instead, and a re-quantization (merge, unmerge) clears it, since it replaces those tensors.
Merges write through the layer's `write_base_weight` (a copy into W, or a re-quantization).

Checkpoints: the model's key is PEFT's ``lora_magnitude_vector.<adapter>.weight``; the file's key
is ``lora_magnitude_vector`` (PEFT drops the ``.weight``), see `to_checkpoint` / `from_checkpoint`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fastpeft.methods.base import acc

# The layers below are `fastpeft.methods.lora.LoraLinear`s, typed `nn.Module` here: lora imports
# this module, so importing it back (even for type checking) would close an import cycle.
LAYER_NAME = "lora_magnitude_vector"
_MODEL_KEY = f"{LAYER_NAME}.weight"


def weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W + s B A||`` per output row, fp32 [out], no grad. weight: [out, in] (any strides)."""
    with torch.no_grad():
        return torch.linalg.norm(acc(weight) + scaling * (acc(lora_B) @ acc(lora_A)), dim=1)


def _stamp(t: torch.Tensor) -> tuple:
    """What identifies a tensor's current values without reading them (no host sync)."""
    return (t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.stride())


class DoraMagnitude(nn.Module):
    """The magnitude vector m of one adapter (PEFT's `DoraLinearLayer`: the parameter is `weight`)
    plus the eval-mode cache of the norm and factor, and the norm a merge used (for unmerge)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)
        self._norm: tuple[tuple, torch.Tensor] | None = None
        self._factor: tuple[tuple, torch.Tensor] | None = None
        self.merged_norm: torch.Tensor | None = None

    @classmethod
    def init_from(cls, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> DoraMagnitude:
        """PEFT's init: m = ||W + s B A|| at creation, so the adapter starts as the base layer
        (exactly, with init_lora_weights=True, where B = 0)."""
        return cls(weight_norm(weight, lora_A, lora_B, scaling))

    def clear_cache(self) -> None:
        self._norm = self._factor = None

    def train(self, mode: bool = True) -> DoraMagnitude:
        if mode:
            self.clear_cache()
        return super().train(mode)

    def factor(self, weight: torch.Tensor | Callable[[], torch.Tensor], lora_A: torch.Tensor,
               lora_B: torch.Tensor, scaling: float, dtype: torch.dtype,
               weight_sources: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``f = m / ||W + s B A||`` [out] in `dtype`; differentiable in m only (norm detached).

        `weight` is W [out, in], or a function returning it (a dequantization), called only when
        the norm is recomputed; `weight_sources` (required then) are the tensors W is computed
        from, whose stamps key the eval cache in its place (default: W itself)."""
        m = self.weight
        get_weight = weight if callable(weight) else (lambda: weight)
        if self.training:
            return (m / weight_norm(get_weight(), lora_A, lora_B, scaling)).to(dtype)
        sources = (weight,) if weight_sources is None else weight_sources
        key = (float(scaling), *map(_stamp, sources), _stamp(lora_A), _stamp(lora_B))
        if self._norm is None or self._norm[0] != key:
            self._norm = (key, weight_norm(get_weight(), lora_A, lora_B, scaling))
            self._factor = None
        if torch.is_grad_enabled() and m.requires_grad:
            return (m / self._norm[1]).to(dtype)
        fkey = (key, _stamp(m), dtype)
        if self._factor is None or self._factor[0] != fkey:
            with torch.no_grad():
                self._factor = (fkey, (m / self._norm[1]).to(dtype))
        return self._factor[1]


def unmerged_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight [out, in] fp32 with every merged adapter taken out again (PEFT's
    `_unmerged_base_weight`): the norm of a DoRA merge is always that of the unmerged direction."""
    weight = acc(layer.base_weight().detach()).clone()
    for name in reversed(layer.merged_adapters):
        if name in layer.lora_magnitude_vector:
            magnitude = layer.lora_magnitude_vector[name]
            weight = weight / (acc(magnitude.weight.detach()) / magnitude.merged_norm)[:, None]
        weight -= layer.get_delta_weight(name)
    return weight


def merge(layer: nn.Module, name: str, safe_merge: bool) -> float | None:
    """``W <- f * (W + s B A)`` with ``f = m / ||W0 + s B A||`` (W0: the unmerged weight); returns
    what `layer.write_base_weight` does (the re-quantization error over an NF4 base)."""
    magnitude = layer.lora_magnitude_vector[name]
    with torch.no_grad():
        weight = layer.base_weight()
        delta = layer.get_delta_weight(name)
        norm = torch.linalg.norm(unmerged_weight(layer) + delta, dim=1)
        merged = (acc(magnitude.weight) / norm)[:, None] * (acc(weight) + delta)
        error = layer.write_base_weight(merged, name, safe_merge)
    magnitude.merged_norm = norm
    return error


def unmerge(layer: nn.Module, name: str) -> None:
    """``W <- W / f - s B A`` with the norm the merge used."""
    magnitude = layer.lora_magnitude_vector[name]
    with torch.no_grad():
        weight = layer.base_weight()
        f = acc(magnitude.weight) / magnitude.merged_norm
        layer.write_base_weight(acc(weight) / f[:, None] - layer.get_delta_weight(name), name, False)
    magnitude.merged_norm = None


def to_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer-local keys -> PEFT's file keys (``lora_magnitude_vector.weight`` -> ``lora_magnitude_vector``)."""
    return {LAYER_NAME if k == _MODEL_KEY else k: v for k, v in state.items()}


def from_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_MODEL_KEY if k == LAYER_NAME else k: v for k, v in state.items()}
