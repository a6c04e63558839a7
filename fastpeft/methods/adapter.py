"""Bottleneck adapters: Houlsby et al. 2019, Pfeiffer et al. 2021, and He et al. 2022's parallel
adapter. Config, layer, injection rule. PEFT has none: the format is ours (`peft_type`
"BOTTLENECK"), with PEFT's file names and key scheme: ``base_model.model.<wrapped module>.
adapter_down.{weight,bias}`` ([b, H], [b]) and ``adapter_up.{weight,bias}`` ([H, b], [H]), fp32.

The adapter is ``A(h) = s * (act(dropout(h) Wd^T + bd) Wu^T + bu)`` with bottleneck width
``b = bottleneck_size or H // reduction_factor``; Wu and bu start at zero (init_adapter_weights),
so a fresh adapter leaves the model's outputs unchanged. Every call is one fused launch on CUDA
(`ops.bottleneck_adapter`, kernels/adapter.py).

Where it goes (module wrapping, the model's code untouched):
  houlsby   serial, after attention AND after the FFN: ``h + A(h)`` on the output of the sub-layer's
            output projection, before the block's residual add (and dropout / LayerNorm);
  pfeiffer  serial, after the FFN only;
  parallel  beside the FFN, reading the FFN's input x: ``FFN(x) + A(x)`` (He et al.; their scaling
            s = 4 is a good choice here, the default s = 1 keeps the serial variants' meaning).
The wrapped modules per architecture (PATHS below):
  llama  attention `self_attn.o_proj`, FFN `mlp.down_proj`, parallel `mlp`;
  gpt2   attention `attn.c_proj`, FFN `mlp.c_proj`, parallel `mlp`;
  bert   attention `attention.output.dense`, FFN `layer.N.output.dense`, parallel `layer.N.output`
         (BertOutput(h, x) = LayerNorm(dropout(dense(h)) + x): the adapter's output joins its
         residual input x, which is exactly ``FFN(x) + A(x)`` before the LayerNorm).
`target_modules` (regexes, full match) replaces these for other models: serial variants wrap
modules whose output is the hidden state, parallel ones modules ``x -> FFN(x)``.
Adapters cannot be merged into weights (the non-linearity sits between the projections): merging
raises.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fastpeft import inject, ops, registry
from fastpeft.config import PeftConfig
from fastpeft.methods.base import AdapterLayer, BaseTuner, ModulesToSaveWrapper

MAX_BOTTLENECK = 256  # the fused kernel keeps the [rows, b] tile in registers
VARIANTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")

# model_type -> role -> regex of the module wrapped for it (see the module docstring)
PATHS: dict[str, dict[str, str]] = {
    "llama": {"attention": r".*\.self_attn\.o_proj", "ffn": r".*\.mlp\.down_proj", "parallel": r".*\.mlp"},
    "gpt2": {"attention": r".*\.attn\.c_proj", "ffn": r".*\.mlp\.c_proj", "parallel": r".*\.mlp"},
    "bert": {
        "attention": r".*\.attention\.output\.dense",
        "ffn": r".*\.layer\.\d+\.output\.dense",
        "parallel": r".*\.layer\.\d+\.output",
    },
}
ROLES = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",), "parallel": ("parallel",)}


@dataclass
class BottleneckFields:
    """A bottleneck adapter's own fields, shared by `AdapterConfig` and the hybrids that carry one
    (MAM, UniPELT), so each field and its meaning are stated once."""

    reduction_factor: int = field(default=16, metadata={"help": "Bottleneck width = hidden size // reduction_factor."})
    bottleneck_size: int | None = field(default=None, metadata={"help": "Bottleneck width; overrides reduction_factor."})
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = field(default="relu", metadata={"help": "Bottleneck activation."})
    scaling: float = field(default=1.0, metadata={"help": "s in h + s * up(act(down(h)))."})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input (training only)."})
    init_adapter_weights: bool = field(
        default=True, metadata={"help": "True: up-projection zero (identity at init); False: random (tests)."}
    )

    def bottleneck(self, variant: str) -> AdapterConfig:
        """These fields as the bottleneck tuner's config, for `variant` at its default places."""
        own = {f.name: getattr(self, f.name) for f in fields(BottleneckFields)}
        return AdapterConfig(variant=variant, inference_mode=self.inference_mode, **own)


