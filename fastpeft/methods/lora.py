"""LoRA (Hu et al. 2021) and rsLoRA: config, layer, injection rule.

`y = x W^T + b + s * (dropout(x) A^T) B^T` with `A: [r, in]`, `B: [out, r]`, `s = alpha / r`
(`alpha / sqrt(r)` with rsLoRA). The layer computes it through `ops.lora_linear`: on CUDA one fused
Triton launch, on CPU the PyTorch reference. `use_dora=True` makes an adapter DoRA: its magnitude
lives in `lora_magnitude_vector` and its math in fastpeft/methods/dora.py.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fastpeft import batching, inject, ops, registry
from fastpeft.config import PeftConfig
from fastpeft.methods import dora, lora_layers
from fastpeft.methods.base import AdapterLayer, BaseTuner, acc, adapter_dtype
from fastpeft.quant.nf4 import Linear4bit


@dataclass
class LoraConfig(PeftConfig):
    """PEFT's `LoraConfig`: same fields, defaults, validation and JSON keys."""

    PEFT_TYPE: ClassVar[str] = "LORA"
    UNSUPPORTED_FIELDS: ClassVar[dict[str, Any]] = {
        "lora_bias": False,
        "layer_replication": None,
        "target_parameters": None,
        "trainable_token_indices": None,
        "use_qalora": False,
        "megatron_config": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "arrow_config": None,
        "alora_invocation_tokens": None,
        "use_bdlora": None,
        "lora_ga_config": None,
        "monteclora_config": None,
        "velora_config": None,
        "kasa_config": None,
        "runtime_config": None,
        "ensure_weight_tying": False,
    }
    IGNORED_FIELDS: ClassVar[tuple[str, ...]] = (
        *PeftConfig.IGNORED_FIELDS,
        "megatron_core",
        "qalora_group_size",
        "lora_ga_config",
    )

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names (suffix match), a regex (full match) or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Names never adapted."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha; scaling = alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored [in, out] (GPT-2 Conv1D)."})
    bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={"help": "Which biases train."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scaling = alpha / sqrt(r)."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved."})
    init_lora_weights: bool | Literal["gaussian"] = field(
        default=True, metadata={"help": "True: A Kaiming-uniform, B zero; 'gaussian': A ~ N(0, 1/r); False: random B."}
    )
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Per-module rank by regex."})
    alpha_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Per-module alpha by regex."})
    use_dora: bool = field(
        default=False, metadata={"help": "DoRA: a trained magnitude per output row times the normalized W + s B A."}
    )

    def __post_init__(self):
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")
        for key, r in self.rank_pattern.items():
            if not isinstance(r, int) or r <= 0:
                raise ValueError(f"rank_pattern[{key!r}] = {r!r}: ranks must be positive integers")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        r = inject.pattern_value(self.rank_pattern, key, self.r)
        return r, inject.pattern_value(self.alpha_pattern, key, self.lora_alpha)


