"""`peft.tuners.ia3`: IA3 under PEFT's names."""

from fastpeft.tuners.ia3.config import IA3Config
from fastpeft.tuners.ia3.layer import IA3Layer, Linear
from fastpeft.tuners.ia3.model import IA3Model

__all__ = ["IA3Config", "IA3Layer", "IA3Model", "Linear"]
