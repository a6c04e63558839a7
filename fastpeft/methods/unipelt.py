"""UniPELT (Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model
Tuning"): LoRA, prefix tuning and a bottleneck adapter in every layer, each behind a learned gate,
as one config.

PEFT has no such method: `peft_type` "UNIPELT" is ours. Like MAM (fastpeft/methods/mam.py) it
composes existing pieces instead of re-implementing them; each gets its gate here:
  lora      LoRA on the attention projections (`target_modules`, default q_proj/v_proj on Llama,
            c_attn on GPT-2, query/value on BERT: PEFT's defaults), as a `LoraLinear` subclass:
            ``y = W x + b + g_L(x) * s * B A dropout(x)`` with the per-token gate
            ``g_L(x) = sigmoid(x w_L + b_L)`` read from the projection's input, i.e. the attention
            sub-layer's (normalized) input, as in the paper;
  adapter   the Pfeiffer bottleneck adapter after the FFN (the paper's placement), as a
            `BottleneckAdapterLayer` subclass: ``h + g_A(h) * s * up(act(down(h)))`` with
            ``g_A(h) = sigmoid(h w_A + b_A)`` per token, read from the adapter's input h (the FFN's
            output, where the adapter sits); the adapter itself is still one fused launch;
  prefix    Prefix Tuning exactly as `fastpeft.methods.prefix` (the cache handed to the model, GQA
            layout, generate), with layer l's prefix VALUES scaled by ``g_P[l] = sigmoid(p_l)``, a
            learned scalar per layer.
Gates are scalars (one per token for LoRA and the adapter) in fp32, initialized as nn.Linear.

Deviation (the prefix gate). The paper's prefix gate is ``sigmoid(W x + b)`` of the attention
input x, per token: it scales how much of each query's attention output comes from the prefix. That
is a per-QUERY factor on the prefix's share of the attention output; the prefix is handed to the
model as a cache of per-POSITION keys and values built before the forward, which cannot carry a
factor that depends on the query without an attention hook per architecture (and through
`generate`, on every step). Scaling the cached values by an input-dependent gate of some token
would not be the paper's gate either. So the prefix gate here is input-independent: one learned
scalar per layer on the prefix values (keys untouched), which scales the prefix's contribution to
every query of that layer; the LoRA and adapter gates are the paper's, per token, and therefore
causal (a gate averaged over the sequence, as some implementations do, would see future tokens and
change between a full forward and cached decoding).

Identity at init. With the default zero-init parts (LoRA B = 0, adapter up-projection = 0) the LoRA
and adapter branches add exactly zero whatever their gates, so a fresh UniPELT model is exactly
Prefix Tuning with its prefix values halved (``g_P = sigmoid(0) = 1/2``); with the prefix gate
saturated (p = +inf) it is exactly Prefix Tuning with the same prefix. Tested bit-exact.

Checkpoint (`adapter_config.json` + `adapter_model.safetensors`, fp32; keys as MAM's):
  ``prompt_embeddings``                        [P, num_layers * 2 * token_dim] the flat, UNGATED
                                               prefix (the encoder's output, as Prefix Tuning saves it)
  ``prefix_gate``                              [num_layers]  the logits p_l of the prefix gates
  ``base_model.<proj>.lora_A.weight``          [r, in]    ``.lora_B.weight`` [out, r]
  ``base_model.<proj>.lora_gate.weight``       [1, in]    ``.lora_gate.bias`` [1]
  ``base_model.<ffn>.adapter_down.weight``     [b, H]     ``.adapter_down.bias`` [b]
  ``base_model.<ffn>.adapter_up.weight``       [H, b]     ``.adapter_up.bias``   [H]
  ``base_model.<ffn>.adapter_gate.weight``     [1, H]     ``.adapter_gate.bias`` [1]
  ``base_model.<path>.<param>``                modules_to_save copies (e.g. a SEQ_CLS head)
with ``<proj>`` e.g. ``model.layers.0.self_attn.q_proj`` and ``<ffn>`` the adapter's place per
architecture (`fastpeft.methods.adapter.PATHS`, role "ffn": ``model.layers.0.mlp.down_proj``,
``transformer.h.0.mlp.c_proj``). As every prompt-learning checkpoint, it loads frozen.

Nothing merges (the gates depend on each token's input; the prefix is extra keys and values; the
adapter has a non-linearity): merging raises. The gated LoRA term runs unfused (the fused kernel
takes one scalar scaling, the gate is one per token). Mixed-adapter batches are refused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft import checkpoint, prompting
from fastpeft.config import PeftConfig, register_config
from fastpeft.methods.adapter import AdapterConfig, BottleneckAdapterLayer, BottleneckFields, BottleneckModel
from fastpeft.methods.lora import LoraConfig, LoraLinear, LoraModel
from fastpeft.methods.prefix import PrefixTuningConfig
from fastpeft.quant.nf4 import Linear4bit

PREFIX_GATE = "prefix_gate"  # checkpoint key of the per-layer prefix gate logits


@register_config
@dataclass
class UniPELTConfig(PrefixTuningConfig, BottleneckFields):
    """Prefix tuning (the inherited fields) + gated LoRA + a gated Pfeiffer adapter, one config."""

    PEFT_TYPE: ClassVar[str] = "UNIPELT"

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha; scaling = alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "LoRA targets (PEFT's rules); None: the attention q/v projections."}
    )
    init_lora_weights: bool = field(default=True, metadata={"help": "True: LoRA B zero; False: random (tests)."})
    scaling: float = field(default=1.0, metadata={"help": "s in h + g * s * up(act(down(h)))."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_virtual_tokens is None:
            raise ValueError("UniPELTConfig needs its prefix part: set num_virtual_tokens (a positive integer)")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(self.target_modules)
        self.lora_config()  # each part's own checks (rank, dropout; zero-width bottleneck, activation)
        self.adapter_config()

    def lora_config(self) -> LoraConfig:
        """The LoRA part as LoRA's config (its target rules and defaults)."""
        return LoraConfig(
            r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, init_lora_weights=self.init_lora_weights,
            target_modules=self.target_modules,
            inference_mode=self.inference_mode,
        )

    def adapter_config(self) -> AdapterConfig:
        """The adapter part as the bottleneck tuner's config (Pfeiffer: after the FFN only)."""
        return self.bottleneck("pfeiffer")


