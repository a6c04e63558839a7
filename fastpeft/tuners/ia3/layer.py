"""`peft.tuners.ia3.layer`: one IA3 layer class for nn.Linear and Conv1D."""

from fastpeft.methods.ia3 import IA3Linear
from fastpeft.methods.ia3 import IA3Linear as IA3Layer
from fastpeft.methods.ia3 import IA3Linear as Linear

__all__ = ["IA3Layer", "IA3Linear", "Linear"]
