"""transformers API differences across the versions fastpeft supports, in one place.

transformers 5 renamed a model forward's ``past_key_values`` argument and output field to
``cache`` and warns (FutureWarning) on the old names; transformers 4 knows only the old ones.
"""
from __future__ import annotations

import inspect

from torch import nn

__all__ = ["cache_kwarg", "output_cache"]


def cache_kwarg(model: nn.Module) -> str:
    """The name under which `model.forward` takes its KV cache: ``cache`` or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned, read under the name this transformers uses."""
    return output["cache"] if "cache" in output else output.past_key_values