def _gate(gates: nn.ModuleDict, name: str, x: torch.Tensor) -> torch.Tensor:
    """``sigmoid(x w + b)``: one scalar per token, `[..., 1]` in x's dtype."""
    linear = gates[name]
    return torch.sigmoid(F.linear(x, linear.weight.to(x.dtype), linear.bias.to(x.dtype)))


def _new_gate(layer: nn.Module, attr: str, adapter_name: str, width: int, device: torch.device) -> None:
    if attr not in layer._modules:  # the parent's __init__ calls update_layer before ours could add it
        setattr(layer, attr, nn.ModuleDict())
    getattr(layer, attr)[adapter_name] = nn.Linear(width, 1, device=device, dtype=torch.float32)


class GatedLoraLinear(LoraLinear):
    """A LoRA layer whose low-rank term is scaled by a per-token gate of the layer's input."""

    adapter_layer_names: ClassVar[tuple[str, ...]] = (*LoraLinear.adapter_layer_names, "lora_gate")

    def update_layer(self, adapter_name: str, config: LoraConfig, key: str) -> None:
        super().update_layer(adapter_name, config, key)
        _new_gate(self, "lora_gate", adapter_name, self.in_features, self.lora_A[adapter_name].weight.device)

    def merge(self, adapter_name: str, safe_merge: bool = False) -> None:
        raise ValueError(f"gated LoRA adapter {adapter_name!r} cannot be merged: its gate depends on each token's input")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.disable_adapters or name is None:
            return y
        dtype = y.dtype
        x = x.to(dtype)
        p = self.lora_dropout[name] if self.training else 0.0
        inp = F.dropout(x, p, training=True) if p > 0.0 else x
        low_rank = F.linear(F.linear(inp, self.lora_A[name].weight.to(dtype)), self.lora_B[name].weight.to(dtype))
        return y + _gate(self.lora_gate, name, x) * (low_rank * self.scaling[name])