class LoraLinear(AdapterLayer):
    """An nn.Linear (or GPT-2 Conv1D) with LoRA adapters; PEFT's `lora.Linear` layout."""

    # lora_magnitude_vector holds DoRA adapters' magnitudes (fastpeft/methods/dora.py); it stays
    # empty, and out of every state dict, for plain LoRA adapters.
    adapter_layer_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", dora.LAYER_NAME)
    other_param_names: ClassVar[tuple[str, ...]] = ("r", "lora_alpha", "scaling", "lora_dropout")
    @property
    def mixed_batch(self):
        """The `adapter_names=` call running this layer in the calling thread (bound by
        fastpeft.multi.mixed_batch, per call, never stored on the layer), or None."""
        bound = batching.batch_for(self)
        return None if bound is None else bound[0]

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, key: str):
        super().__init__(base_layer)
        # Conv1D stores its weight [in, out]; the kernel reads it through a transposed view.
        self.fan_in_fan_out = _is_conv1d(base_layer)
        weight = base_layer.weight
        self.out_features, self.in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_dropout: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.update_layer(adapter_name, config, key)

    def update_layer(self, adapter_name: str, config: LoraConfig, key: str) -> None:
        r, alpha = config.rank_and_alpha(key)
        weight = self.base_layer.weight
        # Adapters live in fp32 even on a 16-bit base (PEFT's autocast_adapter_dtype); forward casts.
        a = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=adapter_dtype(weight))
        b = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=adapter_dtype(weight))
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
            self.lora_magnitude_vector[adapter_name] = dora.DoraMagnitude.init_from(
                self.base_weight(), a.weight, b.weight, self.scaling[adapter_name]
            )

    def base_weight(self) -> torch.Tensor:
        """The base weight as `[out, in]` (a view for Conv1D: never a copy)."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`s * B A` as `[out, in]`, in fp32 (fp64 for fp64 adapters)."""
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return (acc(b) @ acc(a)) * self.scaling[adapter_name]

    def adapter_state_dict(self, adapter_name: str) -> dict[str, Any]:
        return dora.to_checkpoint(super().adapter_state_dict(adapter_name))

    def load_adapter_state_dict(self, adapter_name: str, state: dict[str, Any]) -> None:
        super().load_adapter_state_dict(adapter_name, dora.from_checkpoint(state))

    def write_base_weight(self, weight: torch.Tensor, adapter_name: str, safe_merge: bool = False) -> float | None:
        """Store a merged or unmerged `[out, in]` weight as the base weight, cast to its dtype: the
        one place merges write (LoRA and DoRA). `safe_merge` refuses NaN/inf first (PEFT's message).
        Returns the rounding error a lossy store adds (None here: only the cast rounds)."""
        check_finite(weight, adapter_name, safe_merge)
        base = self.base_weight()
        base.copy_(weight.to(base.dtype))
        return None

    def _merge_into_base(self, adapter_name: str, safe_merge: bool) -> float | None:
        with torch.no_grad():
            if adapter_name in self.lora_magnitude_vector:
                return dora.merge(self, adapter_name, safe_merge)
            weight = self.base_weight()
            merged = weight + self.get_delta_weight(adapter_name).to(weight.dtype)
            return self.write_base_weight(merged, adapter_name, safe_merge)

    def merge(self, adapter_name: str, safe_merge: bool = False) -> None:
        self._merge_into_base(adapter_name, safe_merge)
        self.merged_adapters.append(adapter_name)

    def _unmerge_one(self, adapter_name: str) -> None:
        if adapter_name in self.lora_magnitude_vector:
            dora.unmerge(self, adapter_name)
            return
        with torch.no_grad():
            weight = self.base_weight()
            self.write_base_weight(weight - self.get_delta_weight(adapter_name).to(weight.dtype), adapter_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        bound = batching.batch_for(self)  # this call's (batch, bank), or None
        if bound is not None and not self.disable_adapters:
            return ops.multi_lora_linear(x, self.base_weight(), self.base_layer.bias, bound[1],
                                         bound[0].groups_for(x))
        name = self.active_adapter
        if self.disable_adapters or self.merged or name is None:
            return self.base_layer(x, *args, **kwargs)
        dtype = self.base_layer.weight.dtype
        col_scale = None
        if name in self.lora_magnitude_vector:  # DoRA: m / ||W + s B A|| in the kernel's epilogue
            col_scale = self.lora_magnitude_vector[name].factor(
                self.base_weight(), self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], dtype
            )
        return ops.lora_linear(
            x,
            self.base_weight(),
            self.base_layer.bias,
            self.lora_A[name].weight.to(dtype),
            self.lora_B[name].weight.to(dtype),
            self.scaling[name],
            dropout=self.lora_dropout[name] if self.training else 0.0,
            col_scale=col_scale,
        )

    def extra_repr(self) -> str:
        ranks = {n: self.r[n] for n in self.adapters}
        return f"in={self.in_features}, out={self.out_features}, r={ranks}, {super().extra_repr()}"


class LoraEmbedding(lora_layers.EmbeddingLayer, LoraLinear):
    """LoRA on an nn.Embedding: PEFT's `lora.Embedding` (fastpeft/methods/lora_layers.py)."""


