"""Prompt Tuning (Lester et al., 2021): `num_virtual_tokens` learned embeddings prepended to the input.

PEFT's `PromptTuningConfig` and `PromptEmbedding`: same fields, defaults, parameter names
(`embedding.weight`, `[num_virtual_tokens, token_dim]`) and checkpoint key (`prompt_embeddings`).
The model wrapper that prepends the prompt is `fastpeft.prompting`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fastpeft import registry
from fastpeft.config import PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    """How the virtual tokens start: the embeddings of a text, of random vocabulary tokens, or random."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """PEFT's `PromptTuningConfig`.

    Diverges from PEFT in one place: with `prompt_tuning_init="TEXT"`, a text that does not tokenize
    to exactly `num_virtual_tokens` tokens is an error (PEFT silently truncates or repeats it, so the
    prompt starts from something other than the text the user wrote).
    """

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: PromptTuningInit | str = field(
        default=PromptTuningInit.RANDOM, metadata={"help": "RANDOM, TEXT or SAMPLE_VOCAB."}
    )
    prompt_tuning_init_text: str | None = field(default=None, metadata={"help": "Init text (TEXT only)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer of the init text."})
    tokenizer_kwargs: dict | None = field(default=None, metadata={"help": "Kwargs of AutoTokenizer.from_pretrained."})

    def __post_init__(self):
        super().__post_init__()
        try:
            self.prompt_tuning_init = PromptTuningInit(self.prompt_tuning_init)
        except ValueError:
            raise ValueError(
                f"prompt_tuning_init must be one of {[m.value for m in PromptTuningInit]}, got {self.prompt_tuning_init!r}"
            ) from None
        text = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text and not self.tokenizer_name_or_path:
            raise ValueError(f"When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be {self.tokenizer_name_or_path}.")
        if text and self.prompt_tuning_init_text is None:
            raise ValueError("When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None.")
        if self.tokenizer_kwargs and not text:
            raise ValueError("tokenizer_kwargs only valid when using prompt_tuning_init='TEXT'.")

    def to_dict(self):
        out = super().to_dict()
        out["prompt_tuning_init"] = PromptTuningInit(self.prompt_tuning_init).value
        return out


class PromptEmbedding(nn.Module):
    """The learned prompt: `embedding.weight` `[total_virtual_tokens, token_dim]` (PEFT's layout).

    `forward(indices [B, T] long) -> [B, T, token_dim]`. The init copies rows of the model's word
    embeddings (TEXT, SAMPLE_VOCAB) in fp32; a frozen (inference) adapter skips the init, its
    weights come from a checkpoint.
    """

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding):
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        init = PromptTuningInit(config.prompt_tuning_init)
        if config.inference_mode or init == PromptTuningInit.RANDOM:
            return
        if init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
        else:
            ids = torch.tensor(_init_text_ids(config, total), dtype=torch.long)
        with torch.no_grad():
            rows = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().float()
        self.embedding.weight = nn.Parameter(rows)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def _init_text_ids(config: PromptTuningConfig, total: int) -> list[int]:
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a checkpoint must not be able to run code (PEFT's rule)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if len(ids) != total:
        raise ValueError(
            f"prompt_tuning_init_text tokenizes to {len(ids)} tokens (special tokens included) but the prompt has "
            f"num_virtual_tokens={total}: make them equal"
        )
    return ids


registry.register(PromptTuningConfig, encoder=PromptEmbedding)
