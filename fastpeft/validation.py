"""One validation layer for what a user hands fastpeft: configs, adapter names, checkpoints,
forward inputs. Every public entry point (get_peft_model, add_adapter, load_adapter,
from_pretrained, load_state_dict, merge, save, mixed forwards) calls these before it changes
anything, so a mistake costs an error message, never a model or a checkpoint.

Errors come from `fastpeft.errors` (all `FastPeftError`, and the builtin a caller already
catches); each message names the argument, the value and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import numbers
import os
import types
import typing
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from fastpeft.errors import (
    AdapterNameError,
    AdapterNotFoundError,
    CheckpointError,
    ConfigError,
    ConfigTypeError,
    InputError,
    InputTypeError,
)

# The mixed-batch row marker, fastpeft's module attributes and the per-adapter ModuleDicts of every
# method: an adapter of one of these names would be ambiguous in a state-dict key
# (`q_proj.lora_A.lora_A.weight`) or a batch (`__base__` means "no adapter").
RESERVED_ADAPTER_NAMES = frozenset({
    "__base__", "base_layer", "base_model", "model", "modules_to_save", "original_module", "prompt_encoder",
    "word_embeddings", "weight", "bias", "lora_A", "lora_B", "lora_E", "ranknum", "lora_magnitude_vector",
    "lora_gate", "adapter_gate", "prefix_gate", "adapter_down", "adapter_up", "ia3_l", "bitfit_bias",
})
# Characters a name may not hold: it becomes a module key ('.') and a folder under save_directory.
_FORBIDDEN_CHARS = ("/", "\\", ".", "\x00", ":")
_MODULE_DICT = nn.ModuleDict()

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# -- adapter names ---------------------------------------------------------------------------------
def check_adapter_name(name: Any, argument: str = "adapter_name") -> str:
    """An adapter name must be a usable module key and a plain folder name: a non-empty str,
    no '.', '/', '\\\\', ':' or NUL, not absolute, not reserved, no clash with a ModuleDict
    attribute (`keys`, `training`, ...)."""
    if not isinstance(name, str):
        raise AdapterNameError(f"{argument}={name!r}: adapter names are non-empty strings, got {type(name).__name__}")
    rule = None
    if not name or not name.strip():
        rule = "it must be a non-empty string"
    elif any(c in name for c in _FORBIDDEN_CHARS) or os.path.isabs(name):
        rule = "it must not contain '.', '/', '\\\\', ':' or NUL (it names a module and a folder)"
    elif name in RESERVED_ADAPTER_NAMES:
        rule = "it is reserved (a mixed-batch marker or a layer attribute of fastpeft)"
    elif name.startswith("_") or hasattr(_MODULE_DICT, name):
        rule = "it would shadow a module attribute (names may not start with '_' or equal nn.Module attributes)"
    if rule:
        raise AdapterNameError(f"{argument}={name!r} is not a valid adapter name: {rule}")
    return name


def check_new_adapter_name(name: Any, existing: Iterable[str], argument: str = "adapter_name") -> str:
    check_adapter_name(name, argument)
    if name in existing:
        raise AdapterNameError(f"{argument}={name!r}: adapter {name!r} already exists; delete it first or choose "
                               "another name")
    return name


def check_known_adapter(name: Any, existing: Iterable[str], argument: str = "adapter_name") -> str:
    if not isinstance(name, str):
        raise InputTypeError(f"{argument}={name!r}: expected one adapter name (a str), got {type(name).__name__}")
    existing = list(existing)
    if name not in existing:
        raise AdapterNotFoundError(f"Adapter {name!r} not found; adapters: {sorted(existing)} (argument {argument})")
    return name


def check_adapter_list(names: Any, existing: Iterable[str], argument: str = "adapter_names") -> list[str]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise InputTypeError(f"{argument}={names!r}: expected a list of adapter names (str)")
    existing = list(existing)
    for name in names:
        check_known_adapter(name, existing, argument)
    return list(names)


# -- configs ---------------------------------------------------------------------------------------
def check_config(config: Any, argument: str = "peft_config") -> Any:
    """Check every field of a PeftConfig against its declared type and the class's own value
    rules (its `__post_init__`, re-run on a copy: values set after the config was built count),
    before anything is injected. numpy scalars are turned into Python numbers in place (JSON and
    the kernels take those)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type) or not hasattr(config, "PEFT_TYPE"):
        raise InputTypeError(f"{argument}={config!r}: expected a fastpeft config (e.g. LoraConfig), "
                             f"got {type(config).__name__}")
    check_fields(config, argument)
    post_init = getattr(config, "__post_init__", None)
    if post_init is not None:
        probe = copy.deepcopy(config)
        try:
            probe.__post_init__()
        except TypeError as e:
            if isinstance(e, ConfigTypeError):
                raise
            raise ConfigTypeError(f"{argument} ({type(config).__name__}): {e}") from e
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{argument} ({type(config).__name__}): {e}") from e
    return config


def check_fields(config: Any, argument: str, literals: bool = True) -> None:
    """Each dataclass field of `config` against its annotation (None passes where the default is
    None: filled in later); numpy scalars become Python numbers in place; floats must be finite.
    `literals=False` checks a Literal field's type only (its value is left to the class's own,
    more specific, message)."""
    hints = _type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        plain = _plain(value)
        if plain is not value:
            setattr(config, f.name, plain)
            value = plain
        hint = hints.get(f.name)
        if hint is None or (value is None and f.default is None):
            continue
        if not _conforms(value, hint if literals else _widen_literals(hint)):
            raise ConfigTypeError(f"{argument}.{f.name}={value!r} ({type(value).__name__}): expected "
                                  f"{_describe(hint)}")
        bad = _non_finite(value)
        if bad is not None:
            raise ConfigError(f"{argument}.{f.name}={value!r}: expected finite numbers, got {bad!r}")


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: check nothing rather than guess
        return {}


