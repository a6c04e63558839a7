"""PEFT's low-level API: adapter state dicts in and out, and injection without a PeftModel.

`get_peft_model_state_dict` / `set_peft_model_state_dict` work on a PeftModel (keys under
`base_model.model.`) or on a model that `inject_adapter_in_model` changed in place (keys of the
model itself), with the adapter name taken out of the keys as PEFT does. The key names are the
ones fastpeft's checkpoints use (fastpeft/checkpoint.py), so these state dicts are PEFT's.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch import nn

from fastpeft import checkpoint, registry
from fastpeft.methods.base import BaseTuner, ModulesToSaveWrapper

IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _tuner_and_prefix(model: nn.Module, adapter_name: str) -> tuple[BaseTuner, str]:
    """The tuner that holds `model`'s adapters, and the prefix of its keys in `model.state_dict()`."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        known = sorted(configs) if isinstance(configs, dict) else []
        raise ValueError(f"adapter {adapter_name!r} not found on this model; adapters: {known}")
    base = model._modules.get("base_model")
    if isinstance(base, BaseTuner):  # a PeftModel
        return base, ""
    config = configs[adapter_name]
    if getattr(config, "is_prompt_learning", False):
        raise ValueError("prompt-learning adapters have no injected layers; use the PeftModel")
    tuner_cls = registry.tuner(config)  # ValueError for a peft_type without a tuner
    # A view over a model that inject_adapter_in_model changed: it holds no state of its own.
    return tuner_cls(model, configs), checkpoint.PREFIX


def _key_map(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """{PEFT state-dict key (adapter name taken out): key in `model.state_dict()`}."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        known = sorted(configs) if isinstance(configs, dict) else []
        raise ValueError(f"adapter {adapter_name!r} not found on this model; adapters: {known}")
    if hasattr(model, "_adapter_state_dict") and isinstance(model._modules.get("base_model"), BaseTuner):
        saved = model._adapter_state_dict(adapter_name)
        strip = ""
    else:
        tuner, strip = _tuner_and_prefix(model, adapter_name)
        saved = checkpoint.adapter_state_dict(tuner, adapter_name)
    owners = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        owners.setdefault((tensor.data_ptr(), tuple(tensor.shape), tensor.dtype), key)
    out = {}
    for key, tensor in saved.items():
        owner = owners.get((tensor.data_ptr(), tuple(tensor.shape), tensor.dtype))
        if owner is not None:
            out[key[len(strip) :] if strip and key.startswith(strip) else key] = owner
    return out


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's keys (adapter name taken out); `state_dict`, when given,
    supplies the values (keys as in `model.state_dict()`)."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    configs = getattr(model, "peft_config", {})
    if adapter_name in configs and configs[adapter_name].is_prompt_learning and state_dict is None:
        return model._adapter_state_dict(adapter_name)
    key_map = _key_map(model, adapter_name)
    source = model.state_dict() if state_dict is None else state_dict
    return {peft_key: source[key] for peft_key, key in key_map.items() if key in source}


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> IncompatibleKeys:
    """Load PEFT-keyed adapter tensors into adapter `adapter_name` (already injected); returns
    torch's `(missing_keys, unexpected_keys)` of the model-level load, as PEFT does."""
    key_map = _key_map(model, adapter_name)
    translated, unexpected = {}, []
    current = model.state_dict()
    for key, value in peft_model_state_dict.items():
        target = key_map.get(key)
        if target is None:
            unexpected.append(key)
            continue
        if ignore_mismatched_sizes and tuple(current[target].shape) != tuple(value.shape):
            continue
        translated[target] = value
    result = model.load_state_dict(translated, strict=False)
    return IncompatibleKeys(list(result.missing_keys), [*result.unexpected_keys, *unexpected])


def inject_adapter_in_model(
    peft_config: Any,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Put the adapter layers of `peft_config` into `model` in place and return `model` (no PeftModel).

    `model.peft_config` is `{adapter_name: config}`, as in PEFT; the state-dict functions above
    read it. `state_dict` (PEFT: targets from its keys) is not supported.
    """
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError("`create_and_replace` does not support prompt learning, adaption prompt and shadow yet.")
    if state_dict is not None:
        raise NotImplementedError("inject_adapter_in_model(state_dict=...): fastpeft does not implement it")
    try:
        tuner_cls = registry.tuner(peft_config)
    except ValueError:
        raise ValueError(
            f"`inject_adapter_in_model` does not support {peft_config.peft_type} yet. Please use `get_peft_model`."
        ) from None
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        configs = {}
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or choose another name")
    configs[adapter_name] = peft_config
    tuner = tuner_cls(model, configs)
    try:
        tuner.inject_adapter(adapter_name)
    except Exception:
        del configs[adapter_name]
        raise
    model.peft_config = configs
    return model


def _adapter_segments() -> set[str]:
    names = {"modules_to_save"}
    for method in registry.methods().values():
        if method.tuner is not None:
            names.update(method.tuner.layer_cls.adapter_layer_names)
    return names


def _original_key(key: str) -> str:
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def _base_items(model: nn.Module) -> dict[str, str]:
    """{original key: key in the wrapped model's state dict} for the base model's tensors."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapter = _adapter_segments()
    out = {}
    for key in inner.state_dict():
        if adapter & set(key.split(".")):
            continue
        out[_original_key(key)] = key
    return out


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under its original keys (no adapter, no `base_layer` infix)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = inner.state_dict()
    return {original: state[key] for original, key in _base_items(model).items()}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load original-keyed base-model tensors into a wrapped model (PEFT's counterpart)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    mapping = _base_items(model)
    unexpected = [k for k in state_dict if k not in mapping]
    missing = [k for k in mapping if k not in state_dict]
    if strict and (missing or unexpected):
        msgs = []
        if missing:
            msgs.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            msgs.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(msgs))
    inner.load_state_dict({mapping[k]: v for k, v in state_dict.items() if k in mapping}, strict=False)
    return IncompatibleKeys(missing, unexpected)


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """PEFT's helper: (parent, target, target name) of the module `key`."""
    parent = model.get_submodule(".".join(key.split(".")[:-1]))
    target_name = key.split(".")[-1]
    return parent, model.get_submodule(key), target_name


def infer_device() -> str:
    """PEFT's helper: "cuda" when available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = [
    "IncompatibleKeys",
    "ModulesToSaveWrapper",
    "_get_submodules",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "infer_device",
    "inject_adapter_in_model",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
