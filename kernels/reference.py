"""PyTorch references of every kernel in `fastpeft.kernels`.

Two jobs: the oracle that kernel tests compare against, and the CPU (``backend="torch"``) path of
`fastpeft.ops`. Each function mirrors a launcher's signature (minus ``out=``), computes in fp32
(fp64 inputs in fp64: a float64 model runs on this path only)
and returns the input dtype, so a kernel and its reference differ only by rounding order.
Future kernels add their references here, next to their siblings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lora_fwd", "lora_bwd_dx"]


def _acc(t: Tensor) -> Tensor:
    """`t` in the accumulation dtype: fp32, or fp64 for fp64 tensors (fp64 models run here only)."""
    return t if t.dtype == torch.float64 else t.float()


def lora_fwd(x2d: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
             scaling: float, *, rank_scale: Tensor | None = None,
             col_scale: Tensor | None = None) -> Tensor:
    """y = x W^T + b + s (x A^T) B^T, the forward of a LoRA linear.

    x2d: [M, K] fp32|fp16|bf16 any strides; weight: [N, K] any strides (e.g. ``Conv1D.weight.T``);
    bias: [N] or None; lora_A: [r, K]; lora_B: [N, r]; scaling: python float
    -> [M, N] x2d.dtype, contiguous.
    rank_scale: [r] or None (AdaLoRA's E): ``s ((x A^T) diag(e)) B^T``; col_scale: [N] or None
    (DoRA's ``m / ||W + s B A||``): ``y = f * (x W^T + s (x A^T) B^T) + b``.
    """
    xf = _acc(x2d)
    xa = F.linear(xf, _acc(lora_A))
    if rank_scale is not None:
        xa = xa * _acc(rank_scale)
    y = F.linear(xf, _acc(weight))
    y.add_(F.linear(xa, _acc(lora_B)), alpha=scaling)
    if col_scale is not None:
        y.mul_(_acc(col_scale))
    if bias is not None:
        y.add_(_acc(bias))
    return y.to(x2d.dtype)


def lora_bwd_dx(dy2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                scaling: float, *, rank_scale: Tensor | None = None) -> Tensor:
    """dX = dY W + s (dY B) A, the input gradient of `lora_fwd`.

    dy2d: [M, N] fp32|fp16|bf16 any strides; weight: [N, K] any strides; lora_A: [r, K];
    lora_B: [N, r]; scaling: python float -> [M, K] dy2d.dtype, contiguous.
    rank_scale: [r] or None: ``dX = dY W + s ((dY B) diag(e)) A``.
    """
    dyf = _acc(dy2d)
    dx = dyf @ _acc(weight)
    dyb = dyf @ _acc(lora_B)
    if rank_scale is not None:
        dyb = dyb * _acc(rank_scale)
    dx.add_(dyb @ _acc(lora_A), alpha=scaling)
    return dx.to(dy2d.dtype)


__all__ += ["scaled_linear_fwd"]


def scaled_linear_fwd(x2d: Tensor, weight: Tensor, bias: Tensor | None, *,
                      in_scale: Tensor | None = None, col_scale: Tensor | None = None) -> Tensor:
    """y = f * ((x * g) W^T) + b, IA3's scaled linear (kernels/lora.py with HAS_LORA off).

    x2d: [M, K]; weight: [N, K] any strides; bias: [N] or None; in_scale g: [K] or None, the
    product ``x * g`` rounded to x's dtype before the GEMM (as the kernel and PEFT do); col_scale
    f: [N] or None -> [M, N] x2d.dtype, contiguous.
    """
    xf = _acc(x2d)
    if in_scale is not None:
        xf = _acc((xf * _acc(in_scale)).to(x2d.dtype))
    y = F.linear(xf, _acc(weight))
    if col_scale is not None:
        y.mul_(_acc(col_scale))
    if bias is not None:
        y.add_(_acc(bias))
    return y.to(x2d.dtype)


# -- bottleneck adapter (kernels/adapter.py) -------------------------------------------------------
__all__ += ["adapter_activation", "adapter_fwd"]


def adapter_activation(z: Tensor, activation: str) -> Tensor:
    """The bottleneck non-linearity by name (gelu: the exact, erf form); differentiable."""
    if activation == "relu":
        return torch.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "silu":
        return F.silu(z)
    if activation == "tanh":
        return torch.tanh(z)
    raise ValueError(f"unknown adapter activation {activation!r}")


def adapter_fwd(x2d: Tensor, down_w: Tensor, down_b: Tensor | None, up_w: Tensor, up_b: Tensor | None,
                scaling: float, activation: str, residual: Tensor | None = None) -> Tensor:
    """out = res + s * (act(x Wd^T + bd) Wu^T + bu), res = x when `residual` is None.

    x2d: [M, H]; down_w: [b, H]; down_b: [b] or None; up_w: [H, b]; up_b: [H] or None; residual:
    [M, H] or None -> [M, H] x2d.dtype, contiguous (fp32 maths, like the kernel's accumulator).
    """
    xf = _acc(x2d)
    a = adapter_activation(F.linear(xf, _acc(down_w), None if down_b is None else _acc(down_b)), activation)
    up = F.linear(a, _acc(up_w), None if up_b is None else _acc(up_b))
    res = xf if residual is None else _acc(residual)
    return (res + scaling * up).to(x2d.dtype)


# -- NF4 (bitsandbytes' 4-bit NormalFloat, QLoRA) ------------------------------------------------
# The format is bitsandbytes': 16 code values (index 7 is 0.0), fp32 absmax per block of
# `blocksize` over the flattened row-major [N, K] weight (a tail block is allowed, and a block may
# straddle rows), two codes per byte with the EVEN element in the HIGH nibble, storage
# uint8 [(N*K+1)//2, 1]. Double quantization stores `absmax - offset` (offset = absmax.mean()) as
# 8-bit codes of bnb's signed dynamic map in blocks of 256, with an fp32 absmax per such block.
# The quantizers reproduce bitsandbytes 0.50's CPU backend bit for bit (tests/quant/test_nf4.py):
# 4-bit codes are nearest-by-midpoint (ties to the lower code; full blocks scale by the reciprocal
# of absmax, the tail block divides); the 8-bit path is bnb's 65536-bin lookup table.

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_LUT_BINS = 65536

__all__ += ["nf4_code", "dynamic_map", "nf4_quantize", "nf4_double_quantize", "nf4_absmax",
            "nf4_dequantize", "nf4_linear_fwd", "nf4_linear_bwd_dx"]


def nf4_code(device=None) -> Tensor:
    """The 16 NF4 values, fp32 [16], sorted (index 7 is 0.0)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map(device=None) -> Tensor:
    """bnb's signed 8-bit dynamic map (fp32 [256], sorted): for each exponent e in 0..6, the
    2**e midpoints of a linspace(0.1, 1, 2**e + 1) scaled by 10**(e-6), both signs, plus 0 and 1."""
    values = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (e - 6)) * mids).tolist() + (-(10 ** (e - 6)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _blocks(flat: Tensor, blocksize: int) -> Tensor:
    """flat fp32 [n] -> [ceil(n / blocksize), blocksize], the tail zero-padded (zeros never change
    an absmax)."""
    nblocks = -(-flat.numel() // blocksize)
    return F.pad(flat, (0, nblocks * blocksize - flat.numel())).view(nblocks, blocksize)


def nf4_quantize(weight: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """NF4-quantize a weight as bitsandbytes' `quantize_4bit(quant_type="nf4")` does.

    weight: [N, K] fp32|fp16|bf16 (any strides); blocksize: one of NF4_BLOCKSIZES
    -> (packed uint8 [(N*K+1)//2, 1], absmax fp32 [ceil(N*K / blocksize)]).
    """
    flat = weight.reshape(-1).float()
    n = flat.numel()
    blocks = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(1)
    safe = absmax.clamp(min=1e-38)[:, None]
    full = n // blocksize
    scaled = torch.empty_like(blocks)
    scaled[:full] = blocks[:full] * (1.0 / safe[:full])
    scaled[full:] = blocks[full:] / safe[full:]
    scaled = scaled.clamp(-1, 1).reshape(-1)[:n]
    code = nf4_code(flat.device)
    idx = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    if n % 2:  # bnb pads the scaled values with 0.0, which is code 7
        idx = torch.cat([idx, idx.new_full((1,), 7)])
    return ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1), absmax


def _quantize_8bit(a: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """bnb's CPU blockwise 8-bit quantizer: each value times 1/absmax, clamped to [-1, 1], picks
    one of 65536 bins, and a table built from the code's fp32 midpoints maps bins to codes
    (nearest up to the bin width, so not always the nearest code). All-zero blocks get code 0."""
    n = a.numel()
    blocks = _blocks(a.reshape(-1).float(), blocksize)
    absmax = blocks.abs().amax(1)
    mids = 0.5 * (code[:-1] + code[1:])
    bins = torch.arange(_LUT_BINS, dtype=torch.float32, device=a.device)
    lut = torch.searchsorted(mids, -1.0 + (2.0 * bins) / (_LUT_BINS - 1), side="left")
    v = (blocks * (1.0 / absmax)[:, None]).clamp(-1, 1)
    t = (((v + 1.0) * 0.5) * (_LUT_BINS - 1)) + 0.5
    t = torch.where((absmax == 0)[:, None], 0.0, t)  # 0 * (1/0) is NaN: bnb writes code 0
    q = lut[t.to(torch.int64).reshape(-1)[:n]].to(torch.uint8)
    q = torch.where(torch.repeat_interleave(absmax == 0, blocksize)[:n], 0, q).to(torch.uint8)
    return q, absmax


def nf4_double_quantize(absmax: Tensor, code8: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantization of the NF4 block scales, as `quantize_4bit(compress_statistics=True)`.

    absmax: fp32 [B]; code8: fp32 [256] (`dynamic_map()`) -> (qabsmax uint8 [B],
    nested_absmax fp32 [ceil(B / 256)], offset fp32 0-d = absmax.mean()).
    """
    offset = absmax.mean()
    qabsmax, nested_absmax = _quantize_8bit(absmax - offset, code8, NESTED_BLOCKSIZE)
    return qabsmax, nested_absmax, offset


def nf4_absmax(absmax: Tensor, nested: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
    """The fp32 block scales: `absmax` itself, or with `nested = (code8 [256] fp32,
    nested_absmax fp32, offset fp32 0-d)` the 8-bit `absmax` decoded as bnb does:
    ``code8[q] * nested_absmax[i // 256] + offset`` (fp32 multiply, then fp32 add)."""
    if nested is None:
        return absmax.float()
    code8, nested_absmax, offset = nested
    scale = torch.repeat_interleave(nested_absmax.float(), NESTED_BLOCKSIZE)[: absmax.numel()]
    return code8[absmax.reshape(-1).long()] * scale + offset.float()


def nf4_dequantize(packed: Tensor, absmax: Tensor, shape: tuple[int, int], blocksize: int,
                   dtype: torch.dtype, nested: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """The weight bnb's `dequantize_4bit` returns: ``code[q] * absmax[block]`` in fp32, cast once.

    packed: uint8 [(N*K+1)//2, 1] (or flat); absmax: fp32 [B], or uint8 [B] with `nested`;
    shape: (N, K); dtype: the output dtype -> [N, K] dtype, contiguous.
    """
    n = shape[0] * shape[1]
    flat = packed.reshape(-1)
    idx = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()
    scale = torch.repeat_interleave(nf4_absmax(absmax, nested), blocksize)[:n]
    return (nf4_code(flat.device)[idx] * scale).to(dtype).reshape(shape)


def nf4_linear_fwd(x2d: Tensor, packed: Tensor, absmax: Tensor, shape: tuple[int, int],
                   blocksize: int, nested, bias: Tensor | None, lora_A: Tensor | None,
                   lora_B: Tensor | None, scaling: float, *, rank_scale: Tensor | None = None,
                   col_scale: Tensor | None = None) -> Tensor:
    """y = x dequant(Wq)^T + b + s (x A^T) B^T with the weight dequantized to x's dtype first
    (what bnb's matmul feeds its GEMM). x2d: [M, K]; shape = (N, K); bias [N] or None; lora_A
    [r, K] and lora_B [N, r], or both None for the bare NF4 layer -> [M, N] x2d.dtype.
    rank_scale [r] (with LoRA) and col_scale [N]: as in `lora_fwd`."""
    weight = nf4_dequantize(packed, absmax, shape, blocksize, x2d.dtype, nested)
    if lora_A is None:
        return scaled_linear_fwd(x2d, weight, bias, col_scale=col_scale)
    return lora_fwd(x2d, weight, bias, lora_A, lora_B, scaling, rank_scale=rank_scale,
                    col_scale=col_scale)


def nf4_linear_bwd_dx(dy2d: Tensor, packed: Tensor, absmax: Tensor, shape: tuple[int, int],
                      blocksize: int, nested, lora_A: Tensor | None, lora_B: Tensor | None,
                      scaling: float, *, rank_scale: Tensor | None = None) -> Tensor:
    """dX = dY dequant(Wq) + s ((dY B) diag(e)) A, the input gradient of `nf4_linear_fwd` -> [M, K]
    (DoRA's column scale: the caller scales dY)."""
    weight = nf4_dequantize(packed, absmax, shape, blocksize, dy2d.dtype, nested)
    if lora_A is None:
        return (dy2d.float() @ weight.float()).to(dy2d.dtype)
    return lora_bwd_dx(dy2d, weight, lora_A, lora_B, scaling, rank_scale=rank_scale)


# -- multi-adapter LoRA (mixed-adapter batches, kernels/multi_lora.py) ---------------------------
# A bank holds every adapter's A rows in lora_a [R_total, K] and B^T rows in lora_b [R_total, N],
# adapter i at rows offsets[i] : offsets[i] + ranks[i], scale scalings[i]; id -1 (or rank 0) is
# the base alone. These references are also the CPU path, so they are batched: the adapters'
# factors are gathered into [groups, max_rank, *] stacks and applied with two bmm's, never a
# Python loop per adapter. Gathered rows past an adapter's rank (and every row gathered for the
# base, id -1) are bank rows of OTHER adapters: they are selected away (zeroed with a mask) in the
# gathered stacks, never multiplied by a zero coefficient, since 0 * NaN = NaN would let a NaN or
# inf in one adapter change the rows of every other adapter and of the base. A row's output is
# computed from its own adapter only, bit for bit the same whatever the bank's other rows hold.
__all__ += ["multi_lora_tables", "multi_lora_segment_slots", "multi_lora_grouped_fwd", "multi_lora_gathered_fwd"]


def multi_lora_tables(offsets: Tensor, ranks: Tensor, scalings: Tensor,
                      max_rank: int) -> tuple[Tensor, Tensor]:
    """What the references gather per segment or token, per adapter id shifted by one (row 0 is
    id -1, the base): the bank rows of its rank slots, long [I + 1, max_rank] (0 past the rank),
    their coefficients, fp32 [I + 1, max_rank] (the scale up to the rank, 0 past it), and which
    slots are real, bool [I + 1, max_rank]. A function of the bank alone, so fastpeft.ops
    computes it once per bank change, not per call."""
    r = torch.arange(max_rank, device=offsets.device)
    valid = r < ranks.long()[:, None]
    rows = torch.where(valid, offsets.long()[:, None] + r, 0)
    coef = torch.where(valid, scalings.float()[:, None], 0.0)
    return F.pad(rows, (0, 0, 1, 0)), F.pad(coef, (0, 0, 1, 0)), F.pad(valid, (0, 0, 1, 0))


def _bank_factors(lora_a: Tensor, lora_b: Tensor, slot: Tensor,
                  tables: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """For the table slots `slot` [G] (adapter id + 1, long; 0: none): fp32 A stacks
    [G, max_rank, K] and B^T stacks [G, max_rank, N] (rows past each rank are zeros, selected,
    whatever the bank holds there) and the scales [G, max_rank], gathered through
    `multi_lora_tables`."""
    rows = tables[0].index_select(0, slot)
    G, R = rows.shape
    rows = rows.view(-1)
    real = tables[2].index_select(0, slot)[:, :, None]  # [G, R, 1]
    a = torch.where(real, lora_a.index_select(0, rows).view(G, R, -1).float(), 0.0)
    b = torch.where(real, lora_b.index_select(0, rows).view(G, R, -1).float(), 0.0)
    return a, b, tables[1].index_select(0, slot)


def multi_lora_segment_slots(perm: Tensor, seg_start: Tensor, num_segments: int,
                             max_segment: int) -> tuple[Tensor, Tensor]:
    """Where the grouped reference's padded segment stacks ([S * max_segment] slots) meet the
    tokens, long: the token each slot reads from x (a padding slot reads a real token: finite,
    unused) and, per token, the slot its LoRA term is read back from. A function of the batch
    alone, so fastpeft.ops computes it once per forward, not per layer. Needs S, max_segment > 0."""
    M = perm.shape[0]
    pos = seg_start[:num_segments].long()[:, None] + torch.arange(max_segment, device=perm.device)
    read = perm.long().index_select(0, pos.clamp(max=M - 1).flatten())
    real = (pos < seg_start[1 : num_segments + 1].long()[:, None]).flatten()
    slot_of = torch.empty(M, dtype=torch.long, device=perm.device)
    slot_of[read[real]] = torch.arange(read.numel(), device=perm.device)[real]
    return read, slot_of


def multi_lora_grouped_fwd(x2d: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor,
                           lora_b: Tensor, offsets: Tensor, ranks: Tensor, scalings: Tensor,
                           max_rank: int, perm: Tensor, seg_start: Tensor, seg_adapter: Tensor,
                           num_segments: int, max_segment: int, tables: tuple[Tensor, Tensor, Tensor] | None = None,
                           slots: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """y = x W^T + b + per-segment LoRA, tokens grouped by adapter (the SGMV kernel's reference).

    Shapes as in `fastpeft.kernels.multi_lora.multi_lora_grouped_fwd`; perm must hold every token
    once. Each segment's tokens are gathered into a [S, max_segment, K] stack, multiplied by the
    segment's adapter stacks with two bmm's, the terms gathered back into token order, and the
    base GEMM accumulates onto them (addmm) -> [M, N] x2d.dtype. Padding slots of short segments
    are computed, never read back. `tables` (`multi_lora_tables` of this bank) and `slots`
    (`multi_lora_segment_slots` of this batch) are computed here when None: the kernel's
    arguments carry no such things; the CPU path passes cached copies. No host sync.
    """
    M = x2d.shape[0]
    xf, wf = x2d.float(), weight.float()
    if num_segments == 0 or M == 0 or max_segment == 0 or lora_a.shape[0] == 0:  # an empty bank: base only
        return F.linear(xf, wf, None if bias is None else bias.float()).to(x2d.dtype)
    S = num_segments
    if slots is None:
        slots = multi_lora_segment_slots(perm, seg_start, S, max_segment)
    if tables is None:
        tables = multi_lora_tables(offsets, ranks, scalings, max_rank)
    xs = xf.index_select(0, slots[0]).view(S, max_segment, -1)     # [S, L, K] (CPU's fast gather)
    a, b, coef = _bank_factors(lora_a, lora_b, seg_adapter[:S].long() + 1, tables)
    xa = torch.bmm(xs, a.transpose(1, 2)).mul_(coef[:, None, :])    # [S, L, R]
    y = torch.bmm(xa, b).flatten(0, 1).index_select(0, slots[1])    # [M, N]: each token's term
    if bias is not None:
        y += bias.float()
    return y.addmm_(xf, wf.t()).to(x2d.dtype)


def multi_lora_gathered_fwd(x2d: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor,
                            lora_b: Tensor, offsets: Tensor, ranks: Tensor, scalings: Tensor,
                            max_rank: int, token_ids: Tensor,
                            tables: tuple[Tensor, Tensor, Tensor] | None = None,
                            table_slots: Tensor | None = None) -> Tensor:
    """y = x W^T + b + each token's own LoRA term (the BGMV kernel's reference): the factors of
    every token's adapter are gathered into [M, max_rank, *] stacks, then two bmm's -> [M, N].
    The CPU path also passes x as [G, T, K] with one id per row of T tokens (token_ids [G]): the
    factors are then gathered once per row, the rows' tokens multiplied in place -> [G, T, N].
    `tables` as in `multi_lora_grouped_fwd`; `table_slots`: token_ids + 1 as long (the CPU path
    caches it per batch), computed here when None."""
    xf = x2d.float()
    y = F.linear(xf, weight.float(), None if bias is None else bias.float())
    if x2d.shape[0] == 0 or lora_a.shape[0] == 0:  # an empty bank: base only
        return y.to(x2d.dtype)
    if tables is None:
        tables = multi_lora_tables(offsets, ranks, scalings, max_rank)
    a, b, coef = _bank_factors(lora_a, lora_b, token_ids.long() + 1 if table_slots is None else table_slots,
                               tables)
    rows = (lambda t: t) if x2d.dim() == 3 else (lambda t: t[:, None, :])  # as [G, T, *]
    xa = torch.bmm(rows(xf), a.transpose(1, 2)).mul_(coef[:, None, :])     # [G, T, R]
    rows(y).baddbmm_(xa, b)
    return y.to(x2d.dtype)


# -- optimizers: 8-bit blockwise AdamW (kernels/optim.py, fastpeft.optim) ---------------------------
# Both Adam moments are stored as uint8 indices into bitsandbytes' dynamic maps (Dettmers et al.,
# "8-bit Optimizers via Block-wise Quantization"): the first moment into the signed map
# (`dynamic_map()` above), the second into the unsigned one, with an fp32 absmax per block of
# `block_size` elements over the flattened tensor (the tail block may be short). A state value is
# ``code[q] * absmax[block]``, so a new state is all zeros (absmax 0 decodes any code to 0). One step
# decodes both moments, applies AdamW in fp32 (decoupled weight decay first, as torch.optim.AdamW
# and bnb's CPU backend do, then the bias-corrected update), takes each block's new absmax from the
# updated moments and re-encodes them to the NEAREST code (ties to the lower one), as bnb's CUDA
# kernel does (its CPU backend uses a coarser 65536-bin table). The hyperparameters enter as fp32
# scalars computed once on the host (`adamw8bit_scalars`) and the arithmetic runs in the kernel's
# order, so kernel and reference differ only where a GPU fuses a multiply-add.

__all__ += ["dynamic_map_unsigned", "adamw8bit_maps", "adamw8bit_scalars", "adamw8bit_quantize",
            "adamw8bit_update"]


def dynamic_map_unsigned(device=None) -> Tensor:
    """bnb's unsigned 8-bit dynamic map (fp32 [256], sorted), ``create_dynamic_map(signed=False)``:
    for each exponent e in 0..6, the 2**(e+1) midpoints of a linspace(0.1, 1, 2**(e+1) + 1) scaled
    by 10**(e-6), plus 0 and 1."""
    values = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (e + 1) + 1, dtype=torch.float32)
        values += ((10 ** (e - 6)) * ((edges[:-1] + edges[1:]) / 2.0)).tolist()
    return torch.tensor(sorted(values + [0.0, 1.0]), dtype=torch.float32, device=device)


def adamw8bit_maps(device=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The two maps and their midpoints, as the update takes them: (signed code fp32 [256], its
    midpoints fp32 [255], unsigned code fp32 [256], its midpoints fp32 [255])."""
    signed, unsigned = dynamic_map(device), dynamic_map_unsigned(device)
    return signed, (signed[:-1] + signed[1:]) * 0.5, unsigned, (unsigned[:-1] + unsigned[1:]) * 0.5


def adamw8bit_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                      step: int) -> list[float]:
    """The fp32 scalars of step `step` (1-based), as Python floats: [beta1, beta2, eps,
    decay = 1 - lr * weight_decay, step_size = lr / (1 - beta1**step),
    bc2_sqrt = sqrt(1 - beta2**step)]."""
    values = [beta1, beta2, eps, 1.0 - lr * weight_decay, lr / (1.0 - beta1 ** step),
              (1.0 - beta2 ** step) ** 0.5]
    return torch.tensor(values, dtype=torch.float32).tolist()


def adamw8bit_quantize(x: Tensor, mids: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit encoding of a moment: x fp32 [n]; mids: the map's midpoints fp32 [255]
    -> (codes uint8 [n], absmax fp32 [ceil(n / block_size)]). Each value is divided by its block's
    absmax and takes the nearest code; an all-zero block gets absmax 0 and the code nearest 0."""
    absmax = _blocks(x.abs(), block_size).amax(1)
    scale = torch.repeat_interleave(torch.where(absmax > 0, absmax, 1.0), block_size)[: x.numel()]
    return torch.bucketize(x / scale, mids).to(torch.uint8), absmax


def adamw8bit_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_absmax: Tensor,
                     exp_avg_sq: Tensor, exp_avg_sq_absmax: Tensor,
                     maps: tuple[Tensor, Tensor, Tensor, Tensor], *, lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, step: int, block_size: int) -> None:
    """One AdamW step with 8-bit blockwise states, all in place.

    param: [n] fp32|fp16|bf16 contiguous; grad: [n] param.dtype; exp_avg, exp_avg_sq: uint8 [n]
    (signed and unsigned map codes); exp_avg_absmax, exp_avg_sq_absmax: fp32 [ceil(n / block_size)];
    maps: `adamw8bit_maps()`; step: the 1-based step number this update makes.
    """
    b1, b2, eps32, decay, step_size, bc2_sqrt = adamw8bit_scalars(lr, beta1, beta2, eps, weight_decay, step)
    code1, mids1, code2, mids2 = maps
    n = param.numel()
    m = code1[exp_avg.long()] * torch.repeat_interleave(exp_avg_absmax, block_size)[:n]
    v = code2[exp_avg_sq.long()] * torch.repeat_interleave(exp_avg_sq_absmax, block_size)[:n]
    g = grad.float()
    m = m * b1 + (1.0 - b1) * g
    v = v * b2 + (1.0 - b2) * g * g
    denom = v.sqrt() / bc2_sqrt + eps32
    param.copy_(param.float() * decay - step_size * (m / denom))
    for codes, absmax, x, mids in ((exp_avg, exp_avg_absmax, m, mids1), (exp_avg_sq, exp_avg_sq_absmax, v, mids2)):
        q, new_absmax = adamw8bit_quantize(x, mids, block_size)
        codes.copy_(q)
        absmax.copy_(new_absmax)
