"""The outputs of `fastpeft check-kernels`: the printed table, the JSON file, bench/KERNELS.md.

The NF4 bytes-per-call model: what one NF4 layer call (its launches together) must move at the
least, from the shapes alone (each byte once): packed codes N*K/2; absmax, one per 64-element
block (a uint8 code with double quant, else fp32); the nested fp32 scales, one per 256 absmax
codes, and the offset; the activations x (M*K; dY, M*N, for the input gradient); the LoRA factors
A and B ((K + N) * r); and the output write. Split-K partials are not counted: they are the
implementation's overhead, not the problem's. The floor is those bytes over 3.35 TB/s, the H100
SXM's HBM3 bandwidth, so a GPU run of bench/gpu.sh shows how far each kernel is from it.
"""
from __future__ import annotations

import json
import math

from fastpeft.check.criteria import LIMITS, packed_arg

__all__ = ["format_table", "write_json", "markdown", "nf4_bytes", "versions", "config_text"]

HBM_BYTES_PER_S = 3.35e12
_ELT = {"fp32": 4, "fp16": 2, "bf16": 2}


def versions() -> dict:
    out = {}
    for name in ("fastpeft", "triton", "torch"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = "?"
    return out


def config_text(u: dict) -> str:
    """The unit's meta-parameters: annotated constexprs that are set, warps and stages."""
    names, parts = u["arg_names"], []
    for path, v in u["constexprs"]:
        name = names[path[0]] if len(path) == 1 and path[0] < len(names) else str(path)
        if name not in u["annotated"] or v is False or v is None:
            continue
        short = name.replace("BLOCK_", "B").replace("INPUT_PRECISION", "prec")
        if isinstance(v, dict):
            v = next(iter(v.values()))
        parts.append(short if v is True else f"{short}={v}")
    o = u["options"]
    parts.append(f"w{o.get('num_warps', 4)} s{o.get('num_stages', 3)}")
    return " ".join(parts)


def _dtypes(u):
    seen = []
    for ty in u["signature"].values():
        if isinstance(ty, str) and ty.startswith("*") and ty[1:] not in seen:
            seen.append(ty[1:])
    return "/".join(seen)


def _seen(u, arch):
    labels = list(dict.fromkeys(L["scenario"].get("label", "?") for L in u["launches"] if L["arch"] == arch))
    return labels[0] + (f" (+{len(labels) - 1})" if len(labels) > 1 else "")


def _grid(u, arch):
    ns = [math.prod(L["grid"]) for L in u["launches"] if L["arch"] == arch and L.get("grid")]
    if not ns:
        return "-"
    return str(min(ns)) if min(ns) == max(ns) else f"{min(ns)}-{max(ns)}"


def _loads(u, arch, r):
    by_arg = r.get("loads_by_arg") or {}
    launches = [L for L in u["launches"] if L["arch"] == arch]
    arg = packed_arg(launches[0]) if launches else None
    if arg:
        ws = [int(w) for w in by_arg.get(arg, {})]
        return f"{arg}: {min(ws)}-{max(ws)}B" if ws else f"{arg}: none"
    sass = r.get("sass") or {}
    ws = [int(w) for w in {**sass.get("ldg", {}), **sass.get("ldgsts", {})}]
    return f"{min(ws)}-{max(ws)}B" if ws else ("TMA" if sass.get("tma_loads") else "-")


def _row_cells(result, row):
    u, r, a = result["units"][row["uid"]], row["result"], row["arch"]
    kname = u["kernel"].split(":")[-1]
    cfg = f"{_dtypes(u)}: {config_text(u)}"
    status = "FAIL: " + "; ".join(f.split(":")[0] for f in row["failures"]) if row["failures"] else "ok"
    if not r.get("ok"):
        return [str(u["uid"]), kname, cfg, LIMITS[a]["sm"], _seen(u, a), "-", "-", "-", "-", "-", _grid(u, a), status]
    sass = r.get("sass") or {}
    tc = ",".join(f"{k}x{v}" for k, v in sass.get("mma", {}).items()) or ("none" if r.get("dots") else "n/a")
    return [str(u["uid"]), kname, cfg, LIMITS[a]["sm"], _seen(u, a), str(r.get("regs")),
            f"{r.get('spill_stores')}/{r.get('spill_loads')}", str(r["shared"]), tc, _loads(u, a, r), _grid(u, a),
            status]


HEADER = ["#", "kernel", "config", "target", "seen in", "regs", "spill st/ld B", "smem B", "tensor cores",
          "global loads", "programs", "status"]


def _md(cells):
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def format_table(result: dict, *, details: bool = True) -> str:
    """One Markdown table (unit x target) and the failures and warnings, one line each."""
    lines = [_md(HEADER), _md(["---"] * len(HEADER))]
    lines += [_md(_row_cells(result, row)) for row in result["rows"]]
    if details:
        lines += ["", *_findings(result)]
    lines.append("")
    lines.append(summary_line(result))
    return "\n".join(lines)


def by_kernel(result: dict) -> list[str]:
    """A Markdown table: unit x targets failing each criterion, per kernel."""
    names = ("compile", "spills", "smem", "tensor-cores", "decode-grid", "nf4-loads", "nf4-smem", "nf4-grid")
    counts: dict[str, dict[str, int]] = {}
    for row in result["rows"]:
        kern = result["units"][row["uid"]]["kernel"].split(":")[-1]
        c = counts.setdefault(kern, {"rows": 0, "ok": 0, **{n: 0 for n in names}})
        c["rows"] += 1
        c["ok"] += not row["failures"]
        for n in {f.split(":")[0] for f in row["failures"]}:
            c[n] = c.get(n, 0) + 1
    lines = [_md(["kernel", "unit x targets", "pass", *names]), _md(["---"] * (len(names) + 3))]
    for kern, c in counts.items():
        lines.append(_md([kern, str(c["rows"]), str(c["ok"]), *(str(c[n]) for n in names)]))
    return lines


def _findings(result):
    out = [*by_kernel(result), ""]
    fails = [(row, f) for row in result["rows"] for f in row["failures"]]
    out.append(f"Failures: {len(fails) + len(result['problems'])}")
    for row, f in fails:
        u = result["units"][row["uid"]]
        out.append(f"- #{row['uid']} {u['kernel'].split(':')[-1]} {LIMITS[row['arch']]['sm']} "
                   f"[{config_text(u)}]: {f}")
    for p in result["problems"]:
        out.append(f"- {p['kind']} error on {LIMITS[p['arch']]['sm']} in {p['scenario']}: {p['error'][:300]}")
    errors = {}
    for row in result["rows"]:
        if not row["result"].get("ok"):
            errors.setdefault(result["units"][row["uid"]]["kernel"], row["result"].get("error") or "")
    for kern, err in errors.items():
        out.append(f"  {kern}: " + "\n    ".join(err.strip().splitlines()[:8]))
    warns = [(row, w) for row in result["rows"] for w in row["warnings"]]
    out.append(f"Warnings: {len(warns)}")
    for row, w in warns[:200]:
        out.append(f"- #{row['uid']} {result['units'][row['uid']]['kernel'].split(':')[-1]} "
                   f"{LIMITS[row['arch']]['sm']}: {w}")
    return out


def summary_line(result: dict) -> str:
    rows = result["rows"]
    count = lambda pred: sum(1 for row in rows if pred(row))  # noqa: E731
    crit = lambda name: count(lambda row: any(f.startswith(name) for f in row["failures"]))  # noqa: E731
    return (f"check-kernels: {'FAIL' if result['failures'] else 'PASS'}: {len(result['units'])} units, "
            f"{len(rows)} unit x target; {crit('compile')} compile failures, {crit('spills')} spilling, "
            f"{crit('smem')} over smem, {crit('tensor-cores')} without tensor cores, {crit('decode-grid')} small "
            f"decode grids, {crit('nf4-loads') + crit('nf4-smem') + crit('nf4-grid')} NF4 misses, "
            f"{len(result['problems'])} launcher errors ({result['level']} level, "
            f"{', '.join(LIMITS[a]['sm'] for a in result['archs'])}, {result['seconds']:.0f} s)")


def write_json(result: dict, path: str) -> None:
    rows = []
    for row in result["rows"]:
        u, r = result["units"][row["uid"]], row["result"]
        rows.append({"uid": row["uid"], "kernel": u["kernel"], "config": config_text(u), "target": LIMITS[row["arch"]]["sm"],
                     "signature": u["signature"], "ok": bool(r.get("ok")), "regs": r.get("regs"),
                     "spill_stores": r.get("spill_stores"), "spill_loads": r.get("spill_loads"),
                     "shared": r.get("shared"), "tensor_cores": (r.get("sass") or {}).get("mma"),
                     "global_loads": (r.get("sass") or {}).get("ldg"), "loads_by_arg": r.get("loads_by_arg"),
                     "dots": r.get("dots"), "error": r.get("error"),
                     "launches": [{"scenario": L["scenario"], "grid": L["grid"], "tuner": L["tuner"]}
                                  for L in u["launches"] if L["arch"] == row["arch"]],
                     "failures": row["failures"], "warnings": row["warnings"]})
    out = {k: result[k] for k in ("archs", "level", "failures", "seconds", "toolchain", "versions")}
    out.update(summary=summary_line(result), rows=rows, problems=result["problems"], nf4_bytes=nf4_bytes(result))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def nf4_bytes(result: dict) -> list[dict]:
    """The bytes-per-call model (module docstring) of every NF4 layer call of the run: forward
    (x [M, K] in, [M, N] out), input gradient (dY [M, N] in, [M, K] out) and dequantize ([N, K] out)."""
    seen, out = set(), []
    for u in result["units"]:
        for L in u["launches"]:
            sc = L["scenario"]
            if sc.get("family") not in ("nf4_fwd", "nf4_dx", "nf4_dequant") or not packed_arg(L):
                continue
            key = (sc["family"], sc["M"], sc["K"], sc["N"], sc["rank"], sc["dtype"], sc.get("nested", True))
            if key in seen:
                continue
            seen.add(key)
            fam, M, K, N, r, dt, nested = key
            elt, numel = _ELT[dt], N * K
            blocks = -(-numel // 64)
            rows_in, rows_out = (N, K) if fam == "nf4_dx" else (K, N)
            parts = {"codes": numel // 2, "absmax": blocks * (1 if nested else 4),
                     "nested": (-(-blocks // 256) * 4 + 4) if nested else 0, "x": M * rows_in * elt,
                     "lora": (K + N) * r * elt, "out": numel * elt if fam == "nf4_dequant" else M * rows_out * elt}
            total = sum(parts.values())
            weight = parts["codes"] + parts["absmax"] + parts["nested"]
            out.append({"family": fam, "M": M, "K": K, "N": N, "rank": r, "dtype": dt, "double_quant": nested, **parts,
                        "total": total, "weight_floor_us": round(weight / HBM_BYTES_PER_S * 1e6, 2),
                        "floor_us": round(total / HBM_BYTES_PER_S * 1e6, 2)})
    order = {"nf4_fwd": 0, "nf4_dx": 1, "nf4_dequant": 2}
    out.sort(key=lambda d: (order[d["family"]], d["K"], d["N"], d["M"], d["rank"], d["dtype"], not d["double_quant"]))
    return out


def markdown(result: dict, command: str) -> str:
    """bench/KERNELS.md: how it was made, the summary, the table, findings, the NF4 byte model."""
    v = result["versions"]
    lines = [
        "# Static GPU check of the kernels (`fastpeft check-kernels`)",
        "",
        f"Generated by `{command}` from the repository root (no GPU needed: Triton's compiler and the",
        "ptxas/cuobjdump of the triton wheel). Regenerate it with that command after changing a kernel.",
        "",
        f"fastpeft {v.get('fastpeft')}, triton {v.get('triton')}, torch {v.get('torch')}; "
        f"tools {', '.join(result['toolchain'].values())}; level `{result['level']}`.",
        "",
        f"**{summary_line(result)}**",
        "",
        "Columns: registers per thread, spill store/load bytes, shared memory per block, tensor-core "
        "instructions in the SASS (HGMMA = wgmma, HMMA = mma.sync), global load widths (for NF4 "
        "kernels: the packed weight's loads, from the PTX), programs per launch (range over the "
        "scenarios that launch the unit), status against the criteria of fastpeft/check/criteria.py.",
        "",
        "## NF4 bytes per call",
        "",
        "What each NF4 layer call must move at the least (bytes; its launches together, split-K "
        "partials not counted), and the time that takes at 3.35 TB/s (H100 SXM HBM3): `weight "
        "floor` counts codes + absmax + nested, `floor` everything (x is dY for nf4_dx).",
        "",
        _md(["family", "M", "K->N", "r", "dtype", "dq", "codes", "absmax", "nested", "x", "LoRA", "out", "total",
             "weight floor us", "floor us"]),
        _md(["---"] * 15),
    ]
    for d in nf4_bytes(result):
        lines.append(_md([d["family"], str(d["M"] or "-"), f"{d['K']}->{d['N']}", str(d["rank"] or "-"), d["dtype"],
                          "yes" if d["double_quant"] else "no", *(f"{d[k]:,}" for k in ("codes", "absmax", "nested", "x",
                                                                                  "lora", "out", "total")),
                          f"{d['weight_floor_us']:.2f}", f"{d['floor_us']:.2f}"]))
    lines += ["", "## Per kernel x config x target", "", format_table(result), ""]
    return "\n".join(lines)
