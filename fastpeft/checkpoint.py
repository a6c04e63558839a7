"""PEFT-format adapter checkpoints, in and out.

A checkpoint is a directory with `adapter_config.json` and `adapter_model.safetensors` whose keys
are the model's keys under `base_model.model.`, with the adapter name taken out:
`base_model.model.<path>.lora_A.weight` for `<path>.lora_A.<adapter>.weight`, and
`base_model.model.<path>.weight` for a modules_to_save copy `<path>.modules_to_save.<adapter>.weight`.
Loading checks every key and shape before anything is copied, so a bad checkpoint changes nothing.
Saving is atomic per call: every file is first written under a temporary name in its target
directory, then all are moved into place with `os.replace` (weights first, configs last); if any
step fails, the files that were there before are put back and the temporaries removed.
"""

from __future__ import annotations

import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fastpeft import validation
from fastpeft.config import CONFIG_NAME
from fastpeft.errors import CheckpointError, CheckpointNotFoundError
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


def to_cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies, as safetensors writes them."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def save_adapter(directory: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> None:
    """Write one `adapter_model.safetensors` atomically (the config is the caller's)."""
    save_checkpoints([(os.fspath(directory), to_cpu(state_dict), None)])


def save_checkpoints(items: list[tuple[str, dict[str, torch.Tensor], str | None]]) -> None:
    """Write `(directory, tensors, adapter_config.json text or None)` items all or nothing."""
    staged: list[tuple[str, str]] = []  # (temporary, final)
    made: list[str] = []  # directories this call created
    try:
        for directory, _, _ in items:
            _makedirs(directory, made)
        for directory, tensors, _ in items:
            staged.append(_stage(directory, WEIGHTS_NAME,
                                 lambda path, t=tensors: save_file(t, path, metadata={"format": "pt"})))
        for directory, _, text in items:
            if text is not None:
                staged.append(_stage(directory, CONFIG_NAME, lambda path, t=text: _write_text(path, t)))
        _commit(staged)
    except BaseException:
        for tmp, _ in staged:
            _remove(tmp)
        for directory in reversed(made):
            try:
                os.rmdir(directory)
            except OSError:
                pass
        raise


def _makedirs(directory: str, made: list[str]) -> None:
    missing = []
    path = os.path.abspath(directory)
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(missing):
        os.mkdir(path)
        made.append(path)


def _stage(directory: str, name: str, write) -> tuple[str, str]:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
    except BaseException:
        _remove(tmp)
        raise
    return tmp, os.path.join(directory, name)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _commit(staged: list[tuple[str, str]]) -> None:
    """Move every staged file into place; on a failure put the previous files back."""
    backups: list[tuple[str, str | None]] = []  # (final, backup of what was there, or None)
    try:
        for tmp, final in staged:
            backup = None
            if os.path.exists(final):
                fd, backup = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.", suffix=".bak",
                                              dir=os.path.dirname(final))
                os.close(fd)
                _link_or_copy(final, backup)
            backups.append((final, backup))
            os.replace(tmp, final)
    except BaseException:
        for final, backup in reversed(backups):
            try:
                if backup is not None:
                    os.replace(backup, final)  # a no-op when both still name one file (a hard link)
                    _remove(backup)
                else:
                    _remove(final)
            except OSError:  # keep restoring the others; the backup stays for a person to find
                pass
        raise
    for _, backup in backups:
        if backup is not None:
            _remove(backup)


def _link_or_copy(src: str, dst: str) -> None:
    """`dst` becomes a second name of (or a copy of) `src`, which stays in place."""
    os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copy2(src, dst)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def read_adapter(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory (safetensors, or PEFT's older `adapter_model.bin`)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path!r} is not a readable safetensors file: {e}") from e
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{legacy!r} is not a readable torch checkpoint: {e}") from e
        return validation.check_state_dict(state, repr(legacy))
    raise CheckpointNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {os.fspath(directory)!r}")


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
    """Raise CheckpointError (a ValueError) unless `state_dict` has exactly the `expected` keys
    (under `prefix`) and shapes; floating-point tensors only (adapter weights)."""
    validation.check_adapter_tensors(state_dict, source)
    validation.check_fits(state_dict, expected, source, prefix)


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
        biases = [key for key in tuner._bias_keys(tuner.peft_config[adapter_name], [k for k, _ in tuner.adapter_layers()])
                  if PREFIX + key in state_dict]
        if biases:  # named_parameters walks every adapter: only when there is a bias to load
            params = dict(tuner.model.named_parameters())
            for key in biases:
                params[key].copy_(state_dict[PREFIX + key])


