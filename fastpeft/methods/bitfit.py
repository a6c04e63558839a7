"""BitFit (Ben Zaken et al. 2022): train only bias terms. Config, layer, injection rule.

PEFT has no BitFit, so the format is ours (`peft_type` "BITFIT"), with PEFT's file names:
`adapter_config.json` + `adapter_model.safetensors`, one tensor per trained bias under the key the
bias has in the plain model, ``base_model.model.<module path>.bias`` (fp32, `[features]`). That is
also the key a merged model gives it, so a checkpoint reads as "these biases replace the base's".

Which biases: `biases` picks them by role, `target_modules` / `exclude_modules` by name (PEFT's
matching rules; default: every module), both must hold:
  "all"        every bias parameter of the model: linear layers, GPT-2's Conv1D, LayerNorms;
  "attention"  modules under a path segment containing "attn" or "attention" (Llama's
               `self_attn.*`, GPT-2's `attn.*`, BERT's `attention.self.*` and `attention.output.*`);
  "mlp"        modules under a segment "mlp", "intermediate", "ffn" or "feed_forward", or under
               "output" when no attention segment precedes it (BERT's `layer.N.output.*`).
`add_bias=True` gives the matching linear layers that have no bias (all of Llama's) a zero-init
one, so the model's output is unchanged at init; without it such a model has nothing to train and
the config is refused with a clear error. The model's output head never gets one.

Each matched module is wrapped in a `BitFitLayer` holding, per adapter, a trained fp32 copy of its
bias (`bitfit_bias.<adapter>`); the base bias stays frozen, so adapters switch and disable like
any other method. Merging is exact: the adapter's bias IS the layer's bias, so merge writes it into
the base layer (creating the parameter for an added bias) and unmerge puts the original back.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fastpeft import inject, registry
from fastpeft.config import PeftConfig
from fastpeft.methods.base import AdapterLayer, BaseTuner, ModulesToSaveWrapper

LAYER_NAME = "bitfit_bias"
_ATTENTION = re.compile(r"attn|attention")
_MLP = {"mlp", "intermediate", "ffn", "feed_forward"}


@dataclass
class BitFitConfig(PeftConfig):
    """Which biases BitFit trains (fastpeft's own method: PEFT has none)."""

    PEFT_TYPE: ClassVar[str] = "BITFIT"
    # fastpeft.inject's matcher reads these; BitFit selects by name and role only.
    layers_to_transform: ClassVar[None] = None
    layers_pattern: ClassVar[None] = None

    biases: Literal["all", "attention", "mlp"] = field(
        default="all", metadata={"help": "Which biases train: all, attention sub-layers, or MLP sub-layers."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Restrict to these module names (suffix match) or a regex; None: all."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Names never adapted."})
    add_bias: bool = field(
        default=False, metadata={"help": "Give matching bias-less linear layers a zero-init bias to train."}
    )
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved."})

    def __post_init__(self):
        if self.biases not in ("all", "attention", "mlp"):
            raise ValueError(f"biases must be 'all', 'attention' or 'mlp', got {self.biases!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                setattr(self, name, set(value))


def role(key: str) -> str | None:
    """"attention", "mlp" or None for a module path (see the module docstring)."""
    for segment in key.split("."):
        if _ATTENTION.search(segment):
            return "attention"
        if segment in _MLP or segment == "output":
            return "mlp"
    return None


class BitFitLayer(AdapterLayer):
    """Any module with a `bias` (or a bias-less linear given one): trained bias copies per adapter."""

    adapter_layer_names: ClassVar[tuple[str, ...]] = (LAYER_NAME,)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BitFitConfig, key: str):
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self.original_bias: torch.Tensor | None = None  # the base bias a merge replaced
        self.update_layer(adapter_name, config, key)

    def update_layer(self, adapter_name: str, config: BitFitConfig, key: str) -> None:
        self.bitfit_bias[adapter_name] = nn.Parameter(_initial_bias(self.base_layer).detach().float().clone())

    def adapter_parameters(self, adapter_name: str):
        if adapter_name in self.bitfit_bias:
            yield self.bitfit_bias[adapter_name]

    def adapter_state_dict(self, adapter_name: str) -> dict[str, Any]:
        return {"bias": self.bitfit_bias[adapter_name]} if adapter_name in self.bitfit_bias else {}

    def load_adapter_state_dict(self, adapter_name: str, state: dict[str, Any]) -> None:
        if set(state) != {"bias"}:
            raise ValueError(f"BitFit layer expects exactly the key 'bias', got {sorted(state)}")
        self.bitfit_bias[adapter_name].copy_(state["bias"])

    def merge(self, adapter_name: str, safe_merge: bool = False) -> None:
        """Write the adapter's bias into the base layer (a new parameter if the base had none)."""
        if self.merged_adapters:
            raise ValueError("BitFit merges one adapter at a time: its bias replaces the base bias")
        new = self.bitfit_bias[adapter_name].detach()
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        base = self.base_layer
        with torch.no_grad():
            if base.bias is None:
                weight = base.weight
                base.bias = nn.Parameter(new.to(weight.dtype).clone(), requires_grad=False)
            else:
                self.original_bias = base.bias.detach().clone()
                base.bias.copy_(new.to(base.bias.dtype))
        self.merged_adapters.append(adapter_name)

    def _unmerge_one(self, adapter_name: str) -> None:
        base = self.base_layer
        with torch.no_grad():
            if self.original_bias is None:  # the bias was added by the merge
                base.bias = None
            else:
                base.bias.copy_(self.original_bias)
        self.original_bias = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters and self.merged:
            self.unmerge()
        name = self.active_adapter
        if self.disable_adapters or self.merged or name is None:
            return self.base_layer(*args, **kwargs)
        bias = self.bitfit_bias[name]
        bias = bias.to(self.base_layer.bias.dtype if self.base_layer.bias is not None else self.base_layer.weight.dtype)
        return torch.func.functional_call(self.base_layer, {"bias": bias}, args, kwargs, strict=False)


def _initial_bias(module: nn.Module) -> torch.Tensor:
    """The module's bias, or zeros of its output width when it has none (add_bias)."""
    if module.bias is not None:
        return module.bias
    width = module.nf if _is_conv1d(module) else module.out_features  # Linear, Linear4bit: out_features
    return torch.zeros(width, device=module.weight.device)


class BitFitModel(BaseTuner):
    """Wraps the modules whose biases a `BitFitConfig` trains."""

    prefix: ClassVar[str] = "bitfit_"
    layer_cls: ClassVar[type[AdapterLayer]] = BitFitLayer

    def targets(self, config: BitFitConfig) -> list[tuple[str, nn.Module]]:
        """(name, module) of every module whose bias trains; raises before anything changes."""
        matcher = config if config.target_modules is not None else dataclasses.replace(config, target_modules=".*")
        inner = {f"{p}.{s}" for p, m in self.model.named_modules() if isinstance(m, (self.layer_cls, ModulesToSaveWrapper))
                 for s, _ in m.named_modules() if s}
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        out, biasless = [], []
        for key, module in self.model.named_modules():
            if not key or key in inner or not inject.is_target(matcher, key):
                continue
            if config.biases != "all" and role(key) != config.biases:
                continue
            base = module.base_layer if isinstance(module, self.layer_cls) else module
            has_bias = isinstance(base._parameters.get("bias"), torch.Tensor)
            if has_bias:
                out.append((key, module))
            elif inject.is_linear(base) and base is not head:
                biasless.append((key, module))
                if config.add_bias:
                    out.append((key, module))
        if not out:
            hint = (f"; {len(biasless)} matching linear layers have no bias: set add_bias=True to give them "
                    "zero-init biases to train") if biasless else ""
            raise ValueError(f"BitFit: no bias matches biases={config.biases!r}, target_modules="
                             f"{config.target_modules!r} in {type(self.model).__name__}{hint}")
        return out

    def _create_layer(self, target: nn.Module, adapter_name: str, config: BitFitConfig, key: str) -> BitFitLayer:
        return BitFitLayer(target, adapter_name, config, key)

    def _update_layer(self, layer: BitFitLayer, adapter_name: str, config: BitFitConfig, key: str) -> None:
        layer.update_layer(adapter_name, config, key)

    def _adapter_shapes(self, target: nn.Module, config: BitFitConfig, key: str) -> dict[str, tuple[int, ...]]:
        return {"bias": tuple(_initial_bias(target).shape)}


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = inject.conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


registry.register(BitFitConfig, tuner=BitFitModel)