class LoraConv(lora_layers.ConvLayer, LoraLinear):
    """LoRA on an nn.Conv1d/2d/3d: PEFT's `lora.Conv1d/2d/3d` (fastpeft/methods/lora_layers.py)."""


class LoraModel(BaseTuner):
    """Injects `LoraLinear` into the targets of a `LoraConfig`; PEFT's `LoraModel`."""

    prefix: ClassVar[str] = "lora_"
    layer_cls: ClassVar[type[AdapterLayer]] = LoraLinear

    # PEFT's defaults for the architectures fastpeft is tested on, used when target_modules is None.
    DEFAULT_TARGETS: ClassVar[dict[str, list[str]]] = {
        "llama": ["q_proj", "v_proj"],
        "gpt2": ["c_attn"],
        "bert": ["query", "value"],
    }

    def targets(self, config: LoraConfig) -> list[tuple[str, nn.Module]]:
        if config.target_modules is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            if model_type not in self.DEFAULT_TARGETS:
                raise ValueError(f"target_modules is required: no default for model type {model_type!r}")
            config.target_modules = set(self.DEFAULT_TARGETS[model_type])
        return super().targets(config)

    def _create_layer(self, target: nn.Module, adapter_name: str, config: LoraConfig, key: str) -> LoraLinear:
        if isinstance(target, Linear4bit):  # PEFT's dispatch_bnb_4bit: LoRA over an NF4 base
            return NF4LoraLinear(target, adapter_name, config, key)
        if isinstance(target, nn.Embedding):
            return LoraEmbedding(target, adapter_name, config, key)
        if isinstance(target, lora_layers.CONV_TYPES):
            return LoraConv(target, adapter_name, config, key)
        if config.fan_in_fan_out != _is_conv1d(target):  # PEFT corrects the flag to the layer type, loudly
            warnings.warn(f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(target).__name__}: flipped")
            config.fan_in_fan_out = _is_conv1d(target)
        return LoraLinear(target, adapter_name, config, key)

    def _update_layer(self, layer: LoraLinear, adapter_name: str, config: LoraConfig, key: str) -> None:
        layer.update_layer(adapter_name, config, key)

    SUPPORTED: ClassVar[str] = "nn.Linear, transformers' Conv1D, nn.Embedding and nn.Conv1d/2d/3d"

    def supports(self, target: nn.Module) -> bool:
        # subclasses with a layer type of their own (AdaLoRA's SVDLinear, UniPELT's) adapt linears only
        return inject.is_linear(target) or (self.layer_cls is LoraLinear and lora_layers.is_lora_target(target))

    def _adapter_shapes(self, target: nn.Module, config: LoraConfig, key: str) -> dict[str, tuple[int, ...]]:
        other = lora_layers.adapter_shapes(target, config, key)  # Embedding, ConvNd
        if other is not None:
            return other
        out_f, in_f = target.weight.shape
        if isinstance(target, Linear4bit):  # its `weight` is the packed 4-bit buffer
            out_f, in_f = target.out_features, target.in_features
        if _is_conv1d(target):
            out_f, in_f = in_f, out_f
        r, _ = config.rank_and_alpha(key)
        shapes = {"lora_A.weight": (r, in_f), "lora_B.weight": (out_f, r)}
        if config.use_dora:
            shapes[dora.LAYER_NAME] = (out_f,)
        return shapes


def check_finite(weight: torch.Tensor, adapter_name: str, safe_merge: bool) -> None:
    """`safe_merge`: refuse a merged weight with NaN/inf before it is stored (PEFT's message)."""
    if safe_merge and not torch.isfinite(weight).all():
        raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")


def requantize_into(base: Linear4bit, weight: torch.Tensor, adapter_name: str, safe_merge: bool) -> float:
    """Store a merged (or unmerged) `[out, in]` weight in an NF4 base by re-quantizing it, PEFT's
    4-bit merge; returns the rounding error that adds, max |dequant(new codes) - weight|."""
    check_finite(weight, adapter_name, safe_merge)
    base.requantize_(weight)
    return (base.dequantize(torch.float32) - weight).abs().max().item()


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = inject.conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


