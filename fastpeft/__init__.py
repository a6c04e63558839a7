"""fastpeft: fused Triton kernels for parameter-efficient fine-tuning, PEFT's API.

`import fastpeft as peft` keeps PEFT code and PEFT checkpoints working.
"""
import importlib.metadata as _metadata

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
from fastpeft.prompting import get_prompt_model as _get_prompt_model  # noqa: F401  registers the prompt family
from fastpeft.quant.nf4 import Linear4bit, NF4Config, quantize_model
from fastpeft.compat_alias import install_as_peft
from fastpeft.utils import (
    PeftType,
    PeftWarning,
    TaskType,
    get_base_model_state_dict,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)

try:  # the installed distribution's version: one source, pyproject.toml
    __version__ = _metadata.version("fastpeft")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdapterConfig",
    "BitFitConfig",
    "BitFitModel",
    "BottleneckModel",
    "IA3Config",
    "IA3Model",
    "Linear4bit",
    "LoraConfig",
    "LoraModel",
    "MAMConfig",
    "MAMModel",
    "NF4Config",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "UniPELTConfig",
    "UniPELTModel",
    "get_base_model_state_dict",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "install_as_peft",
    "quantize_model",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
