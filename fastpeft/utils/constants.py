"""`peft.utils.constants`: file names and default targets, PEFT's values."""

from fastpeft.checkpoint import LEGACY_WEIGHTS_NAME as WEIGHTS_NAME
from fastpeft.checkpoint import WEIGHTS_NAME as SAFETENSORS_WEIGHTS_NAME
from fastpeft.config import CONFIG_NAME
from fastpeft.inject import ALL_LINEAR as INCLUDE_LINEAR_LAYERS_SHORTHAND
from fastpeft.methods.lora import LoraModel

TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING = dict(LoraModel.DEFAULT_TARGETS)

__all__ = [
    "CONFIG_NAME",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND",
    "SAFETENSORS_WEIGHTS_NAME",
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "WEIGHTS_NAME",
]
