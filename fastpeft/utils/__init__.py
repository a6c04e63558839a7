"""`peft.utils` with PEFT's public names, for `from peft.utils import ...` after
`fastpeft.install_as_peft()` (fastpeft/compat_alias.py). Names PEFT has and fastpeft does not
are absent (an ImportError names them)."""

from fastpeft.methods.base import ModulesToSaveWrapper
from fastpeft.utils.constants import (
    CONFIG_NAME,
    INCLUDE_LINEAR_LAYERS_SHORTHAND,
    SAFETENSORS_WEIGHTS_NAME,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    WEIGHTS_NAME,
)
from fastpeft.utils.peft_types import PeftType, TaskType
from fastpeft.utils.save_and_load import (
    _get_submodules,
    get_base_model_state_dict,
    get_peft_model_state_dict,
    infer_device,
    inject_adapter_in_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from fastpeft.utils.warning import PeftWarning

__all__ = [
    "CONFIG_NAME",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND",
    "ModulesToSaveWrapper",
    "PeftType",
    "PeftWarning",
    "SAFETENSORS_WEIGHTS_NAME",
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "TaskType",
    "WEIGHTS_NAME",
    "_get_submodules",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "infer_device",
    "inject_adapter_in_model",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
