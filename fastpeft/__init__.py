"""fastpeft: fused Triton kernels for parameter-efficient fine-tuning."""
