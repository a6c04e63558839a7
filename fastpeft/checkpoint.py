"""PEFT-format adapter checkpoints, in and out.

A checkpoint is a directory with `adapter_config.json` and `adapter_model.safetensors` whose keys
are the model's keys under `base_model.model.`, with the adapter name taken out:
`base_model.model.<path>.lora_A.weight` for `<path>.lora_A.<adapter>.weight`, and
`base_model.model.<path>.weight` for a modules_to_save copy `<path>.modules_to_save.<adapter>.weight`.
Loading checks every key and shape before anything is copied, so a bad checkpoint changes nothing.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastpeft.methods.base import BaseTuner

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# Prompt learning (Prompt/Prefix/P-Tuning): the learned prompt, and the prefix of modules_to_save keys.
PROMPT_EMBEDDINGS = "prompt_embeddings"
PROMPT_PREFIX = "base_model."


def adapter_state_dict(tuner: BaseTuner, adapter_name: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's checkpoint keys."""
    config = tuner.peft_config[adapter_name]
    out = {}
    layer_keys = []
    for key, layer in tuner.adapter_layers():
        if adapter_name in layer.adapters:
            layer_keys.append(key)
            out.update({f"{key}.{k}": v for k, v in layer.adapter_state_dict(adapter_name).items()})
    for key, wrapper in tuner.wrappers():
        if adapter_name in wrapper.modules_to_save:
            out.update({f"{key}.{k}": v for k, v in wrapper.modules_to_save[adapter_name].state_dict().items()})
    model_state = tuner.model.state_dict()
    out.update({key: model_state[key] for key in tuner._bias_keys(config, layer_keys)})
    return {PREFIX + k: v for k, v in out.items()}


def save_adapter(directory: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> None:
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def read_adapter(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory (safetensors, or PEFT's older `adapter_model.bin`)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        return load_file(path)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {os.fspath(directory)!r}")


def prompt_state_dict(prompt_embeddings: torch.Tensor, saved_modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """A prompt-learning adapter in PEFT's format: `prompt_embeddings` (the prompt encoder's OUTPUT,
    `[virtual tokens, width]`) plus the modules_to_save copies as `base_model.<path>.<param>`
    (PEFT keeps the raw model as `base_model` there, so there is no `.model.` in these keys)."""
    out = {PROMPT_EMBEDDINGS: prompt_embeddings}
    for key, module in saved_modules.items():
        out.update({f"{PROMPT_PREFIX}{key}.{k}": v for k, v in module.state_dict().items()})
    return out


def check_fits(
    state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str, prefix: str = PREFIX
) -> None:
    """Raise ValueError unless `state_dict` has exactly the `expected` keys (under `prefix`) and shapes."""
    missing = sorted(k for k in expected if prefix + k not in state_dict)
    unexpected = sorted(k for k in state_dict if not k.startswith(prefix) or k[len(prefix) :] not in expected)
    wrong = [
        f"{prefix}{k}: checkpoint {tuple(state_dict[prefix + k].shape)} vs model {shape}"
        for k, shape in expected.items()
        if prefix + k in state_dict and tuple(state_dict[prefix + k].shape) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_preview([prefix + k for k in missing])}")
    if unexpected:
        problems.append(f"unexpected keys {_preview(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches {_preview(wrong)}")
    if problems:
        raise ValueError(f"checkpoint {source} does not fit the model: " + "; ".join(problems))


def load_into(tuner: BaseTuner, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a checked checkpoint into the adapter `adapter_name`, already injected."""
    state = {k[len(PREFIX) :]: v for k, v in state_dict.items()}
    with torch.no_grad():
        for key, layer in tuner.adapter_layers():
            if adapter_name in layer.adapters:
                sub = {k[len(key) + 1 :]: v for k, v in state.items() if k.startswith(f"{key}.")}
                sub = {k: v for k, v in sub.items() if not k.startswith("base_layer.")}
                layer.load_adapter_state_dict(adapter_name, sub)
        for key, wrapper in tuner.wrappers():
            if adapter_name in wrapper.modules_to_save:
                sub = {k[len(key) + 1 :]: v for k, v in state.items() if k.startswith(f"{key}.")}
                wrapper.modules_to_save[adapter_name].load_state_dict(sub, strict=True)
        params = dict(tuner.model.named_parameters())
        for key in tuner._bias_keys(tuner.peft_config[adapter_name], [k for k, _ in tuner.adapter_layers()]):
            if PREFIX + key in state_dict:
                params[key].copy_(state_dict[PREFIX + key])


def _preview(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
