"""MAM Adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning"): prefix tuning at attention plus a scaled parallel adapter beside the FFN, one config.

PEFT has no such method: `peft_type` "MAM" is ours. It composes two existing pieces rather than
re-implementing them:
  prefix    Prefix Tuning exactly as `fastpeft.methods.prefix` (PrefixEncoder, the cache handed to
            the model, GQA layout, generate); `MAMConfig` is a `PrefixTuningConfig`;
  adapter   the bottleneck adapter of `fastpeft.methods.adapter` in its parallel variant,
            ``FFN(x) + s * up(act(down(x)))`` on every layer's FFN (placement per architecture in
            that module's PATHS), held by an unregistered `BottleneckModel` over the same model.
The model is the prompt-learning layout (`fastpeft.prompting.PromptLearningModel`: the raw model
as `base_model`, the prefix in `prompt_encoder`), with the adapter layers inside `base_model`.

Checkpoint (`adapter_config.json` + `adapter_model.safetensors`, fp32):
  ``prompt_embeddings``                          [P, num_layers * 2 * token_dim]: the flat prefix
                                                 (the encoder's output, as Prefix Tuning saves it)
  ``base_model.<ffn path>.adapter_down.weight``  [b, H]   and ``.adapter_down.bias`` [b]
  ``base_model.<ffn path>.adapter_up.weight``    [H, b]   and ``.adapter_up.bias``   [H]
  ``base_model.<path>.<param>``                  modules_to_save copies (e.g. a SEQ_CLS head)
with ``<ffn path>`` e.g. ``model.layers.0.mlp`` (Llama) or ``transformer.h.0.mlp`` (GPT-2): the
model's state-dict keys with the adapter name taken out. As with every prompt-learning method, a
checkpoint loads frozen (PEFT refuses `is_trainable=True` for prompt learning; kept here).

Defaults follow the paper's MAM recipe in spirit: a parallel adapter with scaling s = 4 and an
up-projection that starts at zero, so a fresh MAM model differs from the base model only by its
prefix. Nothing merges (the prefix is extra keys and values, the adapter has a non-linearity):
merging raises. Mixed-adapter batches (`adapter_names=`) are refused: the adapter layers run one
adapter at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


from fastpeft import prompting, registry
from fastpeft.methods.adapter import AdapterConfig, BottleneckFields, BottleneckModel
from fastpeft.methods.composite import CompositeModel
from fastpeft.methods.prefix import PrefixEncoder, PrefixTuningConfig


@dataclass
class MAMConfig(PrefixTuningConfig, BottleneckFields):
    """Prefix tuning (the inherited fields) + a parallel bottleneck adapter at every FFN."""

    PEFT_TYPE: ClassVar[str] = "MAM"

    scaling: float = field(default=4.0, metadata={"help": "s in FFN(x) + s * up(act(down(x))) (He et al.: 4)."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_virtual_tokens is None:
            raise ValueError("MAMConfig needs its prefix part: set num_virtual_tokens (a positive integer)")
        self.adapter_config()  # the adapter part's own checks (zero-width bottleneck, activation, dropout)

    def adapter_config(self) -> AdapterConfig:
        """The adapter part as the bottleneck tuner's config (parallel variant, default placement)."""
        return self.bottleneck("parallel")


class MAMModel(CompositeModel):
    """The prompt-learning model plus parallel adapters in `base_model`; each adapter name owns a
    prefix and a set of FFN adapters, activated, trained, saved and deleted together."""

    PARTS = (("_bottleneck", BottleneckModel, "adapter_config"),)
    CONFIG, NAME = MAMConfig, "MAM"
    MERGE_ERROR = ("MAM adapters cannot be merged into the weights: the prefix is extra attention keys and "
                   "values, and the parallel adapter has a non-linearity between its projections")


registry.register(MAMConfig, encoder=lambda config, word_embeddings: PrefixEncoder(config), prefix=True,
                  task_models=prompting.task_models(MAMModel))
