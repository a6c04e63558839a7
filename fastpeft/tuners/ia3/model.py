"""`peft.tuners.ia3.model`."""

from fastpeft.methods.ia3 import IA3Model

__all__ = ["IA3Model"]
