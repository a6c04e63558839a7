"""The one method registry: each method file (fastpeft/methods/<method>.py) registers its config
class, its tuner (or its prompt encoder) and its `peft_type` in one `register` call, and
everything that needs to know the methods reads this module: `config.PeftConfig.from_dict`
(peft_type -> config class), `model.py` (config -> tuner, or the prompt-learning model),
`prompting.py` (prompt encoders, prefix layout, a method's own model classes) and the CLI.

Two families build a PeftModel: ``"layers"`` (the method injects layers: `fastpeft.model`) and
``"prompt"`` (prompt learning: `fastpeft.prompting`); each family's module registers its builder
with `register_family`, so `model.py` never imports `prompting.py`.

This module imports nothing from fastpeft: every other module may import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Method:
    """One PEFT method, as registered by its file.

    peft_type: the config's `PEFT_TYPE` (PEFT's name where PEFT has the method);
    config: its config class (a `fastpeft.config.PeftConfig`);
    tuner: the `BaseTuner` subclass that injects its layers, or None (prompt learning);
    encoder: prompt learning, ``encoder(config, word_embeddings) -> nn.Module``, the module
      whose output is the learned prompt; or None;
    prefix: prompt learning, the prompt is every layer's keys and values (Prefix Tuning, MAM,
      UniPELT) rather than embeddings prepended to the input;
    task_models: prompt learning, {task_type: model class} when the method adds parts to the
      prompt-learning model (MAM, UniPELT), else empty: the family's model per task.
    """

    peft_type: str
    config: type
    tuner: type | None = None
    encoder: Callable[[Any, Any], Any] | None = None
    prefix: bool = False
    task_models: dict[str, type] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """How a family builds and loads a PeftModel: ``build(model, config, adapter_name)`` and
    ``load(model, directory, config, adapter_name, is_trainable)`` (None: PeftModel's own)."""

    build: Callable[..., Any]
    load: Callable[..., Any] | None = None


_METHODS: dict[str, Method] = {}
_FAMILIES: dict[str, Family] = {}


def register(config: type, *, tuner: type | None = None, encoder: Callable | None = None,
             prefix: bool = False, task_models: dict[str, type] | None = None) -> Method:
    """Register the method whose config class is `config` (its `PEFT_TYPE` names it)."""
    peft_type = getattr(config, "PEFT_TYPE", "")
    if not peft_type:
        raise ValueError(f"{config.__name__} has no PEFT_TYPE")
    if (tuner is None) == (encoder is None):
        raise ValueError(f"{peft_type}: register a tuner (layer methods) or an encoder (prompt learning)")
    if peft_type in _METHODS and _METHODS[peft_type].config is not config:
        raise ValueError(f"peft_type {peft_type!r} is already registered by {_METHODS[peft_type].config.__name__}")
    method = Method(peft_type, config, tuner, encoder, prefix, dict(task_models or {}))
    _METHODS[peft_type] = method
    return method


def get(peft_type: str) -> Method | None:
    """The method registered as `peft_type`, or None."""
    return _METHODS.get(peft_type)


def methods() -> dict[str, Method]:
    """Every registered method by peft_type (a copy), in registration order."""
    return dict(_METHODS)


def tuner(config) -> type:
    """The tuner class that injects `config`'s method (ValueError when it has none)."""
    method = _METHODS.get(config.peft_type)
    if method is None or method.tuner is None:
        known = sorted(p for p, m in _METHODS.items() if m.tuner is not None)
        raise ValueError(f"peft_type {config.peft_type!r} has no tuner; known: {known}")
    return method.tuner


def register_family(name: str, build: Callable[..., Any], load: Callable[..., Any] | None = None) -> None:
    _FAMILIES[name] = Family(build, load)


def family(config) -> Family:
    """The family that builds a PeftModel for `config`: ``"prompt"`` for prompt learning, else
    ``"layers"``."""
    name = "prompt" if config.is_prompt_learning else "layers"
    try:
        return _FAMILIES[name]
    except KeyError:
        raise RuntimeError(f"the {name!r} family is not registered: import fastpeft first") from None
