"""kernels/lora.py launchers against kernels/reference.py (under the interpreter on a CPU)."""
import functools
import math
import os
import sys

import pytest
import torch

from fastpeft.kernels import lora, reference

sys.path.insert(0, os.path.dirname(__file__))
from kernel_checks import BF16, FP16, FP32, LORA_TOL as TOL, close  # noqa: E402

# Data is scaled so every output element is O(1), and tolerances are a few units of the dtype's
# rounding: see LORA_TOL in kernel_checks.py.
_close = functools.partial(close, tol=TOL)


def _make(rows, cols, dtype, device, layout="contig", scale=1.0):
    """A random [rows, cols] tensor; `layout`: contig | t (transposed view) | step (inner stride 2)
    | bcast (stride-0 rows, as an expanded upstream gradient)."""
    g = torch.Generator().manual_seed(rows * 1000 + cols)

    def rnd(*shape):  # convert first: .to() and arithmetic would make a strided view contiguous
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    if layout == "t":
        t = rnd(cols, rows).t()
    elif layout == "step":
        t = rnd(rows, 2 * cols + 1)[:, 1::2]
    elif layout == "bcast":
        t = rnd(cols).expand(rows, cols)
    else:
        t = rnd(rows, cols)
    assert layout == "contig" or not t.is_contiguous() or min(rows, cols) == 1
    return t


def _lora_weights(K, N, r, dtype, device, w_layout, ab_layout="contig"):
    weight = _make(N, K, dtype, device, w_layout, 1 / math.sqrt(K))
    lora_A = _make(r, K, dtype, device, ab_layout, 1 / math.sqrt(K))
    lora_B = _make(N, r, dtype, device, ab_layout, 1 / math.sqrt(r))
    return weight, lora_A, lora_B


# (M, K, N, r, dtype, bias, x layout, weight layout, lora_A/B layout): each axis covered once or
# more without the full cross product. M = 33 and K, N = 70 span several 32-wide interpreter blocks.
CASES = [
    (1, 37, 19, 1, FP32, True, "contig", "contig", "contig"),     # decode, r = 1
    (7, 70, 37, 4, FP16, False, "step", "t", "contig"),           # Conv1D weight, strided x
    (33, 70, 37, 8, FP32, True, "step", "t", "t"),                # everything transposed
    (33, 19, 70, 16, FP16, True, "contig", "contig", "t"),        # K < one block
    (7, 37, 70, 64, FP32, False, "contig", "t", "contig"),        # r = 64
    (33, 37, 19, 64, FP16, True, "step", "contig", "contig"),
    (33, 70, 37, 8, BF16, True, "step", "t", "contig"),           # bf16 (UPCAST in the interpreter)
    (1, 19, 70, 4, BF16, False, "contig", "contig", "t"),
]


@pytest.mark.parametrize("M,K,N,r,dtype,has_bias,x_layout,w_layout,ab_layout", CASES)
def test_lora_fwd(device, M, K, N, r, dtype, has_bias, x_layout, w_layout, ab_layout):
    x = _make(M, K, dtype, device, x_layout)
    weight, lora_A, lora_B = _lora_weights(K, N, r, dtype, device, w_layout, ab_layout)
    bias = _make(1, N, dtype, device)[0] if has_bias else None
    # Poisoned output, a column slice of a wider buffer: unwritten elements stay NaN, and
    # out-of-bounds writes would clobber the NaN padding column.
    buf = torch.full((M, N + 1), float("nan"), dtype=dtype, device=device)
    got = lora.lora_fwd(x, weight, bias, lora_A, lora_B, 0.75, out=buf[:, :N])
    assert got.data_ptr() == buf.data_ptr()
    assert torch.isnan(buf[:, N]).all(), "kernel wrote past the last column"
    _close(got, reference.lora_fwd(x, weight, bias, lora_A, lora_B, 0.75))


@pytest.mark.parametrize("M,K,N,r,dtype,_bias,dy_layout,w_layout,ab_layout", [
    *CASES[1:],
    (5, 37, 70, 8, FP32, False, "bcast", "contig", "contig"),     # stride-0 dY, as from y.sum()
])
def test_lora_bwd_dx(device, M, K, N, r, dtype, _bias, dy_layout, w_layout, ab_layout):
    dy = _make(M, N, dtype, device, dy_layout)
    weight, lora_A, lora_B = _lora_weights(K, N, r, dtype, device, w_layout, ab_layout)
    out = torch.full((M, K), float("nan"), dtype=dtype, device=device)
    got = lora.lora_bwd_dx(dy, weight, lora_A, lora_B, -1.5, out=out)
    assert got is out
    _close(got, reference.lora_bwd_dx(dy, weight, lora_A, lora_B, -1.5))


def test_lora_fwd_allocates_and_handles_empty_batch(device):
    weight, lora_A, lora_B = _lora_weights(37, 19, 4, FP32, device, "contig")
    x = _make(3, 37, FP32, device)
    y = lora.lora_fwd(x, weight, None, lora_A, lora_B, 2.0)
    assert y.shape == (3, 19) and y.is_contiguous()
    _close(y, reference.lora_fwd(x, weight, None, lora_A, lora_B, 2.0))
    assert lora.lora_fwd(x[:0], weight, None, lora_A, lora_B, 2.0).shape == (0, 19)


def test_launcher_rejects_bad_inputs(device):
    weight, lora_A, lora_B = _lora_weights(37, 19, 4, FP32, device, "contig")
    x = _make(3, 37, FP32, device)
    with pytest.raises(ValueError, match="lora_B"):
        lora.lora_fwd(x, weight, None, lora_A, lora_B[:, :3], 1.0)
    with pytest.raises(ValueError, match="weight"):
        lora.lora_fwd(x, weight.half(), None, lora_A, lora_B, 1.0)
    with pytest.raises(ValueError, match="out"):
        lora.lora_bwd_dx(_make(3, 19, FP32, device), weight, lora_A, lora_B, 1.0,
                         out=torch.empty(3, 36, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("M", [1, 16, 300])
def test_lora_gpu_sizes(M, dtype):
    """Autotuned configs and tensor-core dots on realistic widths (decode and prefill M)."""
    K, N, r = 1000, 520, 16
    x = _make(M, K, dtype, "cuda")
    weight, lora_A, lora_B = _lora_weights(K, N, r, dtype, "cuda", "t")
    bias = _make(1, N, dtype, "cuda")[0]
    _close(lora.lora_fwd(x, weight, bias, lora_A, lora_B, 2.0),
           reference.lora_fwd(x, weight, bias, lora_A, lora_B, 2.0))
    dy = _make(M, N, dtype, "cuda")
    _close(lora.lora_bwd_dx(dy, weight, lora_A, lora_B, 2.0),
           reference.lora_bwd_dx(dy, weight, lora_A, lora_B, 2.0))