class NF4LoraLinear(LoraLinear):
    """LoRA over a fastpeft NF4 `Linear4bit` (QLoRA); PEFT's `lora.bnb.Linear4bit`.

    Forward is `ops.nf4_linear` in the base layer's compute dtype: the 4-bit matmul, bias and LoRA
    term in one fused launch, the base weight frozen. Merging follows PEFT: dequantize, add the
    delta, re-quantize; the added rounding error (PEFT only warns about it) is measured and kept
    in `merge_error[adapter]` (max |requantized - exact merged|) and reported in the warning.

    DoRA (`use_dora=True`, PEFT supports it on bnb's 4-bit layers) uses the dequantized fp32 W for
    the norm ``||W + s B A||`` (cached in eval mode, keyed on the packed codes and scales, see
    fastpeft/methods/dora.py) and passes ``m / ||.||`` to the fused kernel as its column scale;
    its merge and unmerge also go through dequantize, merge, re-quantize.
    """

    def update_layer(self, adapter_name: str, config: LoraConfig, key: str) -> None:
        # LoraLinear.__init__ read the features off `weight`, which here is the packed buffer.
        self.out_features, self.in_features = self.base_layer.out_features, self.base_layer.in_features
        if not hasattr(self, "merge_error"):
            self.merge_error: dict[str, float] = {}
        super().update_layer(adapter_name, config, key)

    def base_weight(self) -> torch.Tensor:
        """The dequantized `[out, in]` base weight (a new tensor: NF4 has no view of it)."""
        return self.base_layer.dequantize(torch.float32)

    def base_weight_sources(self) -> tuple[torch.Tensor, ...]:
        """The stored tensors the dequantized weight is computed from (they key DoRA's cache)."""
        base = self.base_layer
        return tuple(t for t in (base.weight, base.absmax, base.nested_absmax, base.offset) if t is not None)

    def write_base_weight(self, weight: torch.Tensor, adapter_name: str, safe_merge: bool = False) -> float:
        """Re-quantize `weight` into the NF4 base; returns the added rounding error (max abs)."""
        error = requantize_into(self.base_layer, weight, adapter_name, safe_merge)
        for magnitude in self.lora_magnitude_vector.values():  # new tensors: never trust old stamps
            magnitude.clear_cache()
        return error

    def merge(self, adapter_name: str, safe_merge: bool = False) -> None:
        error = self._merge_into_base(adapter_name, safe_merge)
        self.merge_error[adapter_name] = error
        warnings.warn(f"Merging LoRA adapter {adapter_name!r} into a 4-bit (NF4) base re-quantizes the weight: "
                      f"max added rounding error {error:.3g} (generations may differ slightly)")
        self.merged_adapters.append(adapter_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        base = self.base_layer
        dtype = base.compute_dtype
        bound = batching.batch_for(self)  # this call's (batch, bank), or None
        if bound is not None and not self.disable_adapters:  # every adapter over the 4-bit base
            bias = None if base.bias is None else base.bias.to(dtype)
            y = ops.multi_lora_linear(x.to(dtype), base.nf4_weight(), bias, bound[1], bound[0].groups_for(x))
            return y.to(x.dtype)
        name = self.active_adapter
        if self.disable_adapters or self.merged or name is None:
            return self.base_layer(x, *args, **kwargs)
        col_scale = None
        if name in self.lora_magnitude_vector:  # DoRA: the norm of the dequantized W, cached in eval
            col_scale = self.lora_magnitude_vector[name].factor(
                self.base_weight, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], dtype,
                weight_sources=self.base_weight_sources(),
            )
        y = ops.nf4_linear(
            x.to(dtype),
            base.nf4_weight(),
            None if base.bias is None else base.bias.to(dtype),
            self.lora_A[name].weight.to(dtype),
            self.lora_B[name].weight.to(dtype),
            self.scaling[name],
            dropout=self.lora_dropout[name] if self.training else 0.0,
            col_scale=col_scale,
        )
        return y.to(x.dtype)


registry.register(LoraConfig, tuner=LoraModel)
