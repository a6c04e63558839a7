"""The pass criteria of `fastpeft check-kernels`, applied to one compiled unit on one target.

A unit is one distinct compilation (kernel, signature, constexprs, options) seen in one or more
launches; each launch carries its scenario's tags (family, M, K, N, dtype, rank, nf4) and grid.
Failures (the check exits non-zero on any):
  compile        Triton compiles it for the target (sm_90a and sm_80);
  spills         ptxas reports no spill stores or loads;
  smem           shared memory within the per-block limit (232,448 B sm_90a, 166,912 B sm_80);
  tensor-cores   at M >= 64, a unit with fp16/bf16/tf32 dots issues tensor-core instructions
                 (HGMMA or HMMA; fp32 "ieee" dots run on FMA by design and are exempt);
  decode-grid    at M = 1 on a 4096x4096 layer, a decode launch has >= one program per SM
                 (132 on H100, 108 on A100);
  nf4-loads      an NF4 kernel loads its packed weight >= 8 bytes per load instruction;
  nf4-smem       an NF4 decode config (a decode family or dX at M <= 16) uses <= 64 KB of smem;
  nf4-grid       at M = 1 on 4096x4096, a launch that streams the packed weight has >= two
                 programs per SM (264 on H100, 216 on A100).
Warnings (reported, not failing): HMMA instead of HGMMA on sm_90a, local-memory traffic without
spills, fewer programs than SMs at M = 4 or 16, 2-byte or 4-byte packed loads on the way to 8.
"""
from __future__ import annotations

import math

__all__ = ["LIMITS", "evaluate", "packed_arg", "DECODE_FAMILIES"]

LIMITS = {
    90: {"name": "H100", "sm": "sm_90a", "sms": 132, "smem_block": 232448},
    80: {"name": "A100", "sm": "sm_80", "sms": 108, "smem_block": 166912},
}
NF4_DECODE_SMEM = 64 * 1024
NF4_MIN_LOAD = 8
TC_MIN_M = 64
# forward kernels a decode step runs (training input gradients and the grouped prefill kernel
# are not decode kernels)
DECODE_FAMILIES = ("lora_fwd", "adalora_fwd", "dora_fwd", "ia3_fwd", "adapter_fwd", "nf4_fwd",
                   "multi_gathered", "multi_gathered_nf4")


def arch_of(target: str | int) -> int:
    """90 for 'sm_90a' / '90' / 90, 80 for 'sm_80'."""
    text = str(target).lower().replace("sm_", "").rstrip("a")
    arch = int(text)
    if arch not in LIMITS:
        raise ValueError(f"unknown target {target!r}: known sm_90a, sm_80")
    return arch


def packed_arg(launch: dict) -> str | None:
    """The argument holding the packed NF4 weight: the largest uint8 tensor of an NF4 launch."""
    if not launch.get("scenario", {}).get("nf4"):
        return None
    u8 = [(t["numel"], name) for name, t in launch.get("tensors", {}).items() if t["dtype"] == "uint8"]
    return max(u8)[1] if u8 else None


def _programs(launch) -> int:
    return math.prod(launch.get("grid") or [0])


def _is_layer(sc, M) -> bool:
    return sc.get("M") == M and sc.get("K") == 4096 and sc.get("N") == 4096


def evaluate(unit: dict, arch: int, r: dict) -> tuple[list[str], list[str]]:
    """(failures, warnings) of `unit` compiled for `arch` with result `r`, as short texts."""
    lim, fails, warns = LIMITS[arch], [], []
    launches = [L for L in unit["launches"] if L["arch"] == arch]
    if not r.get("ok"):
        return [f"compile: {(r.get('error') or 'failed').splitlines()[0][:160]}"], warns
    spill = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
    if spill:
        fails.append(f"spills: {r.get('spill_stores')}/{r.get('spill_loads')} B st/ld ({r.get('regs')} regs)")
    elif (r.get("sass") or {}).get("local"):
        warns.append(f"local memory: {r['sass']['local']} LDL/STL without reported spills")
    if r["shared"] > lim["smem_block"]:
        fails.append(f"smem: {r['shared']} B > {lim['smem_block']} B")
    sass = r.get("sass") or {}
    mma = sass.get("mma", {})
    tc_dots = [d for d in r.get("dots", []) if d.get("precision") != "ieee" or d.get("a") in ("f16", "bf16")]
    if tc_dots and any(L["scenario"].get("M", 0) >= TC_MIN_M for L in launches) and not mma:
        fails.append(f"tensor-cores: {len(tc_dots)} dot(s) at M >= {TC_MIN_M} but no HMMA/HGMMA in the SASS")
    if arch == 90 and mma.get("HMMA") and not mma.get("HGMMA"):
        warns.append("mma.sync (HMMA) on sm_90a, not wgmma (HGMMA)")
    for L in launches:
        sc = L["scenario"]
        if sc.get("family") in DECODE_FAMILIES and sc.get("M", 0) <= 16 and sc.get("M") and _is_layer(sc, sc["M"]):
            n = _programs(L)
            if n < lim["sms"]:
                msg = f"grid {L['grid']} = {n} programs < {lim['sms']} SMs at M={sc['M']} ({sc['label']})"
                (fails if sc["M"] == 1 else warns).append(("decode-grid: " if sc["M"] == 1 else "") + msg)
    nf4 = [L for L in launches if packed_arg(L)]
    if nf4:
        arg = packed_arg(nf4[0])
        widths = {int(w): n for w, n in (r.get("loads_by_arg") or {}).get(arg, {}).items()}
        if not widths:
            fails.append(f"nf4-loads: no global load of {arg} found in the PTX")
        elif min(widths) < NF4_MIN_LOAD:
            fails.append(f"nf4-loads: {arg} loaded {min(widths)} B wide ({sum(widths.values())} loads: "
                         + ", ".join(f"{w} B x{n}" for w, n in sorted(widths.items())) + f"), need >= {NF4_MIN_LOAD}")
        decode = [L for L in nf4 if L["scenario"].get("family") in (*DECODE_FAMILIES, "nf4_dx")
                  and 0 < L["scenario"].get("M", 0) <= 16]
        if decode and r["shared"] > NF4_DECODE_SMEM:
            fails.append(f"nf4-smem: decode config uses {r['shared']} B > {NF4_DECODE_SMEM} B")
        for L in nf4:
            if _is_layer(L["scenario"], 1) and L["scenario"].get("family") in DECODE_FAMILIES:
                n = _programs(L)
                if n < 2 * lim["sms"]:
                    fails.append(f"nf4-grid: grid {L['grid']} = {n} programs < {2 * lim['sms']} at M=1 "
                                 f"({L['scenario']['label']})")
    return _dedupe(fails), _dedupe(warns)


def _dedupe(items):
    seen, out = set(), []
    for x in items:
        key = x.split(" (")[0]
        if key not in seen:
            seen.add(key)
            out.append(x)
    return out
