"""`peft.tuners.adalora.config`."""

from fastpeft.methods.adalora import AdaLoraConfig

__all__ = ["AdaLoraConfig"]
