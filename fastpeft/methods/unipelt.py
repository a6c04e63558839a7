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
            layout, generate), with layer l's prefix keys AND values scaled, for each query token t,
            by ``g_P(x_t) = sigmoid(x_t w_P[l] + b_P[l])`` read from that query's attention input
            x_t (the sub-layer's normalized input, as the LoRA gate reads it).
Gates are scalars (one per token and layer) in fp32, initialized as nn.Linear.

The prefix gate per query. Scaling the prefix keys and values by g_t for query t means, in layer l,
``score(t, p) = g_t * (q_t . k_p) * scaling`` for the prefix positions p, and after the softmax
``prob(t, p)`` times g_t before it weighs v_p; the real positions are untouched. The authors' code
(BERT) uses one gate per example, the sequence MEAN of sigmoid(W x_t + b); that mean sees future
tokens, so in a decoder it is not causal and a full forward would differ from cached decoding. Per
token it is causal and exact under cached decoding (each step gates its own query), and it is the
authors' gate whenever the sequence is one token. A gate of 0 is a zero prefix (keys and values
zero: the prefix still takes softmax mass, as in the authors' code), not an absent one.

How it runs. The cache holding the prefix carries this adapter's gate (`get_prompt` tags it). While
a UniPELT adapter is injected, each self-attention module (the one with a `layer_idx` that reads the
cache: Llama's `self_attn`, GPT-2's `attn`, BERT's `attention.self`) has a forward pre-hook that,
when its cache is tagged, computes g [B, T] from the module's input and leaves it on the module for
the call, and the model's `config._attn_implementation` is ``fastpeft_unipelt_<original>``, an
attention function registered with transformers that consumes it (`prefix_gated_attention`) and
otherwise runs the original ("eager" or "sdpa"), which unload and the last delete restore. The gate
thus works in forward, training and `generate` without touching the model's code.

Identity at init. With the default zero-init parts (LoRA B = 0, adapter up-projection = 0) the LoRA
and adapter branches add exactly zero whatever their gates, so a fresh UniPELT model is exactly
Prefix Tuning with each query's prefix keys and values gated by its g_t; with the prefix gate
saturated open (w_P = 0, b_P large: g = 1) it is exactly Prefix Tuning with the same prefix. Tested
bit-exact (against Prefix Tuning on the eager attention, the same arithmetic).

Checkpoint (`adapter_config.json` + `adapter_model.safetensors`, fp32; keys as MAM's):
  ``prompt_embeddings``                        [P, num_layers * 2 * token_dim] the flat, UNGATED
                                               prefix (the encoder's output, as Prefix Tuning saves it)
  ``prefix_gate.weight``                       [num_layers, H]  row l: layer l's w_P (H: hidden size)
  ``prefix_gate.bias``                         [num_layers]     b_P per layer
  ``base_model.<proj>.lora_A.weight``          [r, in]    ``.lora_B.weight`` [out, r]
  ``base_model.<proj>.lora_gate.weight``       [1, in]    ``.lora_gate.bias`` [1]
  ``base_model.<ffn>.adapter_down.weight``     [b, H]     ``.adapter_down.bias`` [b]
  ``base_model.<ffn>.adapter_up.weight``       [H, b]     ``.adapter_up.bias``   [H]
  ``base_model.<ffn>.adapter_gate.weight``     [1, H]     ``.adapter_gate.bias`` [1]
  ``base_model.<path>.<param>``                modules_to_save copies (e.g. a SEQ_CLS head)
with ``<proj>`` e.g. ``model.layers.0.self_attn.q_proj`` and ``<ffn>`` the adapter's place per
architecture (`fastpeft.methods.adapter.PATHS`, role "ffn": ``model.layers.0.mlp.down_proj``,
``transformer.h.0.mlp.c_proj``). As every prompt-learning checkpoint, it loads frozen. A checkpoint
from before the input-dependent prefix gate (one ``prefix_gate`` [num_layers] logit per layer) does
not fit this layout and is refused, the model unchanged.

Nothing merges (the gates depend on each token's input; the prefix is extra keys and values; the
adapter has a non-linearity): merging raises. The gated LoRA term runs unfused (the fused kernel
takes one scalar scaling, the gate is one per token), and so does the gated attention: it computes
the scores explicitly, as the eager attention does (no SDPA or flash kernel while the prefix is
gated). Mixed-adapter batches are refused.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft import prompting, registry
from fastpeft.config import PeftConfig
from fastpeft.methods.adapter import AdapterConfig, BottleneckAdapterLayer, BottleneckFields, BottleneckModel
from fastpeft.methods.composite import CompositeModel
from fastpeft.methods.lora import LoraConfig, LoraLinear, LoraModel
from fastpeft.methods.prefix import PrefixEncoder, PrefixTuningConfig
from fastpeft.quant.nf4 import Linear4bit

PREFIX_GATE = "prefix_gate"  # checkpoint keys prefix_gate.weight [num_layers, H], prefix_gate.bias [num_layers]
ATTENTION = "fastpeft_unipelt_"  # + the original implementation: the attention function registered here
ORIGINALS = ("eager", "sdpa")  # the implementations it can stand in for (explicit masks, no BlockMask)
CACHE_TAG = "fastpeft_prefix_gate"  # on the prefix cache: (the adapter's gate Linear, num_virtual_tokens)
GATE_STASH = "fastpeft_prefix_gate"  # on an attention module, for one call: (g [B, T] fp32, num_virtual_tokens)


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


# -- the prefix gate: attention with each query's prefix keys and values scaled by its gate ----------
def prefix_gated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    gate: torch.Tensor, num_prefix: int, scaling: float | None = None, dropout: float = 0.0,
    training: bool = False, causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention whose first `num_prefix` key positions (the prefix) are gated per query.

    query [B, H, T, D]; key, value [B, Hkv, S, D] with H a multiple of Hkv (GQA), prefix first;
    attention_mask None, bool [B|1, 1|H, T, S] (True: attend) or additive float; gate [B, T] fp32
    -> (out [B, T, H, D] query.dtype, probs [B, H, T, S]), as transformers' eager attention. The
    arithmetic is the eager one (scores, + mask, fp32 softmax, dropout, probs @ values) with the
    prefix's scores and probabilities times g_t, exact no-ops at g = 1. A None mask is causal
    (bottom-right aligned, as under a cache) when `causal`, else no mask.
    """
    heads, kv_heads, length = query.shape[1], key.shape[1], key.shape[2]
    if heads % kv_heads or not 0 < num_prefix <= length or gate.shape != query.shape[:1] + query.shape[2:3]:
        raise ValueError(f"gated prefix attention: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"gate {tuple(gate.shape)}, {num_prefix} prefix positions do not fit")
    if heads != kv_heads:  # transformers' repeat_kv: each key-value head serves heads // kv_heads query heads
        shape = (key.shape[0], kv_heads, heads // kv_heads, length, key.shape[-1])
        key, value = (t[:, :, None].expand(shape).reshape(shape[0], heads, length, shape[-1]) for t in (key, value))
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    g = gate.to(query.dtype)[:, None, :, None]  # [B, 1, T, 1]
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.cat((scores[..., :num_prefix] * g, scores[..., num_prefix:]), dim=-1)
    if attention_mask is None and causal:
        rows = torch.arange(query.shape[2], device=query.device)[:, None] + (length - query.shape[2])
        attention_mask = torch.arange(length, device=query.device) <= rows
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # as transformers' eager_mask
        zero = torch.zeros((), device=scores.device, dtype=scores.dtype)
        attention_mask = torch.where(attention_mask, zero, torch.finfo(scores.dtype).min)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.cat((probs[..., :num_prefix] * g, probs[..., num_prefix:]), dim=-1)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _gated_attention(module: nn.Module, query, key, value, attention_mask, *args, original, **kwargs):
    """The registered attention function: gated when the module holds a gate for this call, else the
    implementation it stands in for (`original`; None: the module's own eager function)."""
    stash = module.__dict__.pop(GATE_STASH, None)
    if stash is None:
        run = original or sys.modules[type(module).__module__].eager_attention_forward
        return run(module, query, key, value, attention_mask, *args, **kwargs)
    causal = kwargs.get("is_causal")
    return prefix_gated_attention(
        query, key, value, attention_mask, *stash, scaling=kwargs.get("scaling"), dropout=kwargs.get("dropout", 0.0),
        training=module.training, causal=getattr(module, "is_causal", False) if causal is None else causal,
    )


def _register(original: str) -> str:
    """Register (once) the gated attention standing in for `original`, with `original`'s mask builder."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = ATTENTION + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        run = ALL_ATTENTION_FUNCTIONS["sdpa"] if original == "sdpa" else None
        AttentionInterface.register(name, functools.partial(_gated_attention, original=run))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _stash_gate(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: when the call's cache holds a gated prefix, leave g [B, T] on the module."""
    module.__dict__.pop(GATE_STASH, None)  # one a failed call left behind must not gate this one
    tag = getattr(kwargs.get("cache", kwargs.get("past_key_values")), CACHE_TAG, None)
    if tag is None:
        return
    gates, tokens = tag
    x = args[0] if args else kwargs["hidden_states"]
    row = slice(module.layer_idx, module.layer_idx + 1)
    gate = torch.sigmoid(F.linear(x.to(gates.weight.dtype), gates.weight[row], gates.bias[row]))[..., 0]
    module.__dict__[GATE_STASH] = (gate, tokens)


def _check_consumed(module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook: the gate left for this call must have been used (by the registered attention)."""
    if module.__dict__.pop(GATE_STASH, None) is not None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {module.layer_idx}) ran without fastpeft's gated prefix attention: "
            f"config._attn_implementation is {module.config._attn_implementation!r}; do not change it while a "
            "UniPELT adapter is injected"
        )


def attention_sites(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules that read the prefix from the cache: one per layer (`layer_idx`)."""
    sites = [
        m for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config")
        and type(m).__name__.endswith("Attention") and "Cross" not in type(m).__name__
        and not getattr(m, "is_cross_attention", False)
    ]
    if sorted(m.layer_idx for m in sites) != list(range(len(sites))) or not sites:
        raise NotImplementedError(
            f"UniPELT's prefix gate needs one self-attention module per layer (a module with layer_idx), found "
            f"{[(type(m).__name__, m.layer_idx) for m in sites]} in {type(model).__name__}"
        )
    return sites


def _check_originals(sites: list[nn.Module]) -> None:
    """The attention implementations must be ones the gated attention can stand in for."""
    for m in sites:
        impl = m.config._attn_implementation or "eager"
        if impl not in ORIGINALS:
            raise NotImplementedError(
                f"UniPELT's prefix gate stands in for the 'eager' or 'sdpa' attention, not {impl!r}: load the model "
                "with attn_implementation='sdpa' (or 'eager')"
            )
        if impl == "eager" and not hasattr(sys.modules[type(m).__module__], "eager_attention_forward"):
            raise NotImplementedError(f"{type(m).__name__}: no module-level eager_attention_forward to stand in for")


class UniPELTModel(CompositeModel):
    """The prompt-learning model plus gated LoRA and gated adapters in `base_model` and the prefix
    gates in `prefix_gate`; each adapter name owns all of them, activated, trained, saved and
    deleted together."""

    PARTS = (("_lora", GatedLoraModel, "lora_config"), ("_bottleneck", GatedBottleneckModel, "adapter_config"))
    CONFIG, NAME = UniPELTConfig, "UniPELT"
    MERGE_ERROR = ("UniPELT adapters cannot be merged into the weights: the gates depend on each token's input, "
                   "the prefix is extra attention keys and values, and the adapter has a non-linearity")

    @property
    def lora(self) -> GatedLoraModel:
        return self._part("_lora")

    # -- adapters ------------------------------------------------------------------------------
    def _add_prefix(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """The prefix, its gate, and (for the first adapter) the gated attention hooks."""
        sites = None if self.__dict__.get("_gate_hooks") else attention_sites(self.base_model)
        if sites is not None:
            _check_originals(sites)
        super()._add_prefix(adapter_name, peft_config)
        if "prefix_gate" not in self._modules:
            self.prefix_gate = nn.ModuleDict()
        device = next(self.base_model.parameters()).device
        self.prefix_gate[adapter_name] = nn.Linear(  # row l: layer l's gate, nn.Linear(H, 1)'s init
            _hidden_size(self.base_model), peft_config.num_layers, device=device, dtype=torch.float32
        )
        if sites is not None:
            self._attach_gates(sites)

    def _mark_extra_trainable(self, adapter_name: str) -> bool:
        gates = self._modules.get("prefix_gate")
        if gates is not None:
            gates.requires_grad_(False)
        if self.peft_config[adapter_name].inference_mode or gates is None or adapter_name not in gates:
            return False
        gates[adapter_name].requires_grad_(True)
        return True

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.prefix_gate[adapter_name]
        if not self.peft_config:
            self._detach_gates()

    def _attach_gates(self, sites: list[nn.Module]) -> None:
        """Hook the attention modules and switch their configs to the gated attention."""
        hooks, originals = [], {}
        for module in sites:
            hooks.append(module.register_forward_pre_hook(_stash_gate, with_kwargs=True))
            hooks.append(module.register_forward_hook(_check_consumed))
            originals[id(module.config)] = (module.config, module.config._attn_implementation)
        for config, original in originals.values():
            config._attn_implementation = _register(original or "eager")
        self.__dict__["_gate_hooks"] = (hooks, list(originals.values()))

    def _detach_gates(self) -> None:
        hooks, originals = self.__dict__.pop("_gate_hooks", ((), ()))
        for hook in hooks:
            hook.remove()
        for config, original in originals:
            config._attn_implementation = original

    def unload(self) -> nn.Module:
        """The user's model without modules_to_save wrappers, gate hooks, LoRA and adapter layers."""
        self._detach_gates()
        return super().unload()

    # -- prompts and running -------------------------------------------------------------------
    def get_prompt(self, batch_size: int, adapter_name: str | None = None):
        """Prefix Tuning's cache, tagged with the adapter's prefix gate for the attention hooks."""
        name = adapter_name or self._active_adapter
        cache = super().get_prompt(batch_size, name)
        setattr(cache, CACHE_TAG, (self.prefix_gate[name], self.peft_config[name].num_virtual_tokens))
        return cache

    # -- checkpoints ---------------------------------------------------------------------------
    def _adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = super()._adapter_state_dict(adapter_name)
        gate = self.prefix_gate[adapter_name].state_dict()
        out.update({f"{PREFIX_GATE}.{k}": v.detach().cpu() for k, v in gate.items()})
        return out

    @classmethod
    def _extra_state_shapes(cls, model: nn.Module, config: UniPELTConfig) -> dict[str, tuple[int, ...]]:
        out = super()._extra_state_shapes(model, config)
        out[f"{PREFIX_GATE}.weight"] = (config.num_layers, _hidden_size(model))
        out[f"{PREFIX_GATE}.bias"] = (config.num_layers,)
        return out

    def _load_extra_state(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        super()._load_extra_state(adapter_name, state)
        with torch.no_grad():
            gate = self.prefix_gate[adapter_name]
            gate.load_state_dict({k: state[f"{PREFIX_GATE}.{k}"] for k in ("weight", "bias")})


def _hidden_size(model: nn.Module) -> int:
    """The width of the attention input the prefix gate reads."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.hidden_size


registry.register(UniPELTConfig, encoder=lambda config, word_embeddings: PrefixEncoder(config), prefix=True,
                  task_models=prompting.task_models(UniPELTModel))
