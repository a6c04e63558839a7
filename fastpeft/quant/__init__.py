"""Quantized base weights for QLoRA: NF4 in bitsandbytes' exact format (`fastpeft.quant.nf4`)."""

from fastpeft.quant.nf4 import Linear4bit, NF4Config, NF4Weight, quantize_model

__all__ = ["Linear4bit", "NF4Config", "NF4Weight", "quantize_model"]
