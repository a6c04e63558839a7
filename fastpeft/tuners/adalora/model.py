"""`peft.tuners.adalora.model`."""

from fastpeft.methods.adalora import AdaLoraModel

__all__ = ["AdaLoraModel"]
