"""The errors fastpeft raises for a user's mistakes.

Every one is a `FastPeftError` (catch that for any of them) and also the builtin a caller already
expects (`ValueError`, `TypeError`, `KeyError`, `FileNotFoundError`), so code written against PEFT
or against an earlier fastpeft keeps catching what it caught. Messages name the argument, the
value and what was expected. `fastpeft.validation` raises them; nothing here imports torch.
"""

from __future__ import annotations

__all__ = [
    "AdapterNameError",
    "AdapterNotFoundError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "ConfigTypeError",
    "FastPeftError",
    "InputError",
    "InputTypeError",
    "MissingKeyError",
]


class FastPeftError(Exception):
    """Base class of every error fastpeft raises for bad user input."""


class ConfigError(FastPeftError, ValueError):
    """A config value that is out of range, or does not fit the model."""


class ConfigTypeError(FastPeftError, TypeError, ValueError):
    """A config value of the wrong type (a `TypeError`; also a `ValueError`, which configs
    raised for such values before)."""


class AdapterNameError(FastPeftError, ValueError):
    """An adapter name that breaks a naming rule (it becomes a module key and a folder name)."""


class AdapterNotFoundError(FastPeftError, ValueError):
    """An adapter name the model does not hold (a `ValueError`, as in PEFT)."""


class CheckpointError(FastPeftError, ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


class CheckpointNotFoundError(FastPeftError, FileNotFoundError):
    """A checkpoint directory without the file it needs."""


class InputError(FastPeftError, ValueError):
    """A bad argument value to a model call (forward inputs, merge/save options)."""


class InputTypeError(FastPeftError, TypeError):
    """An argument of the wrong type."""


class MissingKeyError(FastPeftError, KeyError):
    """A key that is not there; printed as a sentence (a bare KeyError prints its repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
