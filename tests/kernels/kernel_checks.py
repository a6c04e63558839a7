"""What the kernel tests share: tolerance tables, the output check, random operands in strided
layouts, and an NF4-quantized weight. Not a test file: each test module that uses it puts this
folder on sys.path and imports it by name (tests/ folders are not packages, see pyproject.toml)."""
import math

import torch

from fastpeft import ops
from fastpeft.quant.nf4 import NF4Weight

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# LoRA: data is scaled so every output element is O(1) (x ~ N(0, 1), W and A ~ N(0, 1/K),
# B ~ N(0, 1/r)), so tolerances are a few units of the dtype's rounding: the kernel and the
# reference both accumulate in fp32 from identical inputs; they differ by the final rounding of the
# output (one ulp: 2**-11 fp16, 2**-8 bf16), by the kernel rounding the [M, r] tile to the operand
# dtype before the up-projection (a second ulp), and by fp32 summation order (~1e-7 * sqrt(K)).
LORA_TOL = {FP32: (2e-5, 2e-5), FP16: (3e-3, 3e-3), BF16: (2.5e-2, 2.5e-2)}

# NF4: kernel and reference decode the same weight (bit-identical in the operand dtype) and
# accumulate in fp32; they differ by summation order and the rounding of the [M, r] LoRA tile (as
# LORA_TOL). bf16 runs upcast under the interpreter, so its weight is not rounded to bf16 there:
# a few bf16 ulps.
NF4_TOL = {FP32: (2e-5, 2e-5), FP16: (3e-3, 3e-3), BF16: (5e-2, 3e-2)}


def close(got, want, tol):
    """`got` is `want` within `tol[dtype]` = (atol, rtol), same dtype and shape, and no element
    left unwritten (outputs are NaN-poisoned before the launch)."""
    atol, rtol = tol[want.dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) elements left in the output"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def rand(g, *shape, dtype, device, scale=1.0, layout="contig"):
    """Random data from generator `g`; `layout` "t" builds a transposed view, "step" a view with
    inner stride 2 (converted first: .to() and arithmetic would make a strided view contiguous)."""
    if layout == "t":
        return (torch.randn(*shape[::-1], generator=g) * scale).to(device=device, dtype=dtype).t()
    if layout == "step":
        wide = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * scale).to(device=device, dtype=dtype)
        return wide[..., ::2]
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def masked_rank_scale(g, r, dtype, device):
    """AdaLoRA's E [r] after masking: values in [-2, 2], some exactly zero, as a strided view."""
    vals = torch.rand(2 * r, generator=g) * 4 - 2
    vals[::3] = 0.0
    return vals.to(device=device, dtype=dtype)[::2]


def dora_col_scale(g, n, dtype, device):
    """DoRA's m / ||W + s B A|| [N]: values in [0.5, 1.5]."""
    return (torch.rand(n, generator=g) + 0.5).to(device=device, dtype=dtype)


def nf4_weight(N, K, blocksize=64, nested=True, device="cpu", seed=0, dtype=FP32):
    """An `NF4Weight` of a seeded [N, K] weight ~ N(0, 1/K) (`dtype` before quantizing), on `device`."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype)
    q = ops.nf4_quantize(w, blocksize, double_quant=nested)
    q = {k: (v.to(device) if v is not None else None) for k, v in q.items()}
    return NF4Weight(q["packed"], q["absmax"], q["quant_map"], q["nested_absmax"], q["nested_quant_map"],
                     q["offset"], (N, K), blocksize)


def launch_args(qw):
    """(packed, absmax, shape, blocksize, nested) of an NF4Weight, as the launchers take them
    (nested: (nested code table, nested absmax, offset), or None)."""
    nested = None if qw.nested_absmax is None else (qw.nested_quant_map, qw.nested_absmax, qw.offset)
    return qw.packed, qw.absmax, qw.shape, qw.blocksize, nested


def nf4_state(N, K, blocksize, nested, device, seed=0):
    """launch_args of nf4_weight(...) and its code table last."""
    qw = nf4_weight(N, K, blocksize, nested, device, seed)
    return (*launch_args(qw), qw.quant_map)
