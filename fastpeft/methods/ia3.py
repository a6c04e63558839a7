"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): config, layer, injection rule, with PEFT's semantics and format.

Each target linear gets a learned vector `ia3_l`, initialised to ones (the identity):

  feedforward modules (`feedforward_modules`):  y = (x * l) W^T + b,   ia3_l: [1, in]
  every other target:                           y = l * (x W^T + b),   ia3_l: [out, 1]

(PEFT scales the bias of an output-scaled layer too.) Forward runs `ops.ia3_linear`: on CUDA one
launch of the LoRA kernel with its LoRA term off and the vector fused as the prologue scale of x's
columns or the epilogue scale of the output columns. Merging multiplies the weight's columns (rows)
by l, and an output-scaled layer's bias by l; unmerging divides by ``l + 1e-8`` as PEFT does.

Checkpoint keys are PEFT's: ``base_model.model.<path>.ia3_l`` (the adapter name taken out).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fastpeft import inject, ops, registry
from fastpeft.config import PeftConfig
from fastpeft.methods.base import AdapterLayer, BaseTuner, adapter_dtype
from fastpeft.quant.nf4 import Linear4bit

LAYER_NAME = "ia3_l"
CONV_TYPES = (nn.Conv2d, nn.Conv3d)  # PEFT's IA3 adapts no Conv1d


