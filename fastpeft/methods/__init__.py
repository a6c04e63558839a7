"""One file per PEFT method: its config dataclass, its layer(s) and its injection rule.

`TUNERS` maps a config's `peft_type` to the tuner that injects it.
"""

from torch import nn

from fastpeft.methods.adalora import AdaLoraModel
from fastpeft.methods.adapter import BottleneckModel
from fastpeft.methods.base import BaseTuner
from fastpeft.methods.bitfit import BitFitModel
from fastpeft.methods.ia3 import IA3Model
from fastpeft.methods.lora import LoraModel
from fastpeft.methods.prefix import PrefixEncoder
from fastpeft.methods.prompt import PromptEmbedding
from fastpeft.methods.ptuning import PromptEncoder

TUNERS: dict[str, type[BaseTuner]] = {"LORA": LoraModel, "ADALORA": AdaLoraModel}
TUNERS.update(IA3=IA3Model, BITFIT=BitFitModel, BOTTLENECK=BottleneckModel)  # the adapter family (issue 6)

# Prompt learning methods inject nothing: `fastpeft.prompting` holds their prompt encoder by peft_type.
PROMPT_ENCODERS: dict[str, type[nn.Module]] = {
    "PROMPT_TUNING": PromptEmbedding,
    "P_TUNING": PromptEncoder,
    "PREFIX_TUNING": PrefixEncoder,
    "MAM": PrefixEncoder,  # MAM's prefix part (fastpeft/methods/mam.py)
    "UNIPELT": PrefixEncoder,  # UniPELT's prefix part (fastpeft/methods/unipelt.py)
}
