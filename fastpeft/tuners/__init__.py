"""`peft.tuners` with PEFT's public names: one subpackage per method fastpeft implements (lora,
ia3, adalora) holding its config, layer and model classes under PEFT's names, plus
`tuners_utils` (BaseTuner, BaseTunerLayer). The classes are fastpeft's (fastpeft/methods/);
these modules only name them as PEFT does, for `from peft.tuners.lora import LoraLayer`."""

from fastpeft.tuners.adalora import AdaLoraConfig, AdaLoraModel
from fastpeft.tuners.ia3 import IA3Config, IA3Model
from fastpeft.tuners.lora import LoraConfig, LoraModel

__all__ = ["AdaLoraConfig", "AdaLoraModel", "IA3Config", "IA3Model", "LoraConfig", "LoraModel"]
