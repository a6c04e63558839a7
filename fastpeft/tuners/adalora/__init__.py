"""`peft.tuners.adalora`: AdaLoRA under PEFT's names."""

from fastpeft.tuners.adalora.config import AdaLoraConfig
from fastpeft.tuners.adalora.layer import AdaLoraLayer, RankAllocator, SVDLinear
from fastpeft.tuners.adalora.model import AdaLoraModel

__all__ = ["AdaLoraConfig", "AdaLoraLayer", "AdaLoraModel", "RankAllocator", "SVDLinear"]
