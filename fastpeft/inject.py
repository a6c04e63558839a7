"""Walk a model, match `target_modules` with PEFT's rules, swap layers.

The rules are PEFT's, so one config targets the same modules in both libraries:
- a string is a regex that must match the whole module name (`re.fullmatch`);
- a list matches a name equal to an entry or ending in `.<entry>`;
- "all-linear" is every nn.Linear / Conv1D but the output head;
- `exclude_modules` uses the same rules and wins; names under `modules_to_save` are never targets;
- `layers_to_transform` keeps the matches whose first numbered segment (after `layers_pattern`,
  if given) is one of the listed layer indices.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Iterable

from torch import nn

from fastpeft.errors import ConfigError

ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def conv1d_class() -> type | None:
    """transformers' GPT-2 style Conv1D (a Linear with its weight stored [in, out]), if available."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep the matcher importable without it
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    from fastpeft.quant.nf4 import Linear4bit  # lazy: the NF4 layer imports ops, keep inject light

    conv1d = conv1d_class()
    return (isinstance(module, (nn.Linear, Linear4bit))
            or (conv1d is not None and isinstance(module, conv1d)))


def _matches(patterns: str | Iterable[str], key: str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return any(key == p or key.endswith(f".{p}") for p in patterns)


def _layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match["idx"]) if match else None


def is_target(config: Any, key: str) -> bool:
    """PEFT's `check_target_module_exists`: does module `key` get an adapter under `config`?"""
    if config.exclude_modules and _matches(config.exclude_modules, key):
        return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return False
    if isinstance(config.target_modules, str):
        return _matches(config.target_modules, key)
    if key in config.target_modules:
        return True
    if not _matches(config.target_modules, key):
        return False
    layers = config.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(key, config.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def walk(model: nn.Module, skip: tuple[type, ...] = ()):
    """`model.named_modules()`, except that modules of the `skip` types are yielded but not
    entered: an adapter layer's own lora_A / lora_B / base_layer are never targets, and walking
    one submodule per loaded adapter would make every load slower than the one before."""
    stack, seen = [("", model)], set()
    while stack:
        name, module = stack.pop()
        if id(module) in seen:  # a module shared in two places is yielded once, as named_modules does
            continue
        seen.add(id(module))
        yield name, module
        if name and isinstance(module, skip):
            continue
        children = [(f"{name}.{child}" if name else child, sub) for child, sub in module.named_children()]
        stack.extend(reversed(children))


def all_linear_names(model: nn.Module, task_type: str | None, skip: tuple[type, ...] = ()) -> set[str]:
    """Names that "all-linear" stands for: every linear layer (adapter layers over one included,
    as in PEFT) except the model's output head."""
    names = {
        name
        for name, module in walk(model, skip)
        if is_linear(module) or (isinstance(module, skip) and is_linear(getattr(module, "base_layer", None)))
    }
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if hasattr(model, n)), None)
    if head is not None:
        names -= {name for name, module in walk(model, skip) if module is head}
    return names


def resolve_target_modules(model: nn.Module, config: Any, skip: tuple[type, ...] = ()) -> None:
    """Expand "all-linear" in place to the concrete module names (PEFT does the same)."""
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config.target_modules = all_linear_names(model, config.task_type, skip)


def find_targets(model: nn.Module, config: Any, skip: tuple[type, ...] = ()) -> list[str]:
    """The names of the modules `config` targets, in model order; raises when there is none.

    Modules inside layers of type `skip` (existing adapter layers' own lora_A, ...) never match.
    """
    resolve_target_modules(model, config, skip)
    names = [name for name, _ in walk(model, skip) if name]
    keys = [name for name in names if is_target(config, name)]
    if not keys:
        _check_layers_to_transform(config, names)
        candidates = sorted({name.rsplit(".", 1)[-1] for name, m in walk(model, skip) if is_linear(m)})
        raise ConfigError(
            f"Target modules {_show(config.target_modules)} not found in the base model. "
            f"Linear layers it has: {candidates}"
        )
    if not isinstance(config.target_modules, str):
        unmatched = [t for t in config.target_modules if not any(k == t or k.endswith(f".{t}") for k in names)]
        if unmatched:
            warnings.warn(f"target_modules {sorted(unmatched)} matched no module (PEFT ignores them too)", stacklevel=3)
    return keys


def _check_layers_to_transform(config: Any, names: list[str]) -> None:
    """When only `layers_to_transform` keeps every target out, say so, with the layer count."""
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or isinstance(config.target_modules, str) or (isinstance(layers, list) and not layers):
        return
    matched = [n for n in names if _matches(config.target_modules, n)]
    indices = {i for i in (_layer_index(n, getattr(config, "layers_pattern", None)) for n in matched) if i is not None}
    if matched:
        count = max(indices) + 1 if indices else 0
        raise ConfigError(
            f"layers_to_transform={layers!r} selects none of the target modules {_show(config.target_modules)}: "
            f"the model has {count} layers (indices 0..{count - 1})"
            + ("" if indices else f"; no numbered layer found (layers_pattern={config.layers_pattern!r})")
        )


def pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the first pattern that ends `key` wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def replace_module(model: nn.Module, key: str, new: nn.Module) -> None:
    parent_name, _, child = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _show(target_modules: Any) -> Any:
    return sorted(target_modules) if isinstance(target_modules, (set, list, tuple)) else target_modules
