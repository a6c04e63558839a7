"""The shapes `fastpeft check-kernels` drives through the public `fastpeft.ops` calls.

Each scenario is one call (or one forward + backward) on a realistic layer: Llama-3-8B-like
4096->4096 and 4096->14336, M = 1, 4, 16 tokens (decode) and 2048 (prefill), LoRA ranks 8 to 64,
fp16 / bf16 / fp32. Nothing runs: the capture (capture.py) records each Triton launch and skips
it, so the tensors are left uninitialized and only shapes, dtypes, strides and alignment matter.

Levels (what `scenarios(level)` yields):
  quick    every kernel family once on the shapes the pass criteria look at (bf16, M = 1 and
           2048 on 4096x4096, rank 16), plus the fp32 path of the LoRA kernel, each autotuned
           launch with its heaviest config only (largest tiles x stages): the CI smoke set;
  default  every family over every M, both shapes, ranks 8 / 16 / 32 / 64 and every dtype, as a
           covering design (each axis value meets each family, the other axes at their base
           value). Every autotune config at the base points of each kernel's primary family (bf16 at
           M = 1 and 2048, fp32 at 2048; 4096x4096, rank 16); the heaviest config elsewhere;
  full     the whole cross product (dtype x M x rank x shape), every config, for every family.
A scenario's tags (family, M, K, N, dtype, rank) say which criteria apply to its launches.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Scenario", "scenarios", "LEVELS"]

LEVELS = ("quick", "default", "full")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
_DT = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}
SHAPES = ((4096, 4096), (4096, 14336))  # (K in, N out)
DECODE_M, PREFILL_M = (1, 4, 16), 2048
RANKS = (8, 16, 32, 64)


@dataclass
class Scenario:
    """One driven call: `run()` makes the launches; the tags describe them."""

    label: str
    run: Callable[[], object]
    family: str
    M: int = 0
    K: int = 0
    N: int = 0
    dtype: str = "bf16"
    rank: int = 0
    nf4: bool = False
    tags: dict = field(default_factory=dict)
    all_configs: bool = True  # every autotune config the launcher keeps, or only the heaviest

    def meta(self) -> dict:
        return {"label": self.label, "family": self.family, "M": self.M, "K": self.K, "N": self.N,
                "dtype": self.dtype, "rank": self.rank, "nf4": self.nf4, "all_configs": self.all_configs, **self.tags}


def _e(*shape, dtype=BF16, grad=False):
    t = torch.empty(*shape, dtype=dtype)
    return t.requires_grad_(True) if grad else t


def _lora(M, K, N, r, dt, *, rank_scale=False, col_scale=False, backward=False):
    def run():
        from fastpeft import ops

        x = _e(M, K, dtype=dt, grad=backward)
        A, B = _e(r, K, dtype=dt), _e(N, r, dtype=dt)
        e = _e(r, dtype=dt) if rank_scale else None
        f = _e(N, dtype=dt) if col_scale else None
        with torch.set_grad_enabled(backward):
            y = ops.lora_linear(x, _e(N, K, dtype=dt), None, A, B, 2.0, rank_scale=e, col_scale=f)
            if backward:
                y.backward(torch.empty_like(y))
    return run


def _ia3(M, K, N, dt, feedforward=True):
    def run():
        from fastpeft import ops

        with torch.no_grad():
            ops.ia3_linear(_e(M, K, dtype=dt), _e(N, K, dtype=dt), None, _e(K if feedforward else N, dtype=dt),
                           feedforward)
    return run


def nf4_weight(K, N, dt, nested=True, blocksize=64):
    """An NF4 weight of shape (N, K) built by the public Linear4bit (zeros: nothing quantized)."""
    from fastpeft.quant.nf4 import Linear4bit

    return Linear4bit(K, N, bias=False, blocksize=blocksize, double_quant=nested, compute_dtype=dt).nf4_weight()


def _nf4(M, K, N, r, dt, *, nested=True, backward=False):
    def run():
        from fastpeft import ops

        q = nf4_weight(K, N, dt, nested)
        x = _e(M, K, dtype=dt, grad=backward)
        A, B = (_e(r, K, dtype=dt), _e(N, r, dtype=dt)) if r else (None, None)
        with torch.set_grad_enabled(backward):
            y = ops.nf4_linear(x, q, None, A, B, 2.0)
            if backward:
                y.backward(torch.empty_like(y))
    return run


def _nf4_dequant(K, N, dt, nested):
    def run():
        from fastpeft import ops

        ops.nf4_dequantize(nf4_weight(K, N, BF16, nested), dt)
    return run


def _adapter_bank(K, N, dt):
    try:  # the model-level bank (fastpeft.multi); a later layout may re-export it elsewhere
        from fastpeft.multi import AdapterBank
    except ImportError:  # pragma: no cover - layout drift
        from fastpeft.batching import AdapterBank
    return AdapterBank(K, N, dt, "cpu")


def _multi(rows, K, N, ranks, dt, *, path, nf4=False):
    def run():
        from fastpeft import ops

        bank = _adapter_bank(K, N, dt)
        for i, r in enumerate(ranks):
            bank.add(i, torch.zeros(r, K, dtype=dt), torch.zeros(N, r, dtype=dt), 2.0)
        ids = torch.tensor([(i % (len(ranks) + 1)) - 1 for i in range(rows)], dtype=torch.int32)
        w = nf4_weight(K, N, dt) if nf4 else _e(N, K, dtype=dt)
        with torch.no_grad():
            ops.multi_lora_linear(_e(rows, K, dtype=dt), w, None, bank, ids, path=path)
    return run


def _adapter(M, H, b, dt, act="gelu"):
    def run():
        from fastpeft import ops

        with torch.no_grad():
            ops.bottleneck_adapter(_e(M, H, dtype=dt), _e(b, H, dtype=dt), _e(b, dtype=dt), _e(H, b, dtype=dt),
                                   _e(H, dtype=dt), 1.0, act)
    return run


def _optim(n, dt):
    def run():
        from fastpeft.optim import AdamW8bit

        p = torch.nn.Parameter(torch.zeros(n, dtype=dt))
        p.grad = torch.zeros(n, dtype=dt)
        AdamW8bit([p], lr=1e-3).step()
    return run


# family -> (builder(M, K, N, r, dt) -> callable, nf4?, uses a rank?, decode Ms it runs at)
_MULTI_RANKS = {8: (8, 8, 8), 16: (8, 16, 16), 32: (8, 16, 32), 64: (8, 16, 64)}
FAMILIES = {
    "lora_fwd": (lambda M, K, N, r, dt: _lora(M, K, N, r, dt), False, True),
    "lora_dx": (lambda M, K, N, r, dt: _lora(M, K, N, r, dt, backward=True), False, True),
    "adalora_fwd": (lambda M, K, N, r, dt: _lora(M, K, N, r, dt, rank_scale=True), False, True),
    "dora_fwd": (lambda M, K, N, r, dt: _lora(M, K, N, r, dt, col_scale=True), False, True),
    "ia3_fwd": (lambda M, K, N, r, dt: _ia3(M, K, N, dt), False, False),
    "adapter_fwd": (lambda M, K, N, r, dt: _adapter(M, K, 64, dt), False, False),
    "nf4_fwd": (lambda M, K, N, r, dt: _nf4(M, K, N, r, dt), True, True),
    "nf4_dx": (lambda M, K, N, r, dt: _nf4(M, K, N, r, dt, backward=True), True, True),
    "multi_grouped": (lambda M, K, N, r, dt: _multi(M, K, N, _MULTI_RANKS[r], dt, path="grouped"), False, True),
    "multi_gathered": (lambda M, K, N, r, dt: _multi(M, K, N, _MULTI_RANKS[r], dt, path="gathered"), False, True),
    "multi_grouped_nf4": (lambda M, K, N, r, dt: _multi(M, K, N, _MULTI_RANKS[r], dt, path="grouped", nf4=True),
                          True, True),
    "multi_gathered_nf4": (lambda M, K, N, r, dt: _multi(M, K, N, _MULTI_RANKS[r], dt, path="gathered", nf4=True),
                           True, True),
}


# the same kernels as lora_fwd / nf4_fwd with one more constexpr switch: every config at the
# default level only in their primary family
VARIANTS = ("lora_dx", "adalora_fwd", "dora_fwd", "ia3_fwd", "nf4_dx")


def _points(level: str):
    """(family, M, K, N, r, dtype, every_config) points of the matrix for `level`."""
    dts, Ms = (BF16, FP16, FP32), (*DECODE_M, PREFILL_M)
    for fam, (_, _, ranked) in FAMILIES.items():
        ranks = RANKS if ranked else (16,)
        if level == "full":
            for dt, M, r, (K, N) in itertools.product(dts, Ms, ranks, SHAPES):
                yield fam, M, K, N, r, dt, True
            continue
        if level == "quick":
            for M in (1, PREFILL_M):
                yield fam, M, 4096, 4096, 16, BF16, False
            if fam == "lora_fwd":
                yield fam, PREFILL_M, 4096, 4096, 16, FP32, False
            continue
        base = set() if fam in VARIANTS else {(1, 4096, 4096, 16, BF16), (PREFILL_M, 4096, 4096, 16, BF16),
                                              (PREFILL_M, 4096, 4096, 16, FP32)}
        seen = set(base)
        for M, (K, N) in itertools.product(Ms, SHAPES):                     # every M, both shapes
            seen.add((M, K, N, 16, BF16))
        for dt, M in itertools.product(dts, Ms):                             # every dtype at every M
            seen.add((M, 4096, 4096, 16, dt))
        for r, M in itertools.product(ranks, (1, 4, PREFILL_M)):             # every rank
            seen.add((M, 4096, 4096, r, BF16))
        for M, K, N, r, dt in sorted(seen, key=lambda p: (p[0], p[1], p[2], p[3], str(p[4]))):
            yield fam, M, K, N, r, dt, (M, K, N, r, dt) in base


def scenarios(level: str = "default"):
    """Yield the `Scenario`s of `level` (see the module docstring)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    every = level != "quick"
    for fam, M, K, N, r, dt, all_configs in _points(level):
        build, nf4, ranked = FAMILIES[fam]
        rank_txt = f" r={r}" if ranked else ""
        yield Scenario(f"{fam} M={M} {K}->{N}{rank_txt} {_DT[dt]}", build(M, K, N, r, dt), fam, M, K, N, _DT[dt],
                       r if ranked else 0, nf4, all_configs=all_configs)
    # NF4 without double quant, and the bare 4-bit layer (no LoRA): other constexpr branches
    for M in ((1, PREFILL_M) if level != "quick" else (1,)):
        yield Scenario(f"nf4_fwd M={M} 4096->4096 r=16 bf16 no-dq", _nf4(M, 4096, 4096, 16, BF16, nested=False),
                       "nf4_fwd", M, 4096, 4096, "bf16", 16, True, {"nested": False}, all_configs=every)
        if level != "quick":
            yield Scenario(f"nf4_fwd M={M} 4096->4096 bare bf16", _nf4(M, 4096, 4096, 0, BF16), "nf4_fwd",
                           M, 4096, 4096, "bf16", 0, True, all_configs=every)
    dq_dts = (BF16,) if level == "quick" else (BF16, FP16, FP32)
    for dt, nested in itertools.product(dq_dts, (True, False)):
        yield Scenario(f"nf4_dequant 4096x4096 ->{_DT[dt]} {'dq' if nested else 'no-dq'}",
                       _nf4_dequant(4096, 4096, dt, nested), "nf4_dequant", 0, 4096, 4096, _DT[dt], 0, True,
                       {"nested": nested}, all_configs=every)
    for dt in ((BF16,) if level == "quick" else (BF16, FP16, FP32)):
        yield Scenario(f"optim adamw8bit n=4096x1024 {_DT[dt]}", _optim(4096 * 1024, dt), "optim_adamw8bit",
                       0, 0, 0, _DT[dt], all_configs=every)