class GatedLoraModel(LoraModel):
    """LoRA's tuner with gated layers; plain nn.Linear / Conv1D bases only."""

    layer_cls: ClassVar[type] = GatedLoraLinear

    def _create_layer(self, target: nn.Module, adapter_name: str, config: LoraConfig, key: str) -> GatedLoraLinear:
        if isinstance(target, Linear4bit):
            raise NotImplementedError(f"{key}: UniPELT's gated LoRA over an NF4 (QLoRA) base is not implemented")
        return GatedLoraLinear(target, adapter_name, config, key)

    def _adapter_shapes(self, target: nn.Module, config: LoraConfig, key: str) -> dict[str, tuple[int, ...]]:
        shapes = super()._adapter_shapes(target, config, key)
        in_f = shapes["lora_A.weight"][1]
        return {**shapes, "lora_gate.weight": (1, in_f), "lora_gate.bias": (1,)}


class GatedAdapterLayer(BottleneckAdapterLayer):
    """A serial bottleneck adapter whose change is scaled by a per-token gate of its input."""

    adapter_layer_names: ClassVar[tuple[str, ...]] = (*BottleneckAdapterLayer.adapter_layer_names, "adapter_gate")

    def update_layer(self, adapter_name: str, config: AdapterConfig, key: str) -> None:
        if self.mode != "serial":
            raise ValueError(f"{key}: UniPELT's gated adapter is serial (after the FFN), not {self.mode}")
        super().update_layer(adapter_name, config, key)
        _new_gate(self, "adapter_gate", adapter_name, self.hidden, self.adapter_down[adapter_name].weight.device)

    def _adapt(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        change = super()._adapt(h, residual=torch.zeros_like(h))  # s * A(h): the fused launch, residual 0
        return h + _gate(self.adapter_gate, self.active_adapter, h) * change


class GatedBottleneckModel(BottleneckModel):
    layer_cls: ClassVar[type] = GatedAdapterLayer

    def _create_layer(self, target: nn.Module, adapter_name: str, config: AdapterConfig, key: str):
        return GatedAdapterLayer(target, adapter_name, config, key, self._mode(config, key),
                                 self._hidden(target, config, key))

    def _adapter_shapes(self, target: nn.Module, config: AdapterConfig, key: str) -> dict[str, tuple[int, ...]]:
        shapes = super()._adapter_shapes(target, config, key)
        h = shapes["adapter_up.bias"][0]
        return {**shapes, "adapter_gate.weight": (1, h), "adapter_gate.bias": (1,)}


class PrefixGate(nn.Module):
    """One adapter's prefix gates: `weight [num_layers]`, the logits p_l (zero: g_P = 1/2 at init)."""

    def __init__(self, num_layers: int, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_layers, device=device))


