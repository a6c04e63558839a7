"""LoRA on layer types other than nn.Linear: nn.Embedding and nn.Conv1d/2d/3d (PEFT's
`lora.Embedding` and `lora.Conv1d/2d/3d`), on the PyTorch reference path.

Both are `LoraLinear`s seen through a 2-D `[out, in]` view of the base weight, so merge, unmerge,
safe_merge and DoRA's merge (fastpeft/methods/dora.py) are LoraLinear's, unchanged:

  Embedding  W [num_embeddings, dim]  -> base_weight() = W.T  [dim, num_embeddings]
             lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r] (PEFT's names: plain
             parameters in ParameterDicts); y = emb(x) + s * emb(x, A^T) B^T (no dropout, as PEFT).
             Init: A zeros, B normal (PEFT's: the embedding's own init).
  ConvNd     W [out, in/groups, *k]   -> base_weight() = W.view(out, -1)
             lora_A = ConvNd(in, r, k, stride, padding), lora_B = ConvNd(r, out, 1, groups=groups)
             (PEFT's layout: the kernel sits in A); y = conv(x) + s * B(A(dropout(x))).
             delta = (B.view(-1, r) @ A.view(r, -1)).view(W.shape), PEFT's product (equal to its
             conv-of-kernels for groups=1; with groups > 1 PEFT refuses merging, and so do we).

DoRA: the magnitude is kept as `[out]` (the factor f = m / ||W + s B A|| per output row, the norm
detached); checkpoints hold PEFT's shape (`[1, out, 1, ...]` for convs, `[dim]` for embeddings).
Mixed-adapter batches (`adapter_names=`) over these layers raise NotImplementedError (fastpeft.multi).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.methods import dora
from fastpeft.methods.base import AdapterLayer

# The classes below are mixins over fastpeft.methods.lora.LoraLinear (lora.py puts them together:
# `class LoraEmbedding(EmbeddingLayer, LoraLinear)`), so this module needs no import of lora.py,
# which imports it. `config` is a LoraConfig.

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_lora_target(module: nn.Module) -> bool:
    """The non-linear layer types LoRA adapts here (PEFT's dispatch_default)."""
    return isinstance(module, (nn.Embedding, *CONV_TYPES))


def _dora_factor(magnitude: nn.Module, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """f = m / ||W + delta|| per output row, fp32 [out]; the norm is detached (DoRA, section 4.3)."""
    with torch.no_grad():
        norm = torch.linalg.norm(weight.float() + delta.float(), dim=1)
    return magnitude.weight / norm


class EmbeddingLayer:
    """An nn.Embedding with LoRA adapters; PEFT's `lora.Embedding` (keys `lora_embedding_A/B`)."""

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("lora_embedding_A", "lora_embedding_B", dora.LAYER_NAME)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, key: str):
        AdapterLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.weight.shape  # PEFT: in = num_embeddings
        self.lora_A = nn.ModuleDict()  # empty, as in PEFT (its LoraLayer has both kinds)
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_dropout: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.update_layer(adapter_name, config, key)

    def update_layer(self, adapter_name: str, config: Any, key: str) -> None:
        r, alpha = config.rank_and_alpha(key)
        device = self.base_layer.weight.device
        a = torch.randn(r, self.in_features, device=device)
        b = torch.randn(self.out_features, r, device=device)
        if config.init_lora_weights is not False:  # True and "gaussian" alike, as PEFT
            nn.init.zeros_(a)
            nn.init.normal_(b)
        self.lora_embedding_A[adapter_name] = nn.Parameter(a)
        self.lora_embedding_B[adapter_name] = nn.Parameter(b)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.lora_dropout[adapter_name] = config.lora_dropout
        if config.use_dora:
            self.lora_magnitude_vector[adapter_name] = dora.DoraMagnitude.init_from(
                self.base_weight(), a, b, self.scaling[adapter_name]
            )

    def base_weight(self) -> torch.Tensor:
        """`[dim, num_embeddings]`: a transposed view of the embedding table."""
        return self.base_layer.weight.T

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        return (b.float() @ a.float()) * self.scaling[adapter_name]

    def adapter_parameters(self, adapter_name: str):
        for name in ("lora_embedding_A", "lora_embedding_B"):
            if adapter_name in getattr(self, name):
                yield getattr(self, name)[adapter_name]
        if adapter_name in self.lora_magnitude_vector:
            yield from self.lora_magnitude_vector[adapter_name].parameters()

    def adapter_state_dict(self, adapter_name: str) -> dict[str, Any]:
        if adapter_name not in self.lora_embedding_A:
            return {}
        out = {"lora_embedding_A": self.lora_embedding_A[adapter_name],
               "lora_embedding_B": self.lora_embedding_B[adapter_name]}
        if adapter_name in self.lora_magnitude_vector:
            out[dora.LAYER_NAME] = self.lora_magnitude_vector[adapter_name].weight
        return out

    def load_adapter_state_dict(self, adapter_name: str, state: dict[str, Any]) -> None:
        expected = {"lora_embedding_A", "lora_embedding_B"}
        if adapter_name in self.lora_magnitude_vector:
            expected.add(dora.LAYER_NAME)
        if set(state) != expected:
            raise ValueError(f"LoRA embedding layer expects the keys {sorted(expected)}, got {sorted(state)}")
        with torch.no_grad():
            self.lora_embedding_A[adapter_name].copy_(state["lora_embedding_A"])
            self.lora_embedding_B[adapter_name].copy_(state["lora_embedding_B"])
            if dora.LAYER_NAME in state:
                self.lora_magnitude_vector[adapter_name].weight.copy_(state[dora.LAYER_NAME])

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.disable_adapters or self.merged or name is None:
            return result
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        lora = (self._embed(x, a.T) @ b.T) * self.scaling[name]
        embed_scale = getattr(self.base_layer, "embed_scale", None)  # e.g. Gemma's scaled embedding
        if isinstance(embed_scale, (torch.Tensor, float, int)):
            lora = lora * (embed_scale.to(lora.dtype) if isinstance(embed_scale, torch.Tensor) else embed_scale)
        if name in self.lora_magnitude_vector:  # DoRA: f * (emb(x) + s * lora(x))
            f = _dora_factor(self.lora_magnitude_vector[name], self.base_weight(), self.get_delta_weight(name))
            return (f * result + f * lora).to(result.dtype)
        return (result + lora).to(result.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={ {n: self.r[n] for n in self.adapters} }, " \
               f"adapters={self.adapters}, active={self.active_adapter!r}, merged={self.merged_adapters}"

    def __repr__(self) -> str:
        return "lora." + type(self.base_layer).__name__ + super().__repr__()[len(type(self).__name__):]


class ConvLayer:
    """An nn.Conv1d/2d/3d with LoRA adapters; PEFT's `lora.Conv1d/2d/3d` (lora_A holds the kernel)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, key: str):
        AdapterLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_dropout: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        if base_layer.groups > 1:
            warnings.warn("LoRA adapter added to ConvNd layer with groups > 1. Merging is not supported.")
        self.update_layer(adapter_name, config, key)

    def update_layer(self, adapter_name: str, config: Any, key: str) -> None:
        r, alpha = config.rank_and_alpha(key)
        base = self.base_layer
        if r % base.groups != 0:
            raise ValueError(
                f"Targeting a {type(base).__name__} with groups={base.groups} and rank {r}. Currently, support is "
                "limited to conv layers where the rank is divisible by groups. Either choose a different rank or "
                "do not target this specific layer."
            )
        conv, ones = type(base), (1,) * (base.weight.dim() - 2)
        device = base.weight.device
        a = conv(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False, device=device)
        b = conv(r, self.out_features, ones, ones, groups=base.groups, bias=False, device=device)
        if config.init_lora_weights is True:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        elif config.init_lora_weights == "gaussian":
            nn.init.normal_(a.weight, std=1 / r)
            nn.init.zeros_(b.weight)
        self.lora_A[adapter_name] = a
        self.lora_B[adapter_name] = b
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.lora_dropout[adapter_name] = config.lora_dropout
        if config.use_dora:
            norm = torch.linalg.norm(self.base_weight().float() + self.get_delta_weight(adapter_name), dim=1)
            self.lora_magnitude_vector[adapter_name] = dora.DoraMagnitude(norm)

    def base_weight(self) -> torch.Tensor:
        """`[out, in/groups * prod(kernel)]`: a view of the conv weight."""
        weight = self.base_layer.weight
        return weight.view(weight.shape[0], -1)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`s * B A` as `[out, in/groups * prod(kernel)]`, fp32 (PEFT's product for DoRA's norm)."""
        a, b = self.lora_A[adapter_name].weight.float(), self.lora_B[adapter_name].weight.float()
        r = a.shape[0]
        delta = (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(self.base_layer.weight.shape)
        return delta.reshape(delta.shape[0], -1) * self.scaling[adapter_name]

    def _dora_view(self) -> tuple[int, ...]:
        return (1, -1) + (1,) * (self.base_layer.weight.dim() - 2)

    def adapter_state_dict(self, adapter_name: str) -> dict[str, Any]:
        out = super().adapter_state_dict(adapter_name)
        if dora.LAYER_NAME in out:  # PEFT keeps a conv's magnitude as [1, out, 1, ...]
            out[dora.LAYER_NAME] = out[dora.LAYER_NAME].reshape(self._dora_view())
        return out

    def load_adapter_state_dict(self, adapter_name: str, state: dict[str, Any]) -> None:
        state = dict(state)
        if dora.LAYER_NAME in state:
            state[dora.LAYER_NAME] = state[dora.LAYER_NAME].reshape(-1)
        super().load_adapter_state_dict(adapter_name, state)

    def merge(self, adapter_name: str, safe_merge: bool = False) -> None:
        if self.base_layer.groups > 1:
            raise NotImplementedError("Merging is not supported for _ConvNd layers with groups > 1!")
        super().merge(adapter_name, safe_merge)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        base = self.base_layer
        name = self.active_adapter
        if self.disable_adapters or self.merged or name is None:
            return base(x, *args, **kwargs)
        a, b, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        x_lora = F.dropout(x.to(a.weight.dtype), self.lora_dropout[name], self.training)
        lora = b(a(x_lora)) * s
        if name not in self.lora_magnitude_vector:
            result = base(x, *args, **kwargs)
            return (result + lora).to(result.dtype)
        # DoRA: f * (conv(x, W) + s * lora(x)) + bias
        f = _dora_factor(self.lora_magnitude_vector[name], self.base_weight(), self.get_delta_weight(name))
        f = f.reshape(self._dora_view())
        plain = base._conv_forward(x, base.weight, None)
        result = f * plain + f * lora
        if base.bias is not None:
            result = result + base.bias.reshape(self._dora_view())
        return result.to(plain.dtype)

    def __repr__(self) -> str:
        return "lora." + type(self.base_layer).__name__ + super().__repr__()[len(type(self).__name__):]


def adapter_shapes(target: nn.Module, config: Any, key: str) -> dict[str, tuple[int, ...]] | None:
    """Checkpoint keys and shapes of one adapter on an Embedding or ConvNd target (else None)."""
    r, _ = config.rank_and_alpha(key)
    if isinstance(target, nn.Embedding):
        num, dim = target.weight.shape
        shapes = {"lora_embedding_A": (r, num), "lora_embedding_B": (dim, r)}
        if config.use_dora:
            shapes[dora.LAYER_NAME] = (dim,)
        return shapes
    if isinstance(target, CONV_TYPES):
        ones = (1,) * (target.weight.dim() - 2)
        shapes = {"lora_A.weight": (r, target.in_channels, *target.kernel_size),
                  "lora_B.weight": (target.out_channels, r // target.groups, *ones)}
        if config.use_dora:
            shapes[dora.LAYER_NAME] = (1, target.out_channels, *ones)
        return shapes
    return None
