"""kernels/nf4_cpu.py (the CPU path of ops.nf4_linear) against kernels/reference.py, its input
checks (issue 18 item 11) and the ops.nf4_quantize / nf4_dequantize round trip (item 10)."""
import math
import os
import sys
import warnings

import pytest
import torch

from fastpeft import ops
from fastpeft.kernels import nf4_cpu, reference
from fastpeft.quant.nf4 import NF4Weight

sys.path.insert(0, os.path.dirname(__file__))
from kernel_checks import BF16, FP16, FP32, launch_args, nf4_weight, rand  # noqa: E402

DTYPES = (FP32, FP16, BF16)
# Where the maths is the reference's in its order ("full": the same decoded weight, the same GEMM
# call, the same epilogue) results are bit-identical. The tiled and GEMV paths sum each output
# over K in another order (fp32 accumulation in both): a few fp32 ulps of the sum, then at most
# one rounding step of the output dtype apart.
TOL = {FP32: (1e-5, 1e-5), FP16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}


def _x(M, K, dtype, layout, seed=1):
    return rand(torch.Generator().manual_seed(seed), M, K, dtype=dtype, device="cpu", layout=layout)


def _lora(N, K, r, dtype, seed=2):
    if r == 0:
        return None, None
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, K, generator=g) / math.sqrt(K)).to(dtype), (torch.randn(N, r, generator=g) / math.sqrt(r)).to(dtype)


