"""Prefix Tuning (Li & Liang, 2021) and P-Tuning v2 (Liu et al., 2022): learned keys and values
prepended in every attention layer.

PEFT's `PrefixTuningConfig` and `PrefixEncoder`. The encoder produces, per virtual token, the
keys and values of every layer as one flat row `[num_layers * 2 * token_dim]`; `prefix_cache`
turns that into a transformers `DynamicCache`, which the model then extends with the real
tokens. With grouped-query attention the prefix holds the key-value heads only:
`token_dim = num_key_value_heads * head_dim`, `num_attention_heads = num_key_value_heads` (what
PEFT 0.21 computes; `fastpeft.prompting` fills those fields from the model config).

**P-Tuning v2** ("deep prompt tuning") is this method without reparameterization: a learned
prefix in every layer, `PrefixTuningConfig(num_virtual_tokens=..., prefix_projection=False)`,
which is the default. With `prefix_projection=True` the prefix is reparameterized by a two-layer
MLP (`embedding [P, token_dim] -> transform -> [P, num_layers * 2 * token_dim]`), Li & Liang's
original recipe. Either way the checkpoint stores the flat prefix (`prompt_embeddings`), so a
loaded adapter has no MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from fastpeft import registry
from fastpeft.config import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """PEFT's `PrefixTuningConfig`; `prefix_projection=False` (the default) is P-Tuning v2."""

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"

    init_weights: Literal["zero"] | None = field(
        default=None, metadata={"help": "None: random; 'zero': the prefix starts at zero keys and values."}
    )
    encoder_hidden_size: int = field(default=None, metadata={"help": "Hidden size of the projection MLP."})
    prefix_projection: bool = field(default=False, metadata={"help": "Reparameterize the prefix by an MLP."})

    def __post_init__(self):
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")


class PrefixEncoder(nn.Module):
    """`forward(indices [B, P] long) -> [B, P, num_layers * 2 * token_dim]` (PEFT's layout)."""

    def __init__(self, config: PrefixTuningConfig):
        super().__init__()
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        width = config.num_layers * 2 * config.token_dim
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        prefix = self.embedding(indices)
        return self.transform(prefix) if self.prefix_projection else prefix


def prefix_key_values(flat: torch.Tensor, config: PrefixTuningConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`flat [B, P, num_layers * 2 * token_dim]` -> per layer `(key, value)`, each `[B, heads, P, head_dim]`.

    PEFT's split: the row is `[num_layers * 2, heads, head_dim]` with layer l's key at 2l and its
    value at 2l + 1.
    """
    batch, tokens = flat.shape[:2]
    heads = config.num_attention_heads
    kv = flat.view(batch, tokens, config.num_layers * 2, heads, config.token_dim // heads)
    kv = kv.permute(2, 0, 3, 1, 4)  # [2L, B, heads, P, head_dim]
    return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(config.num_layers)]


def prefix_cache(flat: torch.Tensor, config: PrefixTuningConfig, model_config=None):
    """A transformers `DynamicCache` holding the prefix of every layer, ready for the real tokens."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model_config) if model_config is not None else DynamicCache()
    for layer, (key, value) in enumerate(prefix_key_values(flat, config)):
        cache.update(key, value, layer)
    return cache


def read_only(cache):
    """The prefix cache made read-only for a checkpointed training forward: each layer's `update`
    returns the prefix joined with the new keys/values and stores nothing, so the recompute in
    backward sees exactly what the forward saw (transformers' GradientCheckpointingLayer drops a
    cache that layers write to, and with it the prefix)."""
    from transformers import DynamicCache

    class ReadOnlyPrefixCache(type(cache)):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            layer = self.layers[layer_idx]
            return (torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2))

    if not isinstance(cache, DynamicCache):
        return cache
    cache.__class__ = ReadOnlyPrefixCache
    return cache


registry.register(PrefixTuningConfig, encoder=lambda config, word_embeddings: PrefixEncoder(config),
                  prefix=True)
