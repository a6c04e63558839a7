"""`peft.tuners.adalora.layer`: AdaLoRA's SVD layer and its rank allocator."""

from fastpeft.methods.adalora import RankAllocator, SVDLinear
from fastpeft.methods.adalora import SVDLinear as AdaLoraLayer

__all__ = ["AdaLoraLayer", "RankAllocator", "SVDLinear"]
