"""Memory-lean optimizers for (Q)LoRA training: 8-bit and paged AdamW.

  AdamW8bit       bitsandbytes' AdamW8bit: both moments in 8 bits (~2.03 bytes per parameter),
                  one fused Triton kernel per parameter on CUDA (adamw.py);
  PagedAdamW      torch.optim.AdamW with its state in pinned host memory, paged through the GPU
                  in chunks for each step (paged.py);
  PagedAdamW8bit  AdamW8bit, paged the same way: QLoRA's paged optimizer.

All are `torch.optim.Optimizer`s: param groups, lr schedulers, zero_grad and state_dict work as
with torch's. The kernels are reached through `fastpeft.ops.optim` only.
"""
from fastpeft.optim.adamw import AdamW8bit
from fastpeft.optim.paged import PagedAdamW, PagedAdamW8bit

__all__ = ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]
