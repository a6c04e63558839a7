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

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fastpeft import checkpoint, prompting
from fastpeft.config import PeftConfig, register_config
from fastpeft.methods.adapter import AdapterConfig, BottleneckFields, BottleneckModel
from fastpeft.methods.prefix import PrefixTuningConfig


@register_config
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


class MAMModel(prompting.PromptLearningModel):
    """The prompt-learning model plus parallel adapters in `base_model`; each adapter name owns a
    prefix and a set of FFN adapters, activated, trained, saved and deleted together."""

    @property
    def bottleneck(self) -> BottleneckModel:
        """The tuner over `base_model` that owns the adapter layers; kept out of the module tree
        (its `.model` is `base_model`, which would otherwise appear twice in the state dict)."""
        if "_bottleneck" not in self.__dict__:
            self.__dict__["_bottleneck"] = BottleneckModel(self.base_model, {})
        return self.__dict__["_bottleneck"]

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        if not isinstance(peft_config, MAMConfig):
            raise ValueError(f"cannot add a {peft_config.peft_type} adapter to a model holding MAM adapters")
        adapter = peft_config.adapter_config()
        self.bottleneck.targets(adapter)  # placement and widths checked before anything changes
        super().add_adapter(adapter_name, peft_config)  # the prefix (checks its own part first)
        self.bottleneck.peft_config[adapter_name] = adapter
        self.bottleneck.inject_adapter(adapter_name)
        self.set_adapter(self._active_adapter)

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.bottleneck.peft_config:  # not yet while add_adapter builds the prefix
            self.bottleneck.set_adapter(adapter_name)
        super().set_adapter(adapter_name)

    def _mark_trainable(self) -> None:
        super()._mark_trainable()
        name = self._active_adapter
        if self.peft_config[name].inference_mode:
            return
        for _, layer in self.bottleneck.adapter_layers():
            for param in layer.adapter_parameters(name):
                param.requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        self.bottleneck.delete_adapter(adapter_name)
        super().delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block: no prefix and no adapters."""
        with super().disable_adapter():
            self.bottleneck.enable_adapter_layers(False)
            try:
                yield
            finally:
                self.bottleneck.enable_adapter_layers(True)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "MAM adapters cannot be merged into the weights: the prefix is extra attention keys and values, "
            "and the parallel adapter has a non-linearity between its projections"
        )

    merge_and_unload = unmerge_adapter = merge_adapter

    def unload(self) -> nn.Module:
        """The user's model without modules_to_save wrappers and adapter layers."""
        super().unload()
        return self.bottleneck.unload(merge=False)

    # -- running -------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        _refuse_mixed(adapter_names)
        return super().forward(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        _refuse_mixed(adapter_names)
        return super().generate(*args, **kwargs)

    # -- checkpoints ---------------------------------------------------------------------------
    def _adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = super()._adapter_state_dict(adapter_name)
        for key, layer in self.bottleneck.adapter_layers():
            if adapter_name in layer.adapters:
                state = layer.adapter_state_dict(adapter_name)
                out.update({f"{checkpoint.PROMPT_PREFIX}{key}.{k}": v for k, v in state.items()})
        return out

    @classmethod
    def _extra_state_shapes(cls, model: nn.Module, config: MAMConfig) -> dict[str, tuple[int, ...]]:
        shapes = BottleneckModel(model, {}).expected_state_shapes("probe", config.adapter_config())
        return {f"{checkpoint.PROMPT_PREFIX}{k}": v for k, v in shapes.items()}

    def _load_extra_state(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, layer in self.bottleneck.adapter_layers():
                if adapter_name in layer.adapters:
                    prefix = f"{checkpoint.PROMPT_PREFIX}{key}."
                    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                    layer.load_adapter_state_dict(adapter_name, sub)


def _refuse_mixed(adapter_names: list[str] | None) -> None:
    if adapter_names is not None:
        raise NotImplementedError("mixed-adapter batches (adapter_names=) with MAM adapters: set_adapter instead")


prompting.register_task_models("MAM", MAMModel)
