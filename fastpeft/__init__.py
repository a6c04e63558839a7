"""fastpeft: fused Triton kernels for parameter-efficient fine-tuning, PEFT's API.

`import fastpeft as peft` keeps PEFT code and PEFT checkpoints working.
"""

from fastpeft.config import PeftConfig
from fastpeft.methods.lora import LoraConfig, LoraModel
from fastpeft.model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraModel",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "get_peft_model",
]