@dataclass
class IA3Config(PeftConfig):
    """PEFT's `IA3Config`: same fields, defaults, validation and JSON keys."""

    PEFT_TYPE: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names (suffix match), a regex (full match) or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Names never adapted."})
    feedforward_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Targets whose INPUT is scaled (suffix match, or a regex); a subset of targets."}
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored [in, out] (GPT-2 Conv1D)."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved."})
    init_ia3_weights: bool = field(default=True, metadata={"help": "True: vectors start at ones (identity)."})
    # PEFT's IA3Config has no layer selection; the shared matcher (fastpeft.inject) reads these.
    layers_to_transform: ClassVar[None] = None
    layers_pattern: ClassVar[None] = None

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                setattr(self, name, set(value))
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            if not self.feedforward_modules.issubset(self.target_modules):
                raise ValueError("`feedforward_modules` should be a subset of `target_modules`")

    def is_feedforward(self, key: str) -> bool:
        """PEFT's `_check_target_module_feedforward`: regex full match, or any name ending `key`."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return bool(re.fullmatch(ff, key))
        return any(key.endswith(name) for name in ff or ())


class IA3Linear(AdapterLayer):
    """An nn.Linear (or GPT-2 Conv1D) with IA3 vectors; PEFT's `ia3.Linear` layout."""

    adapter_layer_names: ClassVar[tuple[str, ...]] = (LAYER_NAME,)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: IA3Config, key: str, is_feedforward: bool):
        super().__init__(base_layer)
        self.fan_in_fan_out = _is_conv1d(base_layer)
        weight = base_layer.weight
        self.out_features, self.in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()
        self.update_layer(adapter_name, config, key)

    def update_layer(self, adapter_name: str, config: IA3Config, key: str) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        device = self.base_layer.weight.device
        dtype = adapter_dtype(self.base_layer.weight)  # fp32 on a 16/32-bit base, fp64 on fp64 (PEFT's)
        vector = torch.ones(shape, device=device, dtype=dtype) if config.init_ia3_weights else \
            torch.randn(shape, device=device, dtype=dtype)
        self.ia3_l[adapter_name] = nn.Parameter(vector)

    def base_weight(self) -> torch.Tensor:
        """The base weight as `[out, in]` (a view for Conv1D)."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    # A ParameterDict holds the vectors themselves, not modules: state and parameters by hand.
    def adapter_parameters(self, adapter_name: str):
        if adapter_name in self.ia3_l:
            yield self.ia3_l[adapter_name]

    def adapter_state_dict(self, adapter_name: str) -> dict[str, Any]:
        return {LAYER_NAME: self.ia3_l[adapter_name]} if adapter_name in self.ia3_l else {}

    def load_adapter_state_dict(self, adapter_name: str, state: dict[str, Any]) -> None:
        if set(state) != {LAYER_NAME}:
            raise ValueError(f"IA3 layer expects exactly the key {LAYER_NAME!r}, got {sorted(state)}")
        self.ia3_l[adapter_name].copy_(state[LAYER_NAME])

    def _scale_base(self, vector: torch.Tensor, safe_merge: bool, adapter_name: str) -> None:
        """W <- W * l (columns for feedforward, rows otherwise) and, output-scaled, b <- b * l."""
        weight, bias = self.base_weight(), self.base_layer.bias
        l = vector.float()
        new_w = weight.float() * (l.reshape(1, -1) if self.is_feedforward else l.reshape(-1, 1))
        new_b = None
        if not self.is_feedforward and bias is not None:
            new_b = bias.float() * l.reshape(-1)
        if safe_merge and not all(torch.isfinite(t).all() for t in (new_w, new_b) if t is not None):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        weight.copy_(new_w.to(weight.dtype))
        if new_b is not None:
            bias.copy_(new_b.to(bias.dtype))

    def merge(self, adapter_name: str, safe_merge: bool = False) -> None:
        with torch.no_grad():
            self._scale_base(self.ia3_l[adapter_name].detach(), safe_merge, adapter_name)
        self.merged_adapters.append(adapter_name)

    def _unmerge_one(self, adapter_name: str) -> None:
        with torch.no_grad():  # PEFT divides by l + 1e-8
            self._scale_base(1.0 / (self.ia3_l[adapter_name].detach().float() + 1e-8), False, adapter_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        name = self.active_adapter
        if self.disable_adapters or self.merged or name is None:
            return self.base_layer(x, *args, **kwargs)
        dtype = self.base_layer.weight.dtype
        bias = self.base_layer.bias
        y = ops.ia3_linear(x.to(dtype), self.base_weight(), bias, self.ia3_l[name].to(dtype).reshape(-1),
                           self.is_feedforward)
        # under autocast the op returns the autocast dtype, as PEFT's layer (its base linear) does
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, feedforward={self.is_feedforward}, {super().extra_repr()}"


class IA3Conv(IA3Linear):
    """An nn.Conv2d/3d with IA3 vectors; PEFT's `ia3.Conv2d/3d`: `ia3_l` is `[1, C, 1, ...]` (C the
    input channels for feedforward targets, else the output channels); reference path only."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: IA3Config, key: str, is_feedforward: bool):
        AdapterLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()
        self.update_layer(adapter_name, config, key)

    def update_layer(self, adapter_name: str, config: IA3Config, key: str) -> None:
        features = self.in_features if self.is_feedforward else self.out_features
        shape = (1, features) + (1,) * (self.base_layer.weight.dim() - 2)
        device = self.base_layer.weight.device
        vector = torch.ones(shape, device=device) if config.init_ia3_weights else torch.randn(shape, device=device)
        self.ia3_l[adapter_name] = nn.Parameter(vector)

    def _weight_scale(self, vector: torch.Tensor) -> torch.Tensor:
        """`ia3_l` broadcast over the weight [out, in/groups, *k] (PEFT's _get_ia3_scaling_for_weight)."""
        if not self.is_feedforward:
            return vector.transpose(0, 1)
        base = self.base_layer
        if base.groups == 1:
            return vector
        per_in, per_out = base.in_channels // base.groups, base.out_channels // base.groups
        grouped = vector.reshape(base.groups, 1, per_in, *vector.shape[2:])
        grouped = grouped.expand(base.groups, per_out, per_in, *vector.shape[2:])
        return grouped.reshape(base.out_channels, per_in, *vector.shape[2:])

    def _scale_base(self, vector: torch.Tensor, safe_merge: bool, adapter_name: str) -> None:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        new_w = weight.float() * self._weight_scale(vector.float())
        new_b = None if self.is_feedforward or bias is None else bias.float() * vector.float().reshape(bias.shape)
        if safe_merge and not all(torch.isfinite(t).all() for t in (new_w, new_b) if t is not None):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
        weight.copy_(new_w.to(weight.dtype))
        if new_b is not None:
            bias.copy_(new_b.to(bias.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        name = self.active_adapter
        if self.disable_adapters or self.merged or name is None:
            return self.base_layer(x, *args, **kwargs)
        vector = self.ia3_l[name]
        if self.is_feedforward:
            y = self.base_layer((x.to(vector.dtype) * vector).to(self.base_layer.weight.dtype), *args, **kwargs)
        else:
            y = self.base_layer(x, *args, **kwargs).to(vector.dtype) * vector
        return y.to(x.dtype)

    def __repr__(self) -> str:
        return "ia3." + type(self.base_layer).__name__ + super().__repr__()[len(type(self).__name__):]


class IA3Model(BaseTuner):
    """Injects `IA3Linear` into the targets of an `IA3Config`; PEFT's `IA3Model`."""

    prefix: ClassVar[str] = "ia3_"
    layer_cls: ClassVar[type[AdapterLayer]] = IA3Linear

    # PEFT's defaults (TRANSFORMERS_MODELS_TO_IA3_*_MAPPING) for the architectures fastpeft tests.
    DEFAULT_TARGETS: ClassVar[dict[str, list[str]]] = {
        "llama": ["k_proj", "v_proj", "down_proj"],
        "gpt2": ["c_attn", "mlp.c_proj"],
        "bert": ["key", "value", "output.dense"],
    }
    DEFAULT_FEEDFORWARD: ClassVar[dict[str, list[str]]] = {
        "llama": ["down_proj"],
        "gpt2": ["mlp.c_proj"],
        "bert": ["output.dense"],
    }

    def targets(self, config: IA3Config) -> list[tuple[str, nn.Module]]:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        for name, table in (("target_modules", self.DEFAULT_TARGETS), ("feedforward_modules", self.DEFAULT_FEEDFORWARD)):
            if getattr(config, name) is None:
                if model_type not in table:
                    raise ValueError(f"{name} is required: no default for model type {model_type!r}")
                setattr(config, name, set(table[model_type]))
        targets = super().targets(config)
        for key, module in targets:  # checked before anything is injected
            if isinstance(module.base_layer if isinstance(module, IA3Linear) else module, Linear4bit):
                raise NotImplementedError(f"{key}: IA3 over a 4-bit (NF4) base layer is not implemented")
            if isinstance(module, IA3Linear) and module.is_feedforward != config.is_feedforward(key):
                raise ValueError(f"{key}: feedforward={config.is_feedforward(key)} differs from the IA3 adapters it holds")
        return targets

    SUPPORTED: ClassVar[str] = "nn.Linear, transformers' Conv1D, nn.Conv2d and nn.Conv3d"

    def supports(self, target: nn.Module) -> bool:
        return inject.is_linear(target) or isinstance(target, CONV_TYPES)

    def _create_layer(self, target: nn.Module, adapter_name: str, config: IA3Config, key: str) -> IA3Linear:
        if isinstance(target, CONV_TYPES):
            return IA3Conv(target, adapter_name, config, key, config.is_feedforward(key))
        if config.fan_in_fan_out != _is_conv1d(target):  # PEFT corrects the flag to the layer type, loudly
            warnings.warn(f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(target).__name__}: flipped")
            config.fan_in_fan_out = _is_conv1d(target)
        return IA3Linear(target, adapter_name, config, key, config.is_feedforward(key))

    def _update_layer(self, layer: IA3Linear, adapter_name: str, config: IA3Config, key: str) -> None:
        layer.update_layer(adapter_name, config, key)

    def _adapter_shapes(self, target: nn.Module, config: IA3Config, key: str) -> dict[str, tuple[int, ...]]:
        if isinstance(target, CONV_TYPES):
            features = target.in_channels if config.is_feedforward(key) else target.out_channels
            return {LAYER_NAME: (1, features) + (1,) * (target.weight.dim() - 2)}
        out_f, in_f = target.weight.shape
        if _is_conv1d(target):
            out_f, in_f = in_f, out_f
        return {LAYER_NAME: (1, in_f) if config.is_feedforward(key) else (out_f, 1)}


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = inject.conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


registry.register(IA3Config, tuner=IA3Model)
