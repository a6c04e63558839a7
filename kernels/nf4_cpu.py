"""NF4 linear on the CPU: the ``"torch"`` backend of `fastpeft.ops.nf4_linear` and its dX.

Same signatures as the Triton launchers of `kernels/nf4.py` (`nf4_dequantize`, `nf4_linear_fwd`,
`nf4_linear_bwd_dx`), so `fastpeft.ops` swaps one module for the other. `reference.py` stays the
simple oracle; this module is the fast path and is tested against it.

The format is bitsandbytes' (see `reference.py`): codes packed two per byte (even element in the
high nibble) over the flattened row-major [N, K] weight, one fp32 scale per `blocksize` block, or
8-bit scales with double quant. Every input is checked first (`check_state`, as the Triton
launcher checks it), so a bad buffer is a ValueError/TypeError, never a gather out of range or
silent garbage.

How the weight is decoded, and why (times: 2 threads of an AMD EPYC (AVX-512), fp32, one
4096 x 4096 layer, dense ``F.linear`` = 2.6-2.8 ms at M = 1 and ~345 ms at M = 2048):
- A byte -> (high, low) pair table, ``pairs [256, 2]``, decodes both nibbles of a byte with one
  `index_select` row; block scales are decoded once per block (double quant: ``code8[q] *
  nested_absmax + offset`` with the nested scale broadcast over a [-1, 256] view) and applied
  over a [-1, blocksize] view. No per-element gather of a scale, no Python loop over blocks.
  Dequantizing the whole weight this way costs ~34 ms (reference.py: ~120 ms for the layer):
  the int32 index, the gathered pairs and the fp32 weight each make a round trip to DRAM.
- "tiled": the weight is decoded in tiles of `TILE_ELEMS` elements (2 MiB of fp32) that stay in
  L2 while they are multiplied: ~10-13 ms at M = 1 (3.4-4.3x dense), the eager floor here (each
  op still writes its tile once, and Python issues ~6 ops per tile); tiles of 2^17..2^20
  elements measured 15.1, 13.8, 13.2, 13.2 ms. Over dense: 2.1x at M = 4, 2.6x at 16, 1.7x at
  64, 1.26x at 256 (a ~10 ms decode next to a growing GEMM).
- "gemv" (M = 1): one fused decode-multiply-reduce loop compiled by inductor to C++
  (`torch.compile`): each packed byte is read once and never widened in memory: 4.1-5.3 ms
  (1.5-1.9x dense), the only path under 2.5x at M = 1. A 16-entry table with a nibble split
  compiled to 5.0 ms, the pair table to 4.1 ms. Dynamic-shape graphs were 10x slower (symbolic
  sizes turn every index into divisions), so each layer shape gets its own static graph, compiled
  on first use (seconds) and kept in a small per-shape table (`_GemvCache`); below
  `GEMV_MIN_NUMEL` weights, or where no compiler works, the tiled path runs instead.
- "full" (M >= `FULL_MIN_M`, prefill and training): decode the whole weight (in tiles), then one
  GEMM on it. Its decode costs ~30 ms (the [N, K] weight goes to DRAM and back), so below ~1024
  rows the tiles win (M = 256: full 1.70x, tiled 1.26x dense); at M = 2048 the GEMM dominates
  (`fastpeft bench`: 1.09x dense), and the result is bit-identical to the reference, which
  makes the same GEMM call on the same weight.
- `fastpeft bench --sections nf4 --device cpu --threads 2`, 4096 x 4096: this path 1.69x dense
  at M = 1 (reference.py: ~50x), 1.09x at M = 2048; bitsandbytes 0.50.2's CPU kernels 0.14x
  and 0.34x (they run native 4-bit code, which this module does not ship).
"""
from __future__ import annotations

import math
import threading
import types
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpeft.kernels.reference import NESTED_BLOCKSIZE, NF4_BLOCKSIZES

__all__ = ["check_state", "nf4_dequantize", "nf4_linear_fwd", "nf4_linear_bwd_dx", "PATHS"]

