"""`peft.tuners.lora.layer`: fastpeft has one LoRA layer class for nn.Linear and Conv1D
(`LoraLayer` and `Linear` both name it) and one over its NF4 `Linear4bit`."""

from fastpeft.methods.lora import LoraLinear
from fastpeft.methods.lora import LoraLinear as Linear
from fastpeft.methods.lora import LoraLinear as LoraLayer
from fastpeft.methods.lora import NF4LoraLinear as Linear4bit

__all__ = ["Linear", "Linear4bit", "LoraLayer", "LoraLinear"]
