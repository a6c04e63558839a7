"""The bridge between modules and kernels: one file per op family, each with its
`torch.library` custom op(s) (`torch.ops.fastpeft.*`: fake kernel, registered autograd) and its
public op; `_backend` holds the backend choice and the shared checks.

  lora.py      `lora_linear` (LoRA, AdaLoRA's rank scale, DoRA's column scale)
  ia3.py       `ia3_linear`, `IA3LinearFunction`
  adapter.py   `bottleneck_adapter`
  nf4.py       `nf4_quantize`, `nf4_dequantize`, `nf4_linear` (QLoRA)
  multi.py     `multi_lora_linear` (mixed-adapter batches)
  optim.py     `adamw8bit_update` (fastpeft.optim's 8-bit AdamW step)

This package is the only importer of `fastpeft.kernels`. Triton itself is imported lazily, only
when the ``"triton"`` backend is chosen, so ``import fastpeft`` works on machines without it.
Backends are chosen per call by `resolve_backend` (see `fastpeft.ops._backend`): the
``backend=`` argument, then ``FASTPEFT_BACKEND`` read at call time, then ``"auto"`` (triton on
CUDA tensors, else the PyTorch reference of `fastpeft/kernels/reference.py`).
"""
from __future__ import annotations

from fastpeft.kernels import reference
from fastpeft.ops._backend import resolve_backend
from fastpeft.ops.adapter import bottleneck_adapter
from fastpeft.ops.ia3 import IA3LinearFunction, ia3_linear
from fastpeft.ops.lora import lora_linear
from fastpeft.ops.multi import multi_lora_linear
from fastpeft.ops.nf4 import nf4_dequantize, nf4_linear, nf4_quantize

__all__ = ["resolve_backend", "reference",
           "lora_linear", "IA3LinearFunction", "ia3_linear",
           "bottleneck_adapter", "nf4_quantize", "nf4_dequantize", "nf4_linear",
           "multi_lora_linear"]
