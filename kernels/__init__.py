"""Triton kernels and their PyTorch references. No nn.Module, no autograd: tensors in, tensors out."""
