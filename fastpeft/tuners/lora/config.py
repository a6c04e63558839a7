"""`peft.tuners.lora.config`."""

from fastpeft.methods.lora import LoraConfig

__all__ = ["LoraConfig"]
