"""The base PeftConfig and adapter_config.json I/O, with PEFT's field names.

A directory that real `peft` wrote must load here, and ours must load in `peft`, so the JSON keys
are PEFT's. PEFT writes many fields for features fastpeft does not have; reading one of those with
a non-default value raises (we would otherwise silently compute something else), while reading it
at its default is fine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fastpeft import registry, validation
from fastpeft.errors import CheckpointError, CheckpointNotFoundError, ConfigError, ConfigTypeError, FastPeftError
from fastpeft.peft_types import PeftType

CONFIG_NAME = "adapter_config.json"


@dataclass
class PeftConfig:
    """Fields every method shares (PEFT's `PeftConfigMixin` + `PeftConfig`)."""

    PEFT_TYPE: ClassVar[str] = ""
    # PEFT fields this class does not implement, with the value that means "off": a checkpoint
    # that sets one of them to anything else cannot be reproduced here and is refused.
    UNSUPPORTED_FIELDS: ClassVar[dict[str, Any]] = {}
    # PEFT fields that carry no meaning for the computation (bookkeeping); read and dropped.
    IGNORED_FIELDS: ClassVar[tuple[str, ...]] = ("auto_mapping", "peft_version")

    task_type: str | None = field(default=None, metadata={"help": "PEFT TaskType, e.g. CAUSAL_LM, SEQ_CLS."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Name or path of the base model."})
    revision: str | None = field(default=None, metadata={"help": "Revision of the base model."})
    inference_mode: bool = field(default=False, metadata={"help": "Load frozen, for inference only."})

    def __post_init__(self):
        validation.check_fields(self, type(self).__name__)

    def __init_subclass__(cls, **kwargs: Any):
        """Every config checks its fields' types before its own value rules run (a str where a
        number belongs raises ConfigTypeError naming the field, not a TypeError from a compare)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_checks_fields", False):
            def __post_init__(self, _own=own):
                name = type(self).__name__
                validation.check_fields(self, name, literals=False)  # types first: no raw TypeError
                try:
                    _own(self)  # the class's own rules, with their own messages
                except FastPeftError:
                    raise
                except TypeError as e:
                    raise ConfigTypeError(f"{name}: {e}") from e
                except ValueError as e:
                    raise ConfigError(str(e)) from e
                if type(self).__post_init__ is wrapper:  # outermost (a subclass's rules may call super's)
                    validation.check_fields(self, name)  # then what the class's rules left unchecked

            wrapper = __post_init__
            __post_init__._checks_fields = True
            __post_init__.__doc__ = own.__doc__
            cls.__post_init__ = __post_init__

    @property
    def peft_type(self) -> PeftType | str:
        """PEFT's `PeftType` member (a str-enum: it equals the plain string)."""
        return PeftType(self.PEFT_TYPE) if self.PEFT_TYPE else self.PEFT_TYPE

    @property
    def is_prompt_learning(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["peft_type"] = self.PEFT_TYPE
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the config class named by `data["peft_type"]` (or `cls` itself) from JSON data."""
        data = dict(data)
        peft_type = data.pop("peft_type", cls.PEFT_TYPE or None)
        method = registry.get(peft_type) if peft_type else None
        target = method.config if method is not None else None
        if target is None:
            known = ", ".join(sorted(registry.methods())) or "none"
            raise ConfigError(f"unknown peft_type {peft_type!r}; fastpeft implements: {known}")
        if cls is not PeftConfig and not issubclass(target, cls):
            raise ConfigError(f"peft_type {peft_type!r} is not a {cls.__name__}")
        names = {f.name for f in dataclasses.fields(target)}
        kwargs, refused, unknown = {}, [], []
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in target.UNSUPPORTED_FIELDS:
                if value not in (target.UNSUPPORTED_FIELDS[key], None):
                    refused.append(f"{key}={value!r}")
            elif key not in target.IGNORED_FIELDS:
                unknown.append(key)
        if refused:
            raise NotImplementedError(
                f"{target.__name__}: fastpeft does not implement {', '.join(refused)} (PEFT feature)"
            )
        if unknown:
            warnings.warn(f"{target.__name__}: ignoring unknown config fields {sorted(unknown)}", stacklevel=2)
        return target(**kwargs)

    def to_json_string(self, argument: str = "config", **extra: Any) -> str:
        """adapter_config.json's text; numpy scalars become numbers, anything else JSON cannot
        hold raises ConfigTypeError naming the field (before any file is touched)."""
        data = {**self.to_dict(), **extra}
        for key, value in data.items():
            try:
                json.dumps(value, default=_json_default)
            except (TypeError, ValueError) as e:
                raise ConfigTypeError(f"{argument}.{key}={value!r}: not JSON-serializable ({e})") from e
        return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, **extra: Any) -> None:
        """Write adapter_config.json; `extra` adds PEFT's bookkeeping keys (e.g. auto_mapping).
        Written to a temporary file beside it, then moved into place (never half a file)."""
        text = self.to_json_string(**extra)
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The JSON object of a config file, as a dict (PEFT's classmethod; `from_dict` builds the config)."""
        with open(path_json_file) as f:
            data = json.load(f)
        if "runtime_config" in data:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored.", stacklevel=2)
            del data["runtime_config"]
        return data

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, subfolder: str | None = None) -> PeftConfig:
        path = os.path.join(directory, subfolder or "", CONFIG_NAME)
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(
                f"no {CONFIG_NAME} in {os.path.dirname(path)!r} (fastpeft loads local directories)")
        try:
            with open(path) as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path!r} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise CheckpointError(f"{path!r}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


@dataclass
class PromptLearningConfig(PeftConfig):
    """PEFT's `PromptLearningConfig`: the shared fields of the methods that learn virtual tokens.

    They train no layer of the model: Prompt Tuning and P-Tuning learn embeddings prepended to the
    input, Prefix Tuning learns keys and values prepended in every layer. Fields left None are
    filled from the model's config when the adapter is added (PEFT's rule, `fastpeft.prompting`).
    """

    num_virtual_tokens: int = field(default=None, metadata={"help": "Number of virtual tokens."})
    token_dim: int = field(default=None, metadata={"help": "Hidden size of the model (prefix: kv_heads * head_dim)."})
    num_transformer_submodules: int | None = field(default=None, metadata={"help": "1 (decoder or encoder)."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Attention (prefix: key-value) heads."})
    num_layers: int | None = field(default=None, metadata={"help": "Number of transformer layers."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved."})

    def __post_init__(self):
        n = self.num_virtual_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {n!r}")

    @property
    def is_prompt_learning(self) -> bool:
        return True


def _json_default(value: Any) -> Any:
    """json.dumps' fallback: numpy scalars and arrays as Python numbers and lists."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value
