"""P-Tuning (v1, Liu et al., 2021): virtual token embeddings produced by a small prompt encoder.

PEFT's `PromptEncoderConfig` and `PromptEncoder`: an embedding table reparameterized by an MLP
(3 linear layers) or a bidirectional LSTM + 2-layer MLP, with PEFT's parameter names
(`embedding`, `mlp_head.{0,2,4}`, `lstm_head`). Only the encoder's OUTPUT is saved
(`prompt_embeddings`, `[num_virtual_tokens, token_dim]`): a frozen adapter loaded from a
checkpoint has the embedding table alone and no reparameterization (PEFT's format).
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fastpeft import registry
from fastpeft.config import PromptLearningConfig


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """PEFT's `PromptEncoderConfig` (P-Tuning v1)."""

    PEFT_TYPE: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = field(
        default=PromptEncoderReparameterizationType.MLP, metadata={"help": "MLP or LSTM."}
    )
    encoder_hidden_size: int = field(default=None, metadata={"help": "Hidden size of the encoder (default token_dim)."})
    encoder_num_layers: int = field(default=2, metadata={"help": "LSTM layers (the MLP always has 3 linears)."})
    encoder_dropout: float = field(default=0.0, metadata={"help": "Dropout between LSTM layers."})

    def __post_init__(self):
        super().__post_init__()
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
                self.encoder_reparameterization_type
            )
        except ValueError:
            raise ValueError(
                f"encoder_reparameterization_type must be 'MLP' or 'LSTM', got {self.encoder_reparameterization_type!r}"
            ) from None
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")

    def to_dict(self):
        out = super().to_dict()
        out["encoder_reparameterization_type"] = self.encoder_reparameterization_type.value
        return out


class PromptEncoder(nn.Module):
    """`forward(indices [B, T] long) -> [B, T, token_dim]`: embedding, then the reparameterization.

    In inference mode (a loaded checkpoint) there is no head: the table already holds the encoder's
    output, so `forward` is the lookup alone.
    """

    def __init__(self, config: PromptEncoderConfig):
        super().__init__()
        self.token_dim = config.token_dim
        self.hidden_size = config.encoder_hidden_size
        self.total_virtual_tokens = config.num_virtual_tokens * config.num_transformer_submodules
        self.encoder_type = PromptEncoderReparameterizationType(config.encoder_reparameterization_type)
        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        self.reparameterized = not config.inference_mode
        if not self.reparameterized:
            return
        hidden = self.hidden_size
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=self.token_dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(hidden * 2, hidden * 2), nn.ReLU(), nn.Linear(hidden * 2, self.token_dim)
            )
        else:
            if config.encoder_num_layers != 2:
                warnings.warn("for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used.")
            self.mlp_head = nn.Sequential(
                nn.Linear(self.token_dim, hidden), nn.ReLU(),
                nn.Linear(hidden, hidden), nn.ReLU(),
                nn.Linear(hidden, self.token_dim),
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if not self.reparameterized:
            return embeds
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            embeds = self.lstm_head(embeds)[0]
        return self.mlp_head(embeds)


registry.register(PromptEncoderConfig, encoder=lambda config, word_embeddings: PromptEncoder(config))
