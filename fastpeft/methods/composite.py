"""Composite methods (MAM, UniPELT): the prompt-learning model (a prefix per adapter name) plus
layer tuners over `base_model` (the "parts"), one implementation for both.

Each adapter name owns its prefix and one config per part; all of them are activated, trained,
saved, loaded and deleted together. A part's tuner is kept out of the module tree (its `.model`
is `base_model`, which would otherwise appear twice in the state dict); its layers' tensors are
saved under `base_model.<module path>` as PEFT saves modules_to_save copies in a prompt-learning
checkpoint. A subclass names its parts in `PARTS` and its refusals in `MERGE_ERROR` / `NAME`.
"""
from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
from torch import nn

from fastpeft import checkpoint, prompting
from fastpeft.config import PeftConfig


class CompositeModel(prompting.PromptLearningModel):
    # (attribute, tuner class, the config method that returns that part's config)
    PARTS: ClassVar[tuple[tuple[str, type, str], ...]] = ()
    CONFIG: ClassVar[type[PeftConfig]] = PeftConfig  # the method's config class
    NAME: ClassVar[str] = ""  # the method's name in messages
    MERGE_ERROR: ClassVar[str] = ""

    def _part(self, attr: str):
        """The part tuner stored as `attr`, created on first use (outside the module tree)."""
        if attr not in self.__dict__:
            cls = next(c for a, c, _ in self.PARTS if a == attr)
            self.__dict__[attr] = cls(self.base_model, {})
        return self.__dict__[attr]

    @property
    def bottleneck(self):
        """The part that owns the bottleneck adapter layers (every composite has one)."""
        return self._part("_bottleneck")

    def _parts(self) -> list:
        return [self._part(attr) for attr, _, _ in self.PARTS]

    def _layers(self):
        for tuner in self._parts():
            yield from tuner.adapter_layers()

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        if not isinstance(peft_config, self.CONFIG):
            raise ValueError(f"cannot add a {peft_config.peft_type} adapter to a model holding "
                             f"{self.CONFIG.PEFT_TYPE} adapters")
        parts = [(self._part(attr), getattr(peft_config, method)()) for attr, _, method in self.PARTS]
        for tuner, config in parts:  # every part's placement and widths checked before anything changes
            tuner.targets(config)
        self._add_prefix(adapter_name, peft_config)
        for tuner, config in parts:
            tuner.peft_config[adapter_name] = config
            tuner.inject_adapter(adapter_name)
        self.set_adapter(self._active_adapter)

    def _add_prefix(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """The prompt-learning part (it checks its own part first); subclasses add around it."""
        super().add_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str) -> None:
        for tuner in self._parts():
            if adapter_name in tuner.peft_config:  # not yet while add_adapter builds the prefix
                tuner.set_adapter(adapter_name)
        super().set_adapter(adapter_name)

    def _mark_trainable(self) -> None:
        super()._mark_trainable()
        name = self._active_adapter
        if not self._mark_extra_trainable(name) or self.peft_config[name].inference_mode:
            return
        for _, layer in self._layers():
            for param in layer.adapter_parameters(name):
                param.requires_grad_(True)

    def _mark_extra_trainable(self, adapter_name: str) -> bool:
        """Subclasses' own trainable tensors; False: the parts stay frozen too."""
        return True

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        for tuner in self._parts():
            tuner.delete_adapter(adapter_name)
        super().delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block: no prefix and no part."""
        with super().disable_adapter():
            for tuner in self._parts():
                tuner.enable_adapter_layers(False)
            try:
                yield
            finally:
                for tuner in self._parts():
                    tuner.enable_adapter_layers(True)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(self.MERGE_ERROR)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> None:
        self.merge_adapter()

    def unmerge_adapter(self, *args: Any, **kwargs: Any) -> None:
        self.merge_adapter()

    def unload(self) -> nn.Module:
        """The user's model without modules_to_save wrappers and the parts' layers."""
        super().unload()
        model = self.base_model
        for tuner in self._parts():
            model = tuner.unload(merge=False)
        return model

    # -- running -------------------------------------------------------------------------------
    def _refuse_mixed(self, adapter_names: list[str] | None) -> None:
        if adapter_names is not None:
            raise NotImplementedError(f"mixed-adapter batches (adapter_names=) with {self.NAME} adapters: "
                                      "set_adapter instead")

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        self._refuse_mixed(adapter_names)
        return super().forward(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        self._refuse_mixed(adapter_names)
        return super().generate(*args, **kwargs)

    # -- checkpoints ---------------------------------------------------------------------------
    def _adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = super()._adapter_state_dict(adapter_name)
        for key, layer in self._layers():
            if adapter_name in layer.adapters:
                state = layer.adapter_state_dict(adapter_name)
                out.update({f"{checkpoint.PROMPT_PREFIX}{key}.{k}": v for k, v in state.items()})
        return out

    @classmethod
    def _extra_state_shapes(cls, model: nn.Module, config: PeftConfig) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for _, tuner_cls, method in cls.PARTS:
            shapes.update(tuner_cls(model, {}).expected_state_shapes("probe", getattr(config, method)()))
        return {f"{checkpoint.PROMPT_PREFIX}{k}": v for k, v in shapes.items()}

    def _load_extra_state(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, layer in self._layers():
                if adapter_name in layer.adapters:
                    prefix = f"{checkpoint.PROMPT_PREFIX}{key}."
                    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                    layer.load_adapter_state_dict(adapter_name, sub)
