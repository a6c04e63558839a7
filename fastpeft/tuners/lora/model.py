"""`peft.tuners.lora.model`."""

from fastpeft.methods.lora import LoraModel
from fastpeft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

__all__ = ["LoraModel", "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"]
