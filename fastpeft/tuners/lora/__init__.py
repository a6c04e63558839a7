"""`peft.tuners.lora`: LoRA (with DoRA and rsLoRA) under PEFT's names."""

from fastpeft.tuners.lora.config import LoraConfig
from fastpeft.tuners.lora.layer import Linear, Linear4bit, LoraLayer
from fastpeft.tuners.lora.model import LoraModel

__all__ = ["Linear", "Linear4bit", "LoraConfig", "LoraLayer", "LoraModel"]