class UniPELTModel(prompting.PromptLearningModel):
    """The prompt-learning model plus gated LoRA and gated adapters in `base_model` and the prefix
    gates in `prefix_gate`; each adapter name owns all of them, activated, trained, saved and
    deleted together."""

    def _tuner(self, attr: str, cls: type):
        """A tuner over `base_model`, kept out of the module tree (as MAM's)."""
        if attr not in self.__dict__:
            self.__dict__[attr] = cls(self.base_model, {})
        return self.__dict__[attr]

    @property
    def lora(self) -> GatedLoraModel:
        return self._tuner("_lora", GatedLoraModel)

    @property
    def bottleneck(self) -> GatedBottleneckModel:
        return self._tuner("_bottleneck", GatedBottleneckModel)

    def _layers(self):
        yield from self.lora.adapter_layers()
        yield from self.bottleneck.adapter_layers()

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        if not isinstance(peft_config, UniPELTConfig):
            raise ValueError(f"cannot add a {peft_config.peft_type} adapter to a model holding UNIPELT adapters")
        lora, adapter = peft_config.lora_config(), peft_config.adapter_config()
        self.lora.targets(lora)  # both parts' placement and widths checked before anything changes
        self.bottleneck.targets(adapter)
        super().add_adapter(adapter_name, peft_config)  # the prefix (checks its own part first)
        if "prefix_gate" not in self._modules:
            self.prefix_gate = nn.ModuleDict()  # not a ParameterDict: its method names (copy...) clash
        device = next(self.base_model.parameters()).device
        self.prefix_gate[adapter_name] = PrefixGate(peft_config.num_layers, device)
        self.lora.peft_config[adapter_name] = lora
        self.lora.inject_adapter(adapter_name)
        self.bottleneck.peft_config[adapter_name] = adapter
        self.bottleneck.inject_adapter(adapter_name)
        self.set_adapter(self._active_adapter)

    def set_adapter(self, adapter_name: str) -> None:
        for tuner in (self.lora, self.bottleneck):
            if adapter_name in tuner.peft_config:  # not yet while add_adapter builds the prefix
                tuner.set_adapter(adapter_name)
        super().set_adapter(adapter_name)

    def _mark_trainable(self) -> None:
        super()._mark_trainable()
        gates = self._modules.get("prefix_gate")
        if gates is not None:
            gates.requires_grad_(False)
        name = self._active_adapter
        if self.peft_config[name].inference_mode or gates is None or name not in gates:
            return
        gates[name].requires_grad_(True)
        for _, layer in self._layers():
            for param in layer.adapter_parameters(name):
                param.requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        self.lora.delete_adapter(adapter_name)
        self.bottleneck.delete_adapter(adapter_name)
        del self.prefix_gate[adapter_name]
        super().delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block: no prefix, no LoRA, no adapters."""
        with super().disable_adapter():
            for tuner in (self.lora, self.bottleneck):
                tuner.enable_adapter_layers(False)
            try:
                yield
            finally:
                for tuner in (self.lora, self.bottleneck):
                    tuner.enable_adapter_layers(True)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "UniPELT adapters cannot be merged into the weights: the gates depend on each token's input, the "
            "prefix is extra attention keys and values, and the adapter has a non-linearity"
        )

    merge_and_unload = unmerge_adapter = merge_adapter

    def unload(self) -> nn.Module:
        """The user's model without modules_to_save wrappers, LoRA layers and adapter layers."""
        super().unload()
        self.lora.unload(merge=False)
        return self.bottleneck.unload(merge=False)

    # -- prompts and running -------------------------------------------------------------------
    def _flat_prompt(self, name: str) -> torch.Tensor:
        """The prefix with layer l's values times ``sigmoid(prefix_gate[l])`` (keys times 1, exact)."""
        flat = super()._flat_prompt(name)
        config = self.peft_config[name]
        gate = torch.sigmoid(self.prefix_gate[name].weight).to(flat.dtype)
        scale = torch.stack((torch.ones_like(gate), gate), dim=1).reshape(-1, 1)  # [2L, 1]: k_l, v_l
        batch, tokens = flat.shape[:2]
        return (flat.view(batch, tokens, 2 * config.num_layers, config.token_dim) * scale).view(batch, tokens, -1)

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        _refuse_mixed(adapter_names)
        return super().forward(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        _refuse_mixed(adapter_names)
        return super().generate(*args, **kwargs)

    # -- checkpoints ---------------------------------------------------------------------------
    def _adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = super()._adapter_state_dict(adapter_name)
        out[PREFIX_GATE] = self.prefix_gate[adapter_name].weight.detach().cpu()
        for key, layer in self._layers():
            if adapter_name in layer.adapters:
                state = layer.adapter_state_dict(adapter_name)
                out.update({f"{checkpoint.PROMPT_PREFIX}{key}.{k}": v for k, v in state.items()})
        return out

    @classmethod
    def _extra_state_shapes(cls, model: nn.Module, config: UniPELTConfig) -> dict[str, tuple[int, ...]]:
        shapes = GatedLoraModel(model, {}).expected_state_shapes("probe", config.lora_config())
        shapes.update(GatedBottleneckModel(model, {}).expected_state_shapes("probe", config.adapter_config()))
        out = {f"{checkpoint.PROMPT_PREFIX}{k}": v for k, v in shapes.items()}
        return {**out, PREFIX_GATE: (config.num_layers,)}

    def _load_extra_state(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.prefix_gate[adapter_name].weight.copy_(state[PREFIX_GATE])
            for key, layer in self._layers():
                if adapter_name in layer.adapters:
                    prefix = f"{checkpoint.PROMPT_PREFIX}{key}."
                    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                    layer.load_adapter_state_dict(adapter_name, sub)


def _refuse_mixed(adapter_names: list[str] | None) -> None:
    if adapter_names is not None:
        raise NotImplementedError("mixed-adapter batches (adapter_names=) with UniPELT adapters: set_adapter instead")


prompting.register_task_models("UNIPELT", UniPELTModel)