@dataclass
class AdapterConfig(PeftConfig, BottleneckFields):
    """A bottleneck adapter (fastpeft's own format: PEFT has no such method)."""

    PEFT_TYPE: ClassVar[str] = "BOTTLENECK"

    variant: Literal["houlsby", "pfeiffer", "parallel"] = field(
        default="pfeiffer", metadata={"help": "houlsby (after attention and FFN), pfeiffer (after FFN), parallel (beside FFN)."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Regexes of the modules to wrap; None: the variant's places per architecture."}
    )
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved."})

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {ACTIVATIONS}, got {self.non_linearity!r}")
        for name in ("reduction_factor", "bottleneck_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r} (a zero-width bottleneck)")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(self.target_modules)

    def width(self, hidden: int, key: str) -> int:
        """The bottleneck width for a hidden size; refuses zero-width and too-wide bottlenecks."""
        b = self.bottleneck_size or hidden // self.reduction_factor
        if b < 1:
            raise ValueError(f"{key}: reduction_factor={self.reduction_factor} leaves a zero-width bottleneck for "
                             f"hidden size {hidden}; use a smaller reduction_factor or set bottleneck_size")
        if b > MAX_BOTTLENECK:
            raise ValueError(f"{key}: bottleneck width {b} exceeds the fused kernel's limit {MAX_BOTTLENECK}")
        return b


class BottleneckAdapterLayer(AdapterLayer):
    """A sub-layer module plus named bottleneck adapters. `mode`: "serial" (``h + A(h)`` on the
    module's output), "parallel" (``module(x) + A(x)``), "parallel_residual" (BERT's BertOutput:
    its residual input x becomes ``x + A(x)``)."""

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("adapter_down", "adapter_up")
    other_param_names: ClassVar[tuple[str, ...]] = ("scaling", "non_linearity", "dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdapterConfig, key: str,
                 mode: str, hidden: int):
        super().__init__(base_layer)
        self.mode, self.hidden = mode, hidden
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.non_linearity: dict[str, str] = {}
        self.dropout: dict[str, float] = {}
        self.update_layer(adapter_name, config, key)

    def update_layer(self, adapter_name: str, config: AdapterConfig, key: str) -> None:
        b = config.width(self.hidden, key)
        device = next(itertools.chain(self.base_layer.parameters(), self.base_layer.buffers())).device
        down = nn.Linear(self.hidden, b, device=device, dtype=torch.float32)
        up = nn.Linear(b, self.hidden, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        if config.init_adapter_weights:  # near identity: the adapter adds exactly zero at init
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        self.scaling[adapter_name] = float(config.scaling)
        self.non_linearity[adapter_name] = config.non_linearity
        self.dropout[adapter_name] = config.adapter_dropout

    def merge(self, adapter_name: str, safe_merge: bool = False) -> None:
        raise ValueError(f"bottleneck adapter {adapter_name!r} cannot be merged into the weights: the "
                         f"non-linearity between its projections has no weight-space equivalent")

    def _adapt(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        name = self.active_adapter
        down, up = self.adapter_down[name], self.adapter_up[name]
        dtype = h.dtype
        return ops.bottleneck_adapter(
            h, down.weight.to(dtype), down.bias.to(dtype), up.weight.to(dtype), up.bias.to(dtype),
            self.scaling[name], self.non_linearity[name], residual=residual,
            dropout=self.dropout[name] if self.training else 0.0,
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters or self.active_adapter is None:
            return self.base_layer(*args, **kwargs)
        if self.mode == "serial":
            return self._adapt(self.base_layer(*args, **kwargs))
        if self.mode == "parallel":
            return self._adapt(args[0], residual=self.base_layer(*args, **kwargs))
        hidden, residual, *rest = args  # parallel_residual: BertOutput(hidden_states, input_tensor)
        return self.base_layer(hidden, self._adapt(residual), *rest, **kwargs)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, hidden={self.hidden}, {super().extra_repr()}"


class BottleneckModel(BaseTuner):
    """Wraps the sub-layers an `AdapterConfig` puts adapters on."""

    prefix: ClassVar[str] = "adapter_"
    layer_cls: ClassVar[type[AdapterLayer]] = BottleneckAdapterLayer

    def _patterns(self, config: AdapterConfig) -> list[tuple[str, str]]:
        """(regex, mode) pairs for this model and variant."""
        mode = "serial" if config.variant != "parallel" else "parallel"
        if config.target_modules is not None:
            targets = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
            return [(t, mode) for t in targets]
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type not in PATHS:
            raise ValueError(f"target_modules is required: no adapter placement known for model type {model_type!r} "
                             f"(known: {sorted(PATHS)})")
        out = [(PATHS[model_type][role], mode) for role in ROLES[config.variant]]
        if model_type == "bert" and config.variant == "parallel":
            out = [(out[0][0], "parallel_residual")]
        return out

    def _mode(self, config: AdapterConfig, key: str) -> str | None:
        for pattern, mode in self._patterns(config):
            if re.fullmatch(pattern, key):
                return mode
        return None

    def targets(self, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
        inner = {f"{p}.{s}" for p, m in self.model.named_modules() if isinstance(m, (self.layer_cls, ModulesToSaveWrapper))
                 for s, _ in m.named_modules() if s}
        layers = config.layers_to_transform
        layers = [layers] if isinstance(layers, int) else layers
        out = []
        for key, module in self.model.named_modules():
            if not key or key in inner or self._mode(config, key) is None:
                continue
            if layers is not None:
                index = re.search(r"\.(\d+)(\.|$)", key)
                if index is None or int(index[1]) not in layers:
                    continue
            out.append((key, module))
        if not out:
            raise ValueError(f"bottleneck adapter ({config.variant}): no module matches "
                             f"{[p for p, _ in self._patterns(config)]} in {type(self.model).__name__}")
        for key, module in out:  # widths validated before anything is wrapped
            config.width(self._hidden(module, config, key), key)
        return out

    def _hidden(self, module: nn.Module, config: AdapterConfig, key: str) -> int:
        base = module.base_layer if isinstance(module, self.layer_cls) else module
        if self._mode(config, key) == "serial" and inject.is_linear(base):
            conv1d = inject.conv1d_class()
            return base.nf if conv1d is not None and isinstance(base, conv1d) else base.out_features
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
        if hidden is None:
            raise ValueError(f"{key}: cannot tell the hidden size (no model.config.hidden_size)")
        return hidden

    def _create_layer(self, target: nn.Module, adapter_name: str, config: AdapterConfig, key: str):
        return BottleneckAdapterLayer(target, adapter_name, config, key, self._mode(config, key),
                                      self._hidden(target, config, key))

    def _update_layer(self, layer: BottleneckAdapterLayer, adapter_name: str, config: AdapterConfig, key: str) -> None:
        if layer.mode != self._mode(config, key):
            raise ValueError(f"{key}: a {self._mode(config, key)} adapter cannot join the {layer.mode} ones there")
        layer.update_layer(adapter_name, config, key)

    def _adapter_shapes(self, target: nn.Module, config: AdapterConfig, key: str) -> dict[str, tuple[int, ...]]:
        h = self._hidden(target, config, key)
        b = config.width(h, key)
        return {"adapter_down.weight": (b, h), "adapter_down.bias": (b,),
                "adapter_up.weight": (h, b), "adapter_up.bias": (h,)}


registry.register(AdapterConfig, tuner=BottleneckModel)
