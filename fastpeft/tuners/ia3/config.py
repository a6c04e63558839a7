"""`peft.tuners.ia3.config`."""

from fastpeft.methods.ia3 import IA3Config

__all__ = ["IA3Config"]