def _plain(value: Any) -> Any:
    """numpy scalars (and those inside lists, tuples, sets, dicts) as Python numbers."""
    item = getattr(value, "item", None)
    if item is not None and type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return item()
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in value]
        if any(a is not b for a, b in zip(items, value)):
            return type(value)(items)
    if isinstance(value, dict):
        items = {_plain(k): _plain(v) for k, v in value.items()}
        if any(a is not b for a, b in zip(items.values(), value.values())) or any(
                a is not b for a, b in zip(items, value)):
            return items
    return value


def _widen_literals(hint: Any) -> Any:
    """`hint` with each Literal replaced by the types of its values."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return typing.Union[tuple({type(a) for a in args})] if len({type(a) for a in args}) > 1 else type(args[0])
    if origin is typing.Union or origin is types.UnionType:
        return typing.Union[tuple(_widen_literals(a) for a in args)]
    return hint


def _conforms(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):  # an alpha or a scale may be either; the config's own rules pin counts
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set):
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False
        return not args or all(_conforms(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
    if isinstance(hint, type):
        if issubclass(hint, enum.Enum):
            return isinstance(value, hint)
        return isinstance(value, hint)
    return True


def _non_finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return value
    if isinstance(value, dict):
        value = value.values()
    if isinstance(value, (list, tuple, set, frozenset, type({}.values()))):
        for v in value:
            bad = _non_finite(v)
            if bad is not None:
                return bad
    return None


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_describe(a) for a in args)
    if hint is type(None):
        return "None"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if hint in (int, float):
        return "a number (int or float)"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_describe(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def check_peft_type(config: PeftConfig, held: Iterable[PeftConfig], source: str) -> None:
    """A model holds adapters of one method: `config` must be of the held configs' peft_type."""
    held = list(held)
    if held and held[0].peft_type != config.peft_type:
        raise CheckpointError(f"{source}: cannot add a {config.peft_type} adapter to a model holding "
                              f"{held[0].peft_type} adapters (method type mismatch)")


# -- checkpoints -----------------------------------------------------------------------------------
def check_state_dict(state: Any, argument: str = "state_dict") -> Mapping[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise InputTypeError(f"{argument}: expected a mapping of str to tensors, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise InputTypeError(f"{argument}: keys must be str, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise InputTypeError(f"{argument}[{key!r}]: expected a tensor, got {type(value).__name__}")
    return state


def check_adapter_tensors(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Adapter weights are floating point: an int, bool or uint8 `lora_A` is a broken checkpoint."""
    for key, value in state.items():
        if not value.is_floating_point():
            raise CheckpointError(f"checkpoint {source}: {key} has dtype {value.dtype}; adapter weights must be "
                                  f"floating point ({', '.join(str(d) for d in FLOAT_DTYPES)})")


def check_fits(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], source: str,
               prefix: str = "", dtypes: Mapping[str, torch.dtype] | None = None) -> None:
    """Raise CheckpointError unless `state` has exactly the `expected` keys (under `prefix`),
    shapes, and (where `dtypes` names them) dtypes of the same kind; the message names the first
    mismatches."""
    missing = sorted(k for k in expected if prefix + k not in state)
    unexpected = sorted(k for k in state if not k.startswith(prefix) or k[len(prefix):] not in expected)
    wrong = [
        f"{prefix}{k}: checkpoint {tuple(state[prefix + k].shape)} vs model {tuple(shape)}"
        for k, shape in expected.items()
        if prefix + k in state and tuple(state[prefix + k].shape) != tuple(shape)
    ]
    kinds = [
        f"{prefix}{k}: checkpoint {state[prefix + k].dtype} vs model {dtype}"
        for k, dtype in (dtypes or {}).items()
        if prefix + k in state and not _same_kind(state[prefix + k].dtype, dtype)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_preview([prefix + k for k in missing])}")
    if unexpected:
        problems.append(f"unexpected keys {_preview(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches {_preview(wrong)}")
    if kinds:
        problems.append(f"dtype mismatches {_preview(kinds)}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit the model: " + "; ".join(problems))


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    """Loading casts within a kind (fp16 into fp32 is fine); across kinds it corrupts."""
    if a.is_floating_point or b.is_floating_point:
        return a.is_floating_point and b.is_floating_point
    return a == b


def _preview(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# -- forward / method options ------------------------------------------------------------------
def check_mixed_names(names: Any, existing: Iterable[str], training: bool, rows: int | None) -> list[str]:
    """`adapter_names=` of a mixed-batch forward or generate: PEFT's checks and messages."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InputTypeError(f"adapter_names: Got adapter names of type {type(names)}, expected a list of str.")
    if training:
        raise InputError("Cannot pass `adapter_names` when the model is in training mode.")
    existing = set(existing)
    unknown = sorted({n for n in names if n != "__base__" and n not in existing})
    if unknown:
        raise InputError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
    if rows is not None and rows != len(names):
        raise InputError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(names)} and {rows} respectively.")
    return list(names)


def check_bool(value: Any, argument: str) -> bool:
    if not isinstance(value, bool):
        raise InputTypeError(f"{argument}={value!r}: expected True or False, got {type(value).__name__}")
    return value


def check_directory(path: Any, argument: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"{argument}={path!r}: expected a path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if not path:
        raise InputError(f"{argument}={path!r}: expected a directory path, got an empty string")
    if os.path.isfile(path):
        raise InputError(f"{argument}={path!r} is a file, not a directory")
    return path