def _operands(case, dtype, cols):
    """(the case's NF4Weight, its launch_args, a [M, cols] input in the case's layout, LoRA A, B)."""
    M, N, K, bs, nested, r, _, layout = case
    qw = nf4_weight(N, K, bs, nested)
    return (qw, launch_args(qw), _x(M, cols, dtype, layout), *_lora(N, K, r, dtype))


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 256 elements: every shape below spans several tiles, with partial last ones."""
    monkeypatch.setattr(nf4_cpu, "TILE_ELEMS", 256)


# (N, K, blocksize, nested): odd sizes, blocks straddling rows, an odd element count (a half
# byte of padding), a tail block shorter than blocksize, a tail nested block, K = 1.
SHAPES = [(37, 70, 64, True), (19, 45, 32, False), (70, 37, 128, True), (5, 301, 256, True),
          (3, 1, 64, False), (300, 33, 32, True)]


@pytest.mark.parametrize("N,K,blocksize,nested", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_bit_identical(small_tiles, N, K, blocksize, nested, dtype):
    qw = nf4_weight(N, K, blocksize, nested)
    packed, absmax, shape, bs, nest = launch_args(qw)
    out = torch.full(shape, float("nan"), dtype=dtype)
    got = nf4_cpu.nf4_dequantize(packed, absmax, shape, bs, dtype, qw.quant_map, nest, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, reference.nf4_dequantize(packed, absmax, shape, bs, dtype, nest))


# (M, N, K, blocksize, nested, r, bias, layout)
CASES = [
    (1, 37, 70, 64, True, 4, True, "contig"),
    (3, 70, 37, 32, True, 0, False, "step"),
    (1, 45, 19, 64, False, 0, True, "t"),
    (17, 19, 301, 256, True, 8, True, "t"),
    (66, 33, 64, 64, False, 3, False, "step"),
]


def _fwd_both(case, dtype, path, scales=False, poison=True):
    M, N, K, bs, nested, r, has_bias, layout = case
    qw, (packed, absmax, shape, _, nest), x, A, B = _operands(case, dtype, K)
    bias = torch.randn(N).to(dtype) if has_bias else None
    extra = {}
    if scales:
        extra = {"rank_scale": torch.rand(r).to(dtype) if r else None, "col_scale": torch.rand(N).to(dtype)}
    out = torch.full((M, N), float("nan"), dtype=dtype) if poison else None
    got = nf4_cpu.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, A, B, 0.7, qw.quant_map,
                                 out, path=path, **extra)
    want = reference.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, A, B, 0.7, **extra)
    if poison:
        assert got.data_ptr() == out.data_ptr()
    assert got.shape == (M, N) and got.dtype == dtype
    return got, want


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fwd_full_is_bit_identical(small_tiles, case, dtype):
    got, want = _fwd_both(case, dtype, "full", scales=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fwd_tiled(small_tiles, case, dtype):
    got, want = _fwd_both(case, dtype, "tiled", scales=case[5] > 0)
    torch.testing.assert_close(got, want, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["full", "tiled"])
def test_bwd_dx(small_tiles, case, dtype, path):
    M, N, K, bs, nested, r, _, layout = case
    qw, (packed, absmax, shape, _, nest), dy, A, B = _operands(case, dtype, N)
    e = torch.rand(r).to(dtype) if r else None
    out = torch.full((M, K), float("nan"), dtype=dtype)
    got = nf4_cpu.nf4_linear_bwd_dx(dy, packed, absmax, shape, bs, nest, A, B, 0.7, qw.quant_map, out,
                                    rank_scale=e, path=path)
    want = reference.nf4_linear_bwd_dx(dy, packed, absmax, shape, bs, nest, A, B, 0.7, rank_scale=e)
    assert got.data_ptr() == out.data_ptr()
    if path == "full":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_empty_and_zero_sized():
    qw = nf4_weight(6, 64)
    packed, absmax, shape, bs, nest = launch_args(qw)
    got = nf4_cpu.nf4_linear_fwd(torch.zeros(0, 64), packed, absmax, shape, bs, nest, None, None, None,
                                 1.0, qw.quant_map)
    assert got.shape == (0, 6)
    dx = nf4_cpu.nf4_linear_bwd_dx(torch.zeros(0, 6), packed, absmax, shape, bs, nest, None, None, 1.0,
                                   qw.quant_map)
    assert dx.shape == (0, 64)


def test_nan_in_x_stays_in_its_row():
    qw = nf4_weight(40, 64)
    packed, absmax, shape, bs, nest = launch_args(qw)
    x = _x(3, 64, FP32, "contig")
    x[1, 5] = float("nan")
    for path in ("tiled", "full"):
        y = nf4_cpu.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, None, None, None, 1.0, qw.quant_map,
                                   path=path)
        assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


# -- the compiled GEMV (M = 1) ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_gemv_compiled(dtype):
    """The inductor-compiled GEMV: one static graph per (shape, dtype), summing in another order."""
    N, K = 24, 128
    qw = nf4_weight(N, K)
    packed, absmax, shape, bs, nest = launch_args(qw)
    x = _x(1, K, dtype, "step")
    A, B = _lora(N, K, 4, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to the tiled path
        got = nf4_cpu.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, None, A, B, 0.5, qw.quant_map,
                                     path="gemv")
    assert nf4_cpu.gemv_available() and (N, K, bs, dtype) in nf4_cpu._GEMV.fns
    want = reference.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, None, A, B, 0.5)
    torch.testing.assert_close(got, want, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_gemv_falls_back_without_a_compiler(monkeypatch):
    def no_compiler(fn, **kw):
        def broken(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return broken

    monkeypatch.setattr(nf4_cpu, "_GEMV", nf4_cpu._GemvCache())
    monkeypatch.setattr(nf4_cpu.torch, "compile", no_compiler)
    qw = nf4_weight(8, 64)
    packed, absmax, shape, bs, nest = launch_args(qw)
    x = _x(1, 64, FP32, "contig")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        got = nf4_cpu.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, None, None, None, 1.0,
                                     qw.quant_map, path="gemv")
    assert not nf4_cpu.gemv_available()
    want = reference.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, None, None, None, 1.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_auto_path_choice(monkeypatch):
    state = (None, None, (2048, 1024), 64, None, None)
    assert nf4_cpu._pick("auto", 1, state, FP32) == ("gemv" if nf4_cpu.gemv_available() else "tiled")
    assert nf4_cpu._pick("auto", 2, state, FP32) == "tiled"
    assert nf4_cpu._pick("auto", nf4_cpu.FULL_MIN_M - 1, state, FP32) == "tiled"
    assert nf4_cpu._pick("auto", nf4_cpu.FULL_MIN_M, state, FP32) == "full"
    assert nf4_cpu._pick("auto", 1, (None, None, (64, 64), 64, None, None), FP32) == "tiled"  # tiny
    assert nf4_cpu._pick("auto", 1, (None, None, (2048, 1000), 64, None, None), FP32) == "tiled"  # K % 64


# -- issue 18 item 11: every bad NF4 state is a clear error before anything is computed ----------
def _bad_states():
    qw = nf4_weight(6, 64)
    packed, absmax, shape, bs, (code8, nabs, off) = launch_args(qw)
    code4, nest = qw.quant_map, (code8, nabs, off)
    good = dict(packed=packed, absmax=absmax, shape=shape, blocksize=bs, nested=nest, code4=code4)
    return good, [
        ("packed too short", dict(packed=packed[:-1]), ValueError, "packed"),
        ("packed too long", dict(packed=torch.cat([packed, packed[:1]])), ValueError, "packed"),
        ("float packed", dict(packed=packed.float()), ValueError, "uint8"),
        ("int8 packed", dict(packed=packed.to(torch.int8)), ValueError, "uint8"),
        ("packed not a tensor", dict(packed=packed.tolist()), TypeError, "packed"),
        ("short absmax", dict(absmax=absmax[:-1]), ValueError, "absmax"),
        ("integer absmax", dict(absmax=absmax.to(torch.int32)), ValueError, "absmax"),
        ("fp32 absmax with double quant", dict(absmax=absmax.float()), ValueError, "absmax"),
        ("uint8 absmax without double quant", dict(nested=None), ValueError, "absmax"),
        ("short quant map", dict(code4=code4[:8]), ValueError, "quant_map"),
        ("fp16 quant map", dict(code4=code4.half()), ValueError, "quant_map"),
        ("short nested map", dict(nested=(code8[:16], nabs, off)), ValueError, "nested_quant_map"),
        ("integer nested absmax", dict(nested=(code8, nabs.int(), off)), ValueError, "nested_absmax"),
        ("long nested absmax", dict(nested=(code8, torch.cat([nabs, nabs]), off)), ValueError, "nested_absmax"),
        ("two offsets", dict(nested=(code8, nabs, off.reshape(1).repeat(2))), ValueError, "offset"),
        ("nested not a triple", dict(nested=(code8, nabs)), TypeError, "nested"),
        ("wrong shape", dict(shape=(6, 66)), ValueError, "packed"),
        ("3-d shape", dict(shape=(6, 8, 8)), ValueError, "shape"),
        ("negative shape", dict(shape=(-6, -64)), ValueError, "shape"),
        ("float shape", dict(shape=(6.0, 64)), ValueError, "shape"),
        ("odd blocksize", dict(blocksize=48), ValueError, "blocksize"),
    ]


def _bad_ids():
    return [c[0] for c in _bad_states()[1]]


@pytest.mark.parametrize("i", range(len(_bad_ids())), ids=_bad_ids())
def test_bad_state_is_a_clear_error(i):
    good, cases = _bad_states()
    _, change, err, word = cases[i]
    s = {**good, **change}
    N, K = good["shape"]
    calls = [
        lambda: nf4_cpu.nf4_dequantize(s["packed"], s["absmax"], s["shape"], s["blocksize"], FP32, s["code4"],
                                       s["nested"]),
        lambda: nf4_cpu.nf4_linear_fwd(torch.randn(2, K), s["packed"], s["absmax"], s["shape"], s["blocksize"],
                                       s["nested"], None, None, None, 1.0, s["code4"]),
        lambda: nf4_cpu.nf4_linear_bwd_dx(torch.randn(2, N), s["packed"], s["absmax"], s["shape"],
                                          s["blocksize"], s["nested"], None, None, 1.0, s["code4"]),
    ]
    for call in calls:
        with pytest.raises(err, match=word):
            call()


@pytest.mark.parametrize("i", range(len(_bad_ids())), ids=_bad_ids())
def test_ops_nf4_linear_checks_the_state_on_the_cpu(i):
    """Through the public op on the torch backend: before the fix the reference ran on whatever it
    got (RuntimeError, IndexError, NotImplementedError or a wrong answer)."""
    good, cases = _bad_states()
    _, change, err, word = cases[i]
    s = {**good, **change}
    nest = s["nested"]
    if nest is not None and len(nest) != 3:
        pytest.skip("an NF4Weight always carries the nested fields as three attributes")
    qw = NF4Weight(s["packed"], s["absmax"], s["code4"], None if nest is None else nest[1],
                   None if nest is None else nest[0], None if nest is None else nest[2], s["shape"],
                   s["blocksize"])
    x = torch.randn(2, good["shape"][1])
    with pytest.raises((ValueError, TypeError)):
        ops.nf4_linear(x, qw, backend="torch")
    with pytest.raises((ValueError, TypeError)):
        ops.nf4_dequantize(qw, backend="torch")


def test_bad_activation_and_factors():
    qw = nf4_weight(6, 64)
    packed, absmax, shape, bs, nest = launch_args(qw)
    code4 = qw.quant_map

    def fwd(x, bias=None, A=None, B=None, **kw):
        return nf4_cpu.nf4_linear_fwd(x, packed, absmax, shape, bs, nest, bias, A, B, 1.0, code4, **kw)

    with pytest.raises(ValueError, match="x2d must be"):
        fwd(torch.randn(2, 63))
    with pytest.raises(ValueError, match="dtype"):
        fwd(torch.randn(2, 64).double())
    with pytest.raises(TypeError, match="x2d"):
        fwd([[0.0] * 64])
    with pytest.raises(ValueError, match="bias"):
        fwd(torch.randn(2, 64), bias=torch.randn(5))
    with pytest.raises(ValueError, match="both or neither"):
        fwd(torch.randn(2, 64), A=torch.randn(2, 64))
    with pytest.raises(ValueError, match="lora_B"):
        fwd(torch.randn(2, 64), A=torch.randn(2, 64), B=torch.randn(6, 3))
    with pytest.raises(ValueError, match="out"):
        fwd(torch.randn(2, 64), out=torch.empty(2, 5))
    with pytest.raises(ValueError, match="path"):
        fwd(torch.randn(2, 64), path="fast")
    with pytest.raises(ValueError, match="dy2d must be"):
        nf4_cpu.nf4_linear_bwd_dx(torch.randn(2, 64), packed, absmax, shape, bs, nest, None, None, 1.0, code4)


# -- issue 18 item 10: ops.nf4_dequantize(ops.nf4_quantize(w)) composes -------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_dequantize_round_trip(dtype, double_quant):
    w = (torch.randn(13, 70, generator=torch.Generator().manual_seed(0)) / 8).to(dtype)
    q = ops.nf4_quantize(w, 64, double_quant=double_quant)
    got = ops.nf4_dequantize(q)
    assert isinstance(q, dict) and set(q) == {"packed", "absmax", "quant_map", "nested_absmax",
                                              "nested_quant_map", "offset"}
    assert isinstance(got, torch.Tensor) and got.shape == w.shape and got.dtype == w.dtype
    nested = (q["nested_quant_map"], q["nested_absmax"], q["offset"]) if double_quant else None
    want = reference.nf4_dequantize(q["packed"], q["absmax"], (13, 70), 64, dtype, nested)
    assert torch.equal(got, want)
    assert torch.equal(ops.nf4_dequantize(q, FP32), want.float() if dtype == FP32 else
                       reference.nf4_dequantize(q["packed"], q["absmax"], (13, 70), 64, FP32, nested))
    torch.testing.assert_close(got.float(), w.float(), atol=0.2, rtol=0)  # 4 bits of it


def test_dequantize_of_an_nf4_weight_keeps_its_default():
    qw = nf4_weight(5, 64)
    assert ops.nf4_dequantize(qw).dtype == FP32  # an NF4Weight does not record its source dtype


def test_dequantize_refuses_a_partial_dict():
    full = ops.nf4_quantize(torch.randn(4, 64))
    q = dict(full)  # a plain dict of the tensors: no shape, no blocksize
    with pytest.raises(ValueError, match="shape"):
        ops.nf4_dequantize(q)
    assert torch.equal(ops.nf4_dequantize({**q, "shape": (4, 64), "blocksize": 64}), ops.nf4_dequantize(full))
    with pytest.raises(TypeError, match="NF4 weight"):
        ops.nf4_dequantize(torch.randn(4, 64))
