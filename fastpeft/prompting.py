"""The prompt-learning model: PEFT's PeftModel layout for Prompt Tuning, P-Tuning and Prefix Tuning.

These methods change no layer of the model. PEFT keeps the raw model as `base_model` (so its
parameters are `base_model.<path>`), the learned prompts in `prompt_encoder.<adapter>` and the
virtual token ids in `prompt_tokens`; the state-dict keys here are the same. A forward pass
either prepends the prompt to `inputs_embeds` (Prompt Tuning, P-Tuning; attention mask and
causal-LM labels extended as PEFT does), or hands the model a `DynamicCache` that already holds
every layer's prefix keys and values (Prefix Tuning; the mask is extended, position ids shifted).

`generate` gives transformers the prompt once: the prompt embeddings as the first step's
`inputs_embeds`, or the prefix as the initial cache, which the model then extends step by step;
the prefix is never re-materialized per decode step. PEFT 0.21 instead rewrites
`prepare_inputs_for_generation`, which transformers 5 no longer calls with the arguments it expects
(its later steps are wrong there); the result here is checked against the model's own forward.

Beyond PEFT, `adapter_names=[...]` (one per row) runs a mixed-task batch in one forward or generate:
each row gets its own adapter's prompt or prefix, gathered from the distinct adapters' prompts.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import warnings
from typing import Any

import torch
from torch import nn

from fastpeft import checkpoint, inject, registry, validation
from fastpeft.config import PeftConfig, PromptLearningConfig
from fastpeft.hf_compat import cache_kwarg
from fastpeft.methods.base import ModulesToSaveWrapper, delete_saved_copies
from fastpeft.methods.prefix import prefix_cache, read_only
from fastpeft.model import (
    SEQ_CLS_HEADS,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSequenceClassification,
    _accept_noop,
)
from fastpeft.transaction import transaction



def _is_prefix(config: PromptLearningConfig) -> bool:
    """Whether the method's prompt is every layer's keys and values (its registry entry says)."""
    return registry.get(config.peft_type).prefix


# -- the config, completed from the model's (PEFT's _prepare_prompt_learning_config) -------------
def prepare_config(config: PromptLearningConfig, model: nn.Module) -> PromptLearningConfig:
    """Fill the fields left None from the model config; check the ones given against the model."""
    if config.num_virtual_tokens is None:
        raise ValueError(f"{type(config).__name__}: num_virtual_tokens is required")
    if config.task_type not in TASK_MODELS:
        raise NotImplementedError(
            f"prompt learning with task_type={config.task_type!r}: fastpeft implements {sorted(TASK_MODELS)}"
        )
    mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = _first(mc, "hidden_size", "n_embd", "d_model")
    heads = _first(mc, "num_attention_heads", "n_head", "num_heads")
    layers = _first(mc, "num_hidden_layers", "num_layers", "n_layer")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1
    if config.num_layers is None:
        config.num_layers = layers
    if config.token_dim is None:
        config.token_dim = hidden
    if config.num_attention_heads is None:
        config.num_attention_heads = heads
    kv_heads = getattr(mc, "num_key_value_heads", None)
    if _is_prefix(config) and kv_heads is not None and config.token_dim == hidden:
        # Grouped-query attention: the prefix holds the key-value heads only (PEFT, issue #1901).
        head_dim = getattr(mc, "head_dim", None) or hidden // heads
        config.token_dim, config.num_attention_heads = kv_heads * head_dim, kv_heads
    if getattr(config, "encoder_hidden_size", 0) is None:
        config.encoder_hidden_size = config.token_dim
    _check_layout(config, mc, hidden, heads, layers, kv_heads)
    return config


def _check_layout(config, mc, hidden, heads, layers, kv_heads) -> None:
    if config.num_transformer_submodules != 1:
        raise NotImplementedError("num_transformer_submodules=2 (encoder-decoder models) is not implemented in fastpeft")
    if not _is_prefix(config):
        if config.token_dim != hidden:
            raise ValueError(f"token_dim={config.token_dim} does not match the model's hidden size {hidden}")
        return
    head_dim = getattr(mc, "head_dim", None) or hidden // heads
    model_heads = kv_heads if kv_heads is not None else heads
    if config.num_layers != layers or config.num_attention_heads != model_heads or config.token_dim != model_heads * head_dim:
        raise ValueError(
            f"the prefix is laid out for num_layers={config.num_layers}, {config.num_attention_heads} key-value heads, "
            f"token_dim={config.token_dim}; the model has {layers} layers, {model_heads} key-value heads of "
            f"head_dim {head_dim} (token_dim {model_heads * head_dim})"
        )


def _first(model_config, *names: str) -> int:
    for name in names:
        value = getattr(model_config, name, None)
        if value is not None:
            return value
    raise ValueError(f"the model config has none of {names}: set it in the prompt learning config")


def _position_limit(model: nn.Module) -> int | None:
    mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", None)


# -- the model -------------------------------------------------------------------------------
class PromptLearningModel(PeftModel):
    """PeftModel for prompt-learning adapters: `base_model` is the user's model, left unchanged
    except for modules_to_save copies (e.g. a classifier head); prompts live in `prompt_encoder`."""

    def __init__(self, model: nn.Module, peft_config: PromptLearningConfig, adapter_name: str = "default"):
        nn.Module.__init__(self)
        self.peft_config: dict[str, PeftConfig] = {}
        self.base_model = model
        self.prompt_encoder = nn.ModuleDict()
        self.prompt_tokens: dict[str, torch.Tensor] = {}
        self._active_adapter: str | None = None
        self._adapters_disabled = False
        # PEFT registers the model's input embeddings here too (state-dict key `word_embeddings.weight`).
        self.word_embeddings = model.get_input_embeddings()
        self.add_adapter(adapter_name, peft_config)

    # -- adapters ------------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str:
        return self._active_adapter

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add a prompt encoder; the first adapter becomes active, later ones do not (PEFT's rule).
        All or nothing: on a failure the model and the config are as they were."""
        validation.check_new_adapter_name(adapter_name, self.peft_config)
        validation.check_config(peft_config)
        with transaction(self, dicts=[self.peft_config, self.prompt_tokens], objects=[peft_config]):
            self._add_adapter(adapter_name, peft_config)

    def _add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        if not peft_config.is_prompt_learning:
            raise ValueError(f"cannot add a {peft_config.peft_type} adapter to a model holding prompt learning adapters")
        own = registry.get(peft_config.peft_type).task_models.get(peft_config.task_type)
        if own is not None and not isinstance(self, own):
            raise ValueError(f"a {peft_config.peft_type} adapter needs its own model class: use get_peft_model")
        prepare_config(peft_config, self.base_model)
        if peft_config.task_type == "SEQ_CLS":  # PEFT names both heads, whichever the model has
            peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | set(SEQ_CLS_HEADS))
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(self.base_model, "name_or_path", None) or None
        targets = _save_targets(self.base_model, peft_config)
        encoder = _make_encoder(peft_config, self.word_embeddings)  # may raise: nothing changed yet
        device = next(self.base_model.parameters()).device
        self.peft_config[adapter_name] = peft_config
        self.prompt_encoder[adapter_name] = encoder.to(device)
        total = peft_config.num_virtual_tokens * peft_config.num_transformer_submodules
        self.prompt_tokens[adapter_name] = torch.arange(total).long()
        for key in targets:
            module = self.base_model.get_submodule(key)
            if isinstance(module, ModulesToSaveWrapper):
                module.add(adapter_name)
            else:
                inject.replace_module(self.base_model, key, ModulesToSaveWrapper(module, adapter_name))
        self.set_adapter(self._active_adapter or adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        self._active_adapter = adapter_name
        for _, wrapper in self._wrappers():
            wrapper.active_adapter = adapter_name if adapter_name in wrapper.adapters else None
        self._mark_trainable()

    def _mark_trainable(self) -> None:
        """The base model is frozen; the active prompt encoder (and its modules_to_save copies) train."""
        self.base_model.requires_grad_(False)
        self.prompt_encoder.requires_grad_(False)
        name = self._active_adapter
        if self.peft_config[name].inference_mode:
            return
        self.prompt_encoder[name].requires_grad_(True)
        for _, wrapper in self._wrappers():
            if name in wrapper.modules_to_save:
                wrapper.modules_to_save[name].requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        with transaction(self, dicts=[self.peft_config, self.prompt_tokens]):
            self._delete_adapter(adapter_name)

    def _delete_adapter(self, adapter_name: str) -> None:
        del self.prompt_encoder[adapter_name]
        del self.prompt_tokens[adapter_name]
        delete_saved_copies(self.base_model, self._wrappers(), adapter_name)
        del self.peft_config[adapter_name]
        if self._active_adapter == adapter_name:
            self._active_adapter = next(iter(self.peft_config), None)
        if self._active_adapter is not None:
            self.set_adapter(self._active_adapter)

    def _wrappers(self):
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    @classmethod
    def _extra_state_shapes(cls, model: nn.Module, config: PromptLearningConfig) -> dict[str, tuple[int, ...]]:
        """Checkpoint keys beyond the prompt and modules_to_save (MAM's adapters): none here."""
        return {}

    def _load_extra_state(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Copy the keys `_extra_state_shapes` named (checked already): none here."""

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (no prompt, original modules_to_save)."""
        self._adapters_disabled = True
        for _, wrapper in self._wrappers():
            wrapper.disable_adapters = True
        try:
            yield
        finally:
            self._adapters_disabled = False
            for _, wrapper in self._wrappers():
                wrapper.disable_adapters = False

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError("prompt learning adapters change no weights of the model: there is nothing to merge")

    merge_and_unload = unmerge_adapter = merge_adapter

    def unload(self) -> nn.Module:
        """The user's model without the modules_to_save wrappers."""
        for key, wrapper in list(self._wrappers()):
            inject.replace_module(self.base_model, key, wrapper.original_module)
        return self.base_model

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # -- prompts -------------------------------------------------------------------------------
    def get_prompt(self, batch_size: int, adapter_name: str | None = None):
        """`[B, virtual tokens, token_dim]` embeddings, or for prefix tuning a `DynamicCache` with
        the prefix keys/values of every layer (in the model's dtype)."""
        name = adapter_name or self._active_adapter
        return self._as_model_input(self._flat_prompt(name).repeat(batch_size, 1, 1), self.peft_config[name])

    def _flat_prompt(self, name: str) -> torch.Tensor:
        """One adapter's prompt `[1, T, width]`: embeddings, or the flat per-layer prefix."""
        config, encoder = self.peft_config[name], self.prompt_encoder[name]
        weight = encoder.embedding.weight
        if config.inference_mode:
            return weight.unsqueeze(0)  # the table holds the encoder's output (checkpoint format)
        tokens = self.prompt_tokens[name].to(weight.device)
        if _is_prefix(config):
            tokens = tokens[: config.num_virtual_tokens]
        return encoder(tokens[None])

    def _as_model_input(self, prompt: torch.Tensor, config: PromptLearningConfig):
        if _is_prefix(config):
            return prefix_cache(prompt.to(self.base_model.dtype), config, self.base_model.config)
        return prompt

    def _batch_prompt(self, batch_size: int, adapter_names: list[str] | None):
        """(config, prompt) for a batch: the active adapter's, or per row `adapter_names[i]`'s.

        A mixed-task batch (beyond PEFT) gathers each row's prompt from the distinct adapters'
        prompts, each computed once; the adapters must agree on everything that shapes the
        sequence: num_virtual_tokens, and embeddings vs prefix (with the same layout)."""
        if adapter_names is None:
            return self.active_peft_config, self.get_prompt(batch_size)
        if len(adapter_names) != batch_size:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch_size} rows")
        names = list(dict.fromkeys(adapter_names))
        for name in names:
            if name not in self.peft_config:
                raise ValueError(
                    f"adapter {name!r} in adapter_names not found; adapters: {sorted(self.peft_config)} "
                    "(prompt learning rows cannot run without a prompt: no '__base__')"
                )
        configs = [self.peft_config[n] for n in names]
        counts = {n: c.num_virtual_tokens for n, c in zip(names, configs)}
        if len(set(counts.values())) > 1:
            raise ValueError(f"a mixed batch needs one num_virtual_tokens for all its adapters, got {counts}")
        prefix = {_is_prefix(c) for c in configs}
        layouts = {(c.num_layers, c.num_attention_heads, c.token_dim) for c in configs}
        if len(prefix) > 1 or len(layouts) > 1:
            raise ValueError(f"a mixed batch cannot mix prefix and embedding prompts or layouts: {names}")
        if any(c.modules_to_save for c in configs) and len(names) > 1:
            raise NotImplementedError("mixed batches of adapters with modules_to_save (e.g. SEQ_CLS heads)")
        table = torch.cat([self._flat_prompt(n) for n in names])  # [adapters, T, width]
        index = torch.tensor([names.index(n) for n in adapter_names], device=table.device)
        return configs[0], self._as_model_input(table[index], configs[0])

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """What PEFT saves as `prompt_embeddings`: the encoder's output for the virtual tokens."""
        config, encoder = self.peft_config[adapter_name], self.prompt_encoder[adapter_name]
        if config.inference_mode:
            return encoder.embedding.weight.detach().cpu()
        tokens = self.prompt_tokens[adapter_name].to(encoder.embedding.weight.device)
        if _is_prefix(config):
            tokens = tokens[: config.num_virtual_tokens]
        return encoder(tokens[None])[0].detach().cpu()  # with autograd on, as PEFT: the LSTM's result is bitwise PEFT's

    # -- running -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ):
        if self._adapters_disabled:
            return self.base_model(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels, **kwargs
            )
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        config, prompt = self._batch_prompt(batch, adapter_names)
        self._check_length(length, config)
        attention_mask = _extend_mask(attention_mask, config.num_virtual_tokens)
        if _is_prefix(config):
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
            checkpointed = _checkpointed_layers(self.base_model)
            if checkpointed:  # the prefix must survive transformers' gradient checkpointing
                prompt = read_only(prompt)
                kwargs.setdefault("use_cache", False)
            kwargs[cache_kwarg(self.base_model)] = prompt
            with _keep_cache(checkpointed):
                return self.base_model(
                    input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                    **kwargs
                )
        if kwargs.get("position_ids") is not None:
            warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
            kwargs["position_ids"] = None
        if kwargs.get("token_type_ids") is not None:
            zeros = kwargs["token_type_ids"].new_zeros(batch, config.num_virtual_tokens)
            kwargs["token_type_ids"] = torch.cat((zeros, kwargs["token_type_ids"]), dim=1)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if labels is not None and config.task_type == "CAUSAL_LM":
            labels = torch.cat((labels.new_full((batch, config.num_virtual_tokens), -100), labels), dim=1)
        inputs_embeds = torch.cat((prompt.to(inputs_embeds.dtype), inputs_embeds), dim=1)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        """transformers' generate with the prompt given once; returns the input ids + new tokens."""
        if self._adapters_disabled:
            return self.base_model.generate(*args, **kwargs)
        input_ids = kwargs.pop("input_ids", None)
        if args:
            if input_ids is not None or len(args) > 1:
                raise TypeError("generate takes the input ids once, as the first argument or as input_ids=")
            input_ids = args[0]
        if input_ids is None:
            raise ValueError("prompt learning generate needs input_ids")
        batch, length = input_ids.shape
        mask = kwargs.pop("attention_mask", None)
        with torch.no_grad():
            config, prompt = self._batch_prompt(batch, adapter_names)
            self._check_length(length, config)
            if _is_prefix(config):
                kwargs[cache_kwarg(self.base_model)] = prompt
            else:
                embeds = self.word_embeddings(input_ids)
                kwargs["inputs_embeds"] = torch.cat((prompt.to(embeds.dtype), embeds), dim=1)
        mask = _extend_mask(mask if mask is not None else torch.ones_like(input_ids), config.num_virtual_tokens)
        return self.base_model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)

    def _check_length(self, length: int, config: PromptLearningConfig) -> None:
        limit = _position_limit(self.base_model)
        if limit is not None and length + config.num_virtual_tokens > limit:
            raise ValueError(
                f"input of {length} tokens + {config.num_virtual_tokens} virtual tokens = "
                f"{length + config.num_virtual_tokens} exceeds the model's position limit of {limit}"
            )

    # -- checkpoints ---------------------------------------------------------------------------
    def _adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        saved = {
            key: wrapper.modules_to_save[adapter_name]
            for key, wrapper in self._wrappers()
            if adapter_name in wrapper.modules_to_save
        }
        return checkpoint.prompt_state_dict(self.get_prompt_embedding_to_save(adapter_name), saved)

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **kwargs: Any
    ) -> None:
        """Add the adapter stored in `model_id` as `adapter_name` (not activated, as in PEFT)."""
        _accept_noop("load_adapter", kwargs)
        validation.check_new_adapter_name(adapter_name, self.peft_config)
        model_id = validation.check_directory(model_id, "model_id")
        config = validation.check_config(PeftConfig.from_pretrained(model_id), f"config of {model_id!r}")
        state = _read_checked(self.base_model, model_id, config, is_trainable)
        with transaction(self, dicts=[self.peft_config, self.prompt_tokens]):
            self.add_adapter(adapter_name, config)
            _load_state(self, adapter_name, state)


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The modules with gradient checkpointing on, if this forward checkpoints (training, grad
    enabled): transformers' GradientCheckpointingLayer blocks and the models holding them; []
    otherwise."""
    if not (model.training and torch.is_grad_enabled()):
        return []
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextlib.contextmanager
def _keep_cache(modules: list[nn.Module]):
    """For the length of the block, let checkpointed blocks keep the (read-only) prefix cache:
    blocks get `_can_checkpoint_with_cache`; models that would drop the cache before calling
    their blocks (GPT-2's) get their own flag off (their blocks still checkpoint by theirs)."""
    blocks = [m for m in modules if hasattr(type(m), "_can_checkpoint_with_cache")]
    models = [m for m in modules if not hasattr(type(m), "_can_checkpoint_with_cache")]
    for block in blocks:
        block._can_checkpoint_with_cache = True
    for m in models:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("_can_checkpoint_with_cache", None)
        for m in models:
            m.gradient_checkpointing = True


def _extend_mask(mask: torch.Tensor | None, num_virtual_tokens: int) -> torch.Tensor | None:
    if mask is None:
        return None
    return torch.cat((mask.new_ones(mask.shape[0], num_virtual_tokens), mask), dim=1)


def _make_encoder(config: PromptLearningConfig, word_embeddings: nn.Module) -> nn.Module:
    return registry.get(config.peft_type).encoder(config, word_embeddings)


def _save_targets(model: nn.Module, config: PromptLearningConfig) -> list[str]:
    """Modules named by modules_to_save (PEFT's suffix rule), outside existing wrappers' insides."""
    names = config.modules_to_save or []
    keys = []
    for key, module in model.named_modules():
        if any(key.startswith(f"{k}.") for k in keys):
            continue
        if key and any(key == n or key.endswith(f".{n}") for n in names):
            keys.append(key)
    return keys


# -- loading ---------------------------------------------------------------------------------
def _read_checked(model: nn.Module, directory, config: PromptLearningConfig, is_trainable: bool):
    """The checkpoint's tensors, checked against what `config` builds on `model`; nothing changed."""
    if is_trainable:
        raise ValueError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")
    config.inference_mode = True
    probe = prepare_config(copy.deepcopy(config), model)
    width = probe.token_dim * (2 * probe.num_layers if _is_prefix(probe) else 1)
    rows = probe.num_virtual_tokens * (1 if _is_prefix(probe) else probe.num_transformer_submodules)
    expected = {checkpoint.PROMPT_EMBEDDINGS: (rows, width)}
    heads = SEQ_CLS_HEADS if probe.task_type == "SEQ_CLS" else []
    probe.modules_to_save = sorted(set(probe.modules_to_save or []) | set(heads))
    for key in _save_targets(model, probe):
        module = model.get_submodule(key)
        source = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        for name, tensor in source.state_dict().items():
            expected[f"{checkpoint.PROMPT_PREFIX}{key}.{name}"] = tuple(tensor.shape)
    expected.update(_model_class(probe)._extra_state_shapes(model, probe))
    state = checkpoint.read_adapter(directory)
    checkpoint.check_fits(state, expected, repr(os.fspath(directory)), prefix="")
    return state


def _load_state(peft_model: PromptLearningModel, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        peft_model.prompt_encoder[adapter_name].embedding.weight.copy_(state[checkpoint.PROMPT_EMBEDDINGS])
        for key, wrapper in peft_model._wrappers():
            if adapter_name in wrapper.modules_to_save:
                prefix = f"{checkpoint.PROMPT_PREFIX}{key}."
                sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                wrapper.modules_to_save[adapter_name].load_state_dict(sub, strict=True)
    peft_model._load_extra_state(adapter_name, state)


def from_pretrained(model: nn.Module, directory, config: PromptLearningConfig, adapter_name: str, is_trainable: bool):
    """PeftModel.from_pretrained for a prompt-learning checkpoint: frozen, as PEFT requires."""
    state = _read_checked(model, directory, config, is_trainable)
    peft_model = get_prompt_model(model, config, adapter_name)
    _load_state(peft_model, adapter_name, state)
    return peft_model.eval()


# -- PEFT's task classes, prompt-learning flavour ----------------------------------------------
class PromptModelForCausalLM(PromptLearningModel, PeftModelForCausalLM):
    """CAUSAL_LM: labels are extended with -100 over the virtual tokens."""


class PromptModelForSequenceClassification(PromptLearningModel, PeftModelForSequenceClassification):
    """SEQ_CLS: the classifier head is trained and saved in full (modules_to_save)."""


class PromptModelForFeatureExtraction(PromptLearningModel, PeftModelForFeatureExtraction):
    """FEATURE_EXTRACTION: the hidden states include the virtual tokens (PEFT's output)."""


TASK_MODELS = {
    "CAUSAL_LM": PromptModelForCausalLM,
    "SEQ_CLS": PromptModelForSequenceClassification,
    "FEATURE_EXTRACTION": PromptModelForFeatureExtraction,
}


def task_models(model_cls: type[PromptLearningModel]) -> dict[str, type[PromptLearningModel]]:
    """For a prompt-learning model class that adds parts (MAM, UniPELT): one subclass per task,
    `<model_cls>For<Task>` mixing it with the task's prompt model, as {task_type: class}, the
    `task_models` of its registry entry."""
    stem, module = model_cls.__name__.removesuffix("Model"), sys.modules[model_cls.__module__]
    out = {}
    for task, base in TASK_MODELS.items():
        name = f"{stem}ModelFor{base.__name__.split('For', 1)[1]}"
        cls = type(name, (model_cls, base), {"__doc__": base.__doc__, "__module__": module.__name__})
        setattr(module, name, cls)  # importable by name, so pickling a model finds its class
        out[task] = cls
    return out


def get_prompt_model(model: nn.Module, config: PromptLearningConfig, adapter_name: str = "default") -> PromptLearningModel:
    if config.task_type not in TASK_MODELS:
        raise NotImplementedError(
            f"prompt learning with task_type={config.task_type!r}: fastpeft implements {sorted(TASK_MODELS)}"
        )
    return _model_class(config)(model, config, adapter_name)


def _model_class(config: PromptLearningConfig) -> type[PromptLearningModel]:
    return (registry.get(config.peft_type).task_models or TASK_MODELS)[config.task_type]


registry.register_family("prompt", build=get_prompt_model, load=from_pretrained)
