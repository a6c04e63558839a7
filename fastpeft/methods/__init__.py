"""One file per PEFT method: its config dataclass, its layer(s) and its injection rule.

`TUNERS` maps a config's `peft_type` to the tuner that injects it.
"""

from fastpeft.methods.base import BaseTuner
from fastpeft.methods.lora import LoraModel

TUNERS: dict[str, type[BaseTuner]] = {"LORA": LoraModel}
