"""Launch configs as data, one table per GPU architecture (`sm_90a.py`, `sm_80.py`), as vLLM keeps
its tuned configs; launchers choose from the table of the arch they run on.

The arch is the device's (compute capability 9.x -> sm_90a, else sm_80), or `FASTPEFT_ARCH`
(`sm_90a` | `sm_80`) when set, so a static check sees exactly what each card would run. Without a
GPU and without the variable: sm_80, the smaller card, whose configs fit both.

Tiled GEMMs autotune over the table's candidates; `prune` is their `early_config_prune`: it
drops every config whose shared-memory or register estimate does not fit the arch, before any
is compiled or launched (`autotuned` builds one tuner per kernel and arch, lazily). Decode
kernels take a fixed config (`decode_split`) and a split-K count sized from the SM count.

Public for tools (`fastpeft check-kernels`): `ARCHS`, `arch()`, `table(arch)`,
`candidates(family, arch)`, `smem_estimate(...)`.
"""
from __future__ import annotations

import importlib
import os

import triton

ARCHS = ("sm_90a", "sm_80")
FAMILIES = ("LORA_FWD", "NF4_TILED")
MIN_DECODE_PROGRAMS = 264  # 2 x 132 SMs: a 4096x4096 layer at M = 1 fills an H100 twice
# 32-bit tile registers per thread an estimate may use (of 255; the rest is addresses, masks and
# the decode's temporaries): 16-bit operands feed tensor cores from compact fragments; fp32
# operands ("ieee" dots run on FMA) need their whole slices in registers, and configs over 64
# estimated words spilled in the static check (sm_80 and sm_90a).
_REG_BUDGET = {2: 160, 4: 64}


def arch() -> str:
    """The arch launchers choose configs for: FASTPEFT_ARCH, else the current device's."""
    env = os.environ.get("FASTPEFT_ARCH", "").strip()
    if env:
        if env not in ARCHS:
            raise ValueError(f"FASTPEFT_ARCH must be one of {ARCHS}, got {env!r}")
        return env
    import torch
    if torch.cuda.is_available():
        return "sm_90a" if torch.cuda.get_device_capability()[0] >= 9 else "sm_80"
    return "sm_80"


def table(name: str | None = None):
    """The config module of arch `name` (default: `arch()`)."""
    name = name or arch()
    if name not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {name!r}")
    return importlib.import_module(f"fastpeft.kernels.configs.{name}")


def smem_estimate(BLOCK_M, BLOCK_N, BLOCK_K, num_stages, elem_bytes, r_pad=0, nf4=False) -> int:
    """Bytes of shared memory a pipelined tile pair needs: `num_stages` buffers of the operand
    tiles (NF4: packed bytes, plus the decoded tile staged once for the dot), at least the fp32
    accumulator's layout conversion."""
    if nf4:
        stage = BLOCK_M * BLOCK_K * elem_bytes + BLOCK_N * BLOCK_K // 2 + r_pad * BLOCK_K * elem_bytes
        pipe = num_stages * stage + BLOCK_K * BLOCK_N * elem_bytes
    else:
        pipe = num_stages * (BLOCK_M * BLOCK_K + BLOCK_K * BLOCK_N + r_pad * BLOCK_K) * elem_bytes
    return max(pipe, BLOCK_M * BLOCK_N * 4)


def reg_estimate(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, elem_bytes, r_pad=0, nf4=False) -> int:
    """32-bit registers per thread the tiles hold: accumulators, operand fragments, and for NF4
    the decoded fp32 tile."""
    threads = 32 * num_warps
    words = BLOCK_M * (BLOCK_N + r_pad) + (BLOCK_M + BLOCK_N) * BLOCK_K * elem_bytes // 4
    if nf4:
        words += BLOCK_N * BLOCK_K
    return -(-words // threads)


def fits(cfg: tuple, elem_bytes: int, r_pad: int, nf4: bool, arch_name: str | None = None) -> bool:
    bm, bn, bk, nw, ns = cfg
    limit = table(arch_name).SMEM_LIMIT
    return (smem_estimate(bm, bn, bk, ns, elem_bytes, r_pad, nf4) <= limit
            and reg_estimate(bm, bn, bk, nw, elem_bytes, r_pad, nf4) <= _REG_BUDGET[min(elem_bytes, 4)])


def candidates(family: str, arch_name: str | None = None) -> list[tuple]:
    """The (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) autotune candidates of a family."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return list(getattr(table(arch_name), family))


def _to_config(cfg: tuple) -> triton.Config:
    bm, bn, bk, nw, ns = cfg
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=nw, num_stages=ns)


def prune(nf4: bool, arch_name: str):
    """An `early_config_prune` for the autotuner: keep the configs that fit `arch_name`, and at
    decode sizes (M <= 16) those whose grid is at least one program per SM if any is."""
    def _prune(configs, named_args, **kwargs):
        x = named_args.get("x_ptr")
        elem = x.element_size() if hasattr(x, "element_size") else 2
        r_pad = kwargs.get("R_PAD", named_args.get("R_PAD", 16)) if kwargs.get("HAS_LORA", True) else 0
        keep = [c for c in configs
                if fits((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                         c.num_stages), elem, r_pad, nf4, arch_name)]
        M, P = named_args.get("M"), named_args.get("P")
        if isinstance(M, int) and isinstance(P, int) and M <= 16:
            sms = table(arch_name).SMS
            wide = [c for c in keep
                    if triton.cdiv(M, c.kwargs["BLOCK_M"]) * triton.cdiv(P, c.kwargs["BLOCK_N"]) >= sms]
            keep = wide or keep
        if not keep:
            raise ValueError(f"no {arch_name} config fits (elem {elem} B, R_PAD {r_pad})")
        return keep
    return _prune


class _Tuned:
    """One autotuner per (kernel, arch), built on first use from that arch's table."""

    def __init__(self, kernel, family: str, key: list[str], nf4: bool):
        self.kernel, self.family, self.key, self.nf4 = kernel, family, key, nf4
        self.by_arch = {}

    def get(self):
        name = arch()
        tuned = self.by_arch.get(name)
        if tuned is None:
            tuned = triton.autotune(configs=[_to_config(c) for c in candidates(self.family, name)],
                                    key=self.key, prune_configs_by={"early_config_prune": prune(self.nf4, name)},
                                    )(self.kernel)
            self.by_arch[name] = tuned
        return tuned


def autotuned(kernel, family: str, key: list[str], nf4: bool = False) -> _Tuned:
    """A lazy per-arch autotuner of `kernel` over `candidates(family)`; `.get()` returns it."""
    return _Tuned(kernel, family, key, nf4)


def decode_split(P: int, Q: int, block_n: int, block_k: int, extra_cols: int = 0) -> tuple[int, int]:
    """(SPLIT_K, K per split) so that ``(cdiv(P, block_n) + extra_cols) * SPLIT_K`` reaches
    MIN_DECODE_PROGRAMS where K allows (every split keeps at least one BLOCK_K tile)."""
    cols = triton.cdiv(P, block_n) + extra_cols
    k_tiles = max(1, triton.cdiv(Q, block_k))
    split = max(1, min(k_tiles, triton.cdiv(MIN_DECODE_PROGRAMS, cols)))
    per_split = triton.cdiv(k_tiles, split) * block_k
    split = triton.cdiv(max(Q, 1), per_split)   # no empty trailing split
    return split, per_split