PATHS = ("auto", "gemv", "tiled", "full")
TILE_ELEMS = 1 << 19          # elements decoded per tile: 2 MiB fp32 (+1 MiB int32 index, pairs)
GEMV_MIN_NUMEL = 1 << 20      # smaller weights: the tiled path is fast enough, no compile
FULL_MIN_M = 1024             # rows from which one GEMM over the whole weight wins (measured)
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


# -- checks ----------------------------------------------------------------------------------------
def _tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"nf4: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_state(packed, absmax, shape, blocksize, nested, code4, device=None) -> None:
    """Check an NF4 state as the Triton launcher does, before anything is computed.

    packed: uint8 with (N*K+1)//2 elements; absmax: fp32 [ceil(N*K / blocksize)], or uint8 with
    `nested = (code8 fp32 [256], nested_absmax float [ceil(B / 256)], offset float 1 element)`;
    code4: fp32 [16]; shape: (N, K) non-negative ints; blocksize: one of NF4_BLOCKSIZES; all on
    `device` (default: packed's). TypeError for a wrong kind of object, ValueError otherwise.
    """
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"nf4: shape must be (N, K), two non-negative ints, got {shape!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in NF4_BLOCKSIZES:
        raise ValueError(f"nf4: blocksize must be one of {NF4_BLOCKSIZES}, got {blocksize!r}")
    N, K = shape
    numel = N * K
    nblocks = -(-numel // blocksize)
    _tensor("packed", packed), _tensor("absmax", absmax), _tensor("quant_map", code4)
    device = packed.device if device is None else device
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
        raise ValueError(f"nf4: packed must be uint8 with (N*K+1)//2 = {(numel + 1) // 2} elements "
                         f"for shape {[N, K]}, got {packed.dtype} {list(packed.shape)}")
    want = torch.uint8 if nested is not None else torch.float32
    if _tensor("absmax", absmax).dtype != want or absmax.numel() != nblocks:
        raise ValueError(f"nf4: absmax must be {want} with ceil(N*K / blocksize) = {nblocks} elements "
                         f"({'8-bit codes with double quant' if nested is not None else 'no double quant'}),"
                         f" got {absmax.dtype} {list(absmax.shape)}")
    if _tensor("quant_map", code4).dtype != torch.float32 or code4.numel() != 16:
        raise ValueError(f"nf4: quant_map (code4) must be fp32 [16], got {code4.dtype} {list(code4.shape)}")
    named = {"packed": packed, "absmax": absmax, "quant_map": code4}
    if nested is not None:
        if not isinstance(nested, (tuple, list)) or len(nested) != 3:
            raise TypeError(f"nf4: nested must be (code8, nested_absmax, offset) or None, got "
                            f"{type(nested).__name__}")
        code8, nested_absmax, offset = nested
        if _tensor("nested_quant_map", code8).dtype != torch.float32 or code8.numel() != 256:
            raise ValueError(f"nf4: nested_quant_map (code8) must be fp32 [256], got {code8.dtype} "
                             f"{list(code8.shape)}")
        n_nested = -(-nblocks // NESTED_BLOCKSIZE)
        for name, t, n in (("nested_absmax", nested_absmax, n_nested), ("offset", offset, 1)):
            if not _tensor(name, t).dtype.is_floating_point or t.numel() != n:
                raise ValueError(f"nf4: {name} must be floating point with {n} element(s) "
                                 f"(absmax has {nblocks}), got {t.dtype} {list(t.shape)}")
        named.update(nested_quant_map=code8, nested_absmax=nested_absmax, offset=offset)
    for name, t in named.items():
        if t.device != device:
            raise ValueError(f"nf4: {name} is on {t.device}, expected {device}")


def _check_dense(name: str, t, shape: tuple, ref: Tensor) -> None:
    if t is None:
        return
    if _tensor(name, t).dtype != ref.dtype or t.device != ref.device or tuple(t.shape) != shape:
        raise ValueError(f"nf4: {name} must be {list(shape)} {ref.dtype} on {ref.device}, got "
                         f"{list(t.shape)} {t.dtype} on {t.device}")


def _check_call(inp: Tensor, name: str, width: int, state: tuple, lora_A, lora_B, N: int, K: int,
                bias=None, rank_scale=None, col_scale=None, out=None, path: str = "auto") -> None:
    packed, absmax, shape, blocksize, nested, code4 = state
    check_state(packed, absmax, shape, blocksize, nested, code4, device=_tensor(name, inp).device)
    if inp.dim() != 2 or inp.shape[1] != width:
        raise ValueError(f"nf4: {name} must be [M, {width}] for an NF4 weight of shape {[N, K]}, "
                         f"got {list(inp.shape)}")
    if inp.dtype not in _FLOAT:
        raise ValueError(f"nf4: {name} dtype must be float32|float16|bfloat16, got {inp.dtype}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("nf4: lora_A and lora_B: pass both or neither")
    r = None
    if lora_A is not None:
        r = _tensor("lora_A", lora_A).shape[0] if lora_A.dim() == 2 else 0
        if r < 1:
            raise ValueError(f"nf4: lora_A must be [r, {K}] with r >= 1, got {list(lora_A.shape)}")
        _check_dense("lora_A", lora_A, (r, K), inp)
        _check_dense("lora_B", lora_B, (N, r), inp)
    if rank_scale is not None and r is None:
        raise ValueError("nf4: rank_scale scales the LoRA ranks: pass it with lora_A and lora_B")
    _check_dense("rank_scale", rank_scale, (r,), inp)
    _check_dense("col_scale", col_scale, (N,), inp)
    _check_dense("bias", bias, (N,), inp)
    if out is not None and (_tensor("out", out).dtype != inp.dtype or out.device != inp.device
                            or tuple(out.shape) != (inp.shape[0], N if name == "x2d" else K)):
        raise ValueError(f"nf4: out must be {[inp.shape[0], N if name == 'x2d' else K]} {inp.dtype}, "
                         f"got {list(out.shape)} {out.dtype}")
    if path not in PATHS:
        raise ValueError(f"nf4: path must be one of {PATHS}, got {path!r}")


# -- decoding --------------------------------------------------------------------------------------
def _pairs(code4: Tensor) -> Tensor:
    """fp32 [256, 2]: byte b -> (code4[b >> 4], code4[b & 15]), the (even, odd) element pair."""
    b = torch.arange(256, device=code4.device)
    return torch.stack([code4[b >> 4], code4[b & 15]], dim=1)


def _block_scales(absmax: Tensor, nested) -> Tensor:
    """fp32 [B]: the per-block scales, decoded once per block. With double quant, bnb's
    ``code8[q] * nested_absmax[i // 256] + offset`` (fp32 multiply, then fp32 add; bit-identical
    to `reference.nf4_absmax`), the nested scale broadcast over a [-1, 256] view."""
    if nested is None:
        return absmax.reshape(-1)
    code8, nested_absmax, offset = nested
    B = absmax.numel()
    q = torch.index_select(code8, 0, absmax.reshape(-1).to(torch.int32))
    nabs = nested_absmax.reshape(-1).float()
    full = B // NESTED_BLOCKSIZE * NESTED_BLOCKSIZE
    scales = torch.empty(B, dtype=torch.float32, device=absmax.device)
    if full:
        torch.mul(q[:full].view(-1, NESTED_BLOCKSIZE), nabs[:full // NESTED_BLOCKSIZE, None],
                  out=scales[:full].view(-1, NESTED_BLOCKSIZE))
    if B > full:
        torch.mul(q[full:], nabs[full // NESTED_BLOCKSIZE], out=scales[full:])
    return scales.add_(offset.reshape(()).float())


def _decode_into(dst: Tensor, e0: int, flat_packed: Tensor, scales: Tensor, pairs: Tensor,
                 blocksize: int) -> None:
    """dst (1-D, any float dtype) = the weight's flat elements [e0, e0 + len(dst)), e0 a multiple
    of `blocksize` (so of 2): ``pairs[byte] * scale[block]`` in fp32, one cast to dst's dtype."""
    n = dst.numel()
    vals = torch.index_select(pairs, 0, flat_packed[e0 // 2:(e0 + n + 1) // 2].to(torch.int32)).view(-1)
    blk0, full = e0 // blocksize, n // blocksize * blocksize
    if full:
        torch.mul(vals[:full].view(-1, blocksize), scales[blk0:blk0 + full // blocksize, None],
                  out=dst[:full].view(-1, blocksize))
    if n > full:  # the last, partial block of the weight
        torch.mul(vals[full:n], scales[blk0 + full // blocksize], out=dst[full:])


def _tile_rows(K: int, blocksize: int) -> int:
    """Rows per tile: about TILE_ELEMS elements, and a whole number of blocks, so that every
    tile starts on a block (and byte) boundary."""
    unit = blocksize // math.gcd(K, blocksize)
    return max(unit, TILE_ELEMS // max(K, 1) // unit * unit)


def _dequantize_flat(out_flat: Tensor, packed: Tensor, scales: Tensor, pairs: Tensor, blocksize: int) -> None:
    flat = packed.reshape(-1)
    step = max(blocksize, TILE_ELEMS // blocksize * blocksize)
    for e0 in range(0, out_flat.numel(), step):
        _decode_into(out_flat[e0:e0 + step], e0, flat, scales, pairs, blocksize)


def nf4_dequantize(packed: Tensor, absmax: Tensor, shape: tuple[int, int], blocksize: int,
                   dtype: torch.dtype, code4: Tensor, nested=None, out: Tensor | None = None) -> Tensor:
    """The [N, K] weight in `dtype`, bit-identical to bnb's `dequantize_4bit` (and to
    `reference.nf4_dequantize`): ``code4[q] * scale`` in fp32, cast once, decoded in tiles.

    packed: uint8 [(N*K+1)//2(, 1)]; absmax: fp32 [B], or uint8 [B] with `nested = (code8 fp32
    [256], nested_absmax fp32 [ceil(B/256)], offset fp32 0-d)`; code4: fp32 [16];
    out: [N, K] dtype contiguous or None -> out.
    """
    check_state(packed, absmax, shape, blocksize, nested, code4)
    if dtype not in _FLOAT:
        raise ValueError(f"nf4_dequantize: dtype must be float32|float16|bfloat16, got {dtype}")
    if out is None:
        out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    elif (_tensor("out", out).shape != tuple(shape) or out.dtype != dtype or not out.is_contiguous()
          or out.device != packed.device):
        raise ValueError(f"nf4_dequantize: out must be contiguous {list(shape)} {dtype}, got "
                         f"{list(out.shape)} {out.dtype}")
    if out.numel():
        _dequantize_flat(out.view(-1), packed, _block_scales(absmax, nested), _pairs(code4), blocksize)
    return out


# -- the fused GEMV (inductor) ---------------------------------------------------------------------
def _gemv_graph(x: Tensor, packed: Tensor, scales: Tensor, pairs: Tensor, blocksize: int,
                rounding: torch.dtype | None) -> Tensor:
    """y [N] fp32 = dequant(W) @ x, the graph inductor fuses into one loop per output row.
    x: [K] fp32; packed: [N, K/2] uint8; scales: [N, K/blocksize] fp32; pairs: [256, 2] fp32;
    rounding: the compute dtype the weight is rounded to first (as the reference does), or None."""
    n = packed.shape[0]
    w = pairs[packed.long()].view(n, -1, blocksize) * scales.view(n, -1, 1)
    if rounding is not None:
        w = w.to(rounding).float()
    return (w * x.view(1, -1, blocksize)).sum((-1, -2))


class _GemvCache:
    """One compiled static-shape GEMV per (N, K, blocksize, dtype), at most `limit` of them.

    Each entry compiles its own copy of `_gemv_graph`'s code object: dynamo keeps its graphs (and
    its recompile limit) per code object, so shapes never evict or block each other. `broken`
    holds why compiling failed (no C++ compiler, ...): from then on the tiled path serves."""

    def __init__(self, limit: int = 64):
        self.limit, self.fns, self.broken = limit, {}, None
        self.lock = threading.Lock()

    def get(self, key):
        fn = self.fns.get(key)
        if fn is not None or self.broken is not None:
            return fn
        with self.lock:
            if key not in self.fns and len(self.fns) < self.limit:
                g = _gemv_graph
                copy = types.FunctionType(g.__code__.replace(), g.__globals__, g.__name__, g.__defaults__)
                self.fns[key] = torch.compile(copy, dynamic=False, fullgraph=True)
            return self.fns.get(key)

    def fail(self, err: Exception) -> None:
        self.broken = f"{type(err).__name__}: {err}"
        warnings.warn(f"fastpeft: the compiled NF4 GEMV is unavailable ({self.broken}); "
                      "the CPU path falls back to eager tiles", RuntimeWarning, stacklevel=3)


_GEMV = _GemvCache()


def gemv_available() -> bool:
    """Whether the compiled GEMV may serve (False once compiling failed on this machine)."""
    return _GEMV.broken is None


def _gemv(x2d, packed, scales, pairs, shape, blocksize) -> Tensor | None:
    """[1, N] fp32 through the compiled GEMV, or None when it cannot serve."""
    N, K = shape
    fn = _GEMV.get((N, K, blocksize, x2d.dtype))
    if fn is None:
        return None
    rounding = None if x2d.dtype == torch.float32 else x2d.dtype
    try:
        y = fn(x2d[0].float().contiguous(), packed.reshape(N, K // 2), scales.reshape(N, K // blocksize),
               pairs, blocksize, rounding)
    except Exception as e:  # noqa: BLE001  (a missing/broken compiler: fall back, say so once)
        _GEMV.fail(e)
        return None
    return y.view(1, N)


# -- linear forward / dX ---------------------------------------------------------------------------
def _weight_fp32(state, dtype, scales, pairs) -> Tensor:
    """The whole [N, K] weight as the reference feeds its GEMM: decoded to `dtype`, then fp32."""
    packed, _, shape, blocksize, _, _ = state
    w = torch.empty(shape, dtype=dtype, device=packed.device)
    if w.numel():
        _dequantize_flat(w.view(-1), packed, scales, pairs, blocksize)
    return w.float()


def _tiles(state, dtype, scales, pairs):
    """(r0, r1, tile fp32 [r1 - r0, K]) over the weight's rows, each tile decoded into one
    reused buffer (rounded to `dtype` first, as the reference rounds its weight)."""
    packed, _, (N, K), blocksize, _, _ = state
    rows = min(N, _tile_rows(K, blocksize))
    flat = packed.reshape(-1)
    buf = torch.empty(rows * K, dtype=dtype, device=packed.device)
    buf32 = buf if dtype == torch.float32 else torch.empty(rows * K, device=packed.device)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        n = (r1 - r0) * K
        _decode_into(buf[:n], r0 * K, flat, scales, pairs, blocksize)
        if buf32 is not buf:
            buf32[:n].copy_(buf[:n])
        yield r0, r1, buf32[:n].view(r1 - r0, K)


def _pick(path: str, M: int, state, dtype) -> str:
    if path != "auto":
        return path
    if M >= FULL_MIN_M:
        return "full"
    _, _, (N, K), blocksize, _, _ = state
    if M == 1 and N * K >= GEMV_MIN_NUMEL and K % blocksize == 0 and gemv_available():
        return "gemv"
    return "tiled"


def _base_fwd(x2d: Tensor, state, path: str) -> Tensor:
    """y [M, N] fp32 = x dequant(W)^T, W decoded to x's dtype first (the reference's maths)."""
    packed, absmax, (N, K), blocksize, nested, code4 = state
    M = x2d.shape[0]
    xf = x2d.float()
    if M == 0 or N == 0 or K == 0:
        return xf.new_zeros(M, N)
    scales, pairs = _block_scales(absmax, nested), _pairs(code4)
    path = _pick(path, M, state, x2d.dtype)
    if path == "gemv" and M == 1 and K % blocksize == 0:
        y = _gemv(x2d, packed, scales, pairs, (N, K), blocksize)
        if y is not None:
            return y
        path = "tiled"
    if path == "full" or path == "gemv":
        return F.linear(xf, _weight_fp32(state, x2d.dtype, scales, pairs))
    y = xf.new_empty(M, N)
    for r0, r1, tile in _tiles(state, x2d.dtype, scales, pairs):
        y[:, r0:r1] = F.linear(xf, tile)
    return y


def _finish(y: Tensor, out: Tensor | None, dtype: torch.dtype) -> Tensor:
    if out is None:
        return y.to(dtype)
    out.copy_(y)
    return out


def nf4_linear_fwd(x2d, packed, absmax, shape, blocksize, nested, bias, lora_A, lora_B, scaling,
                   code4, out=None, *, rank_scale=None, col_scale=None, path: str = "auto"):
    """y = x dequant(Wq)^T + b + s (x A^T) B^T (the LoRA term only with A and B), on the CPU.

    x2d: [M, K] fp32|fp16|bf16 any strides; NF4 state as in `nf4_dequantize` with shape (N, K);
    bias: [N] x2d.dtype or None; lora_A: [r, K], lora_B: [N, r] x2d.dtype, or both None;
    scaling: float; out: [M, N] x2d.dtype any strides, or None -> out ([M, N] x2d.dtype).
    rank_scale: [r] or None (AdaLoRA's E); col_scale: [N] or None (DoRA's factor):
    ``y = f * (x W^T + s ((x A^T) diag(e)) B^T) + b``. The epilogue is `reference.lora_fwd`'s, in
    its order. `path`: "auto" (see the module docstring), or force "gemv" (M = 1 only, else
    tiled), "tiled" or "full" (bit-identical to the reference).
    """
    N, K = shape if isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2 else (0, 0)
    state = (packed, absmax, shape, blocksize, nested, code4)
    _check_call(x2d, "x2d", K, state, lora_A, lora_B, N, K, bias, rank_scale, col_scale, out, path)
    state = (packed, absmax, tuple(shape), blocksize, nested, code4)
    y = _base_fwd(x2d, state, path)
    if lora_A is not None:
        xa = F.linear(x2d.float(), lora_A.float())
        if rank_scale is not None:
            xa = xa * rank_scale.float()
        y.add_(F.linear(xa, lora_B.float()), alpha=float(scaling))
    if col_scale is not None:
        y.mul_(col_scale.float())
    if bias is not None:
        y.add_(bias.float())
    return _finish(y, out, x2d.dtype)


def nf4_linear_bwd_dx(dy2d, packed, absmax, shape, blocksize, nested, lora_A, lora_B, scaling,
                      code4, out=None, *, rank_scale=None, path: str = "auto"):
    """dX = dY dequant(Wq) + s ((dY B) diag(e)) A, the input gradient of `nf4_linear_fwd`.

    dy2d: [M, N] any strides; the rest as in `nf4_linear_fwd` -> out, [M, K] dy2d.dtype (DoRA's
    column scale: the caller scales dY). "full" (M >= FULL_MIN_M) is bit-identical to the
    reference; below, the weight is decoded in row tiles and dX accumulated over them.
    """
    N, K = shape if isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2 else (0, 0)
    state = (packed, absmax, shape, blocksize, nested, code4)
    _check_call(dy2d, "dy2d", N, state, lora_A, lora_B, N, K, rank_scale=rank_scale, out=out, path=path)
    state = (packed, absmax, tuple(shape), blocksize, nested, code4)
    M, dyf = dy2d.shape[0], dy2d.float()
    scales, pairs = _block_scales(absmax, nested), _pairs(code4)
    if M == 0 or N == 0 or K == 0:
        dx = dyf.new_zeros(M, K)
    elif path == "full" or (path == "auto" and M >= FULL_MIN_M):
        dx = dyf @ _weight_fp32(state, dy2d.dtype, scales, pairs)
    else:
        dx = dyf.new_zeros(M, K)
        for r0, r1, tile in _tiles(state, dy2d.dtype, scales, pairs):
            dx.addmm_(dyf[:, r0:r1], tile)
    if lora_A is not None:
        dyb = dyf @ lora_B.float()
        if rank_scale is not None:
            dyb = dyb * rank_scale.float()
        dx.add_(dyb @ lora_A.float(), alpha=float(scaling))
    return _finish(dx, out, dy2d.dtype)
