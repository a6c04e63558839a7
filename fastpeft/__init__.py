"""fastpeft: fused Triton kernels for parameter-efficient fine-tuning, PEFT's API.

`import fastpeft as peft` keeps PEFT code and PEFT checkpoints working.
"""

from fastpeft.config import PeftConfig, PromptLearningConfig
from fastpeft.methods.adalora import AdaLoraConfig, AdaLoraModel
from fastpeft.methods.adapter import AdapterConfig, BottleneckModel
from fastpeft.methods.bitfit import BitFitConfig, BitFitModel
from fastpeft.methods.ia3 import IA3Config, IA3Model
from fastpeft.methods.lora import LoraConfig, LoraModel
from fastpeft.methods.mam import MAMConfig, MAMModel
from fastpeft.methods.prefix import PrefixEncoder, PrefixTuningConfig
from fastpeft.methods.prompt import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from fastpeft.methods.ptuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from fastpeft.methods.unipelt import UniPELTConfig, UniPELTModel
from fastpeft.model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from fastpeft.quant.nf4 import Linear4bit, NF4Config, quantize_model

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "LoraConfig",
    "LoraModel",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "get_peft_model",
]
__all__ += ["Linear4bit", "NF4Config", "quantize_model"]  # QLoRA base weights (fastpeft.quant)
__all__ += ["AdapterConfig", "BitFitConfig", "BitFitModel", "BottleneckModel", "IA3Config", "IA3Model"]  # the adapter family (issue 6)
__all__ += ["MAMConfig", "MAMModel"]  # MAM Adapter: prefix + parallel adapter (issue 6)
__all__ += ["UniPELTConfig", "UniPELTModel"]  # UniPELT: gated LoRA + prefix + adapter (issue 6)
