"""The bench's outputs: Markdown tables (each naming its device), results.json/.md and a plot."""
from __future__ import annotations

import json
from pathlib import Path

from fastpeft.bench.plot import write_plot
from fastpeft.bench.methods import model_summary


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec)


def _table(cols: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _latency_cells(r: dict, extra: int = 0) -> list[str]:
    if r["median_us"] is None:
        return [r["status"], "—", "—"] + ["—"] * extra
    return [_fmt(r["median_us"]), f"{_fmt(r['min_us'])}–{_fmt(r['max_us'])}", _ratio(r["penalty"])]


def _bandwidth_cells(r: dict, copy: float | None) -> list[str]:
    """GB/s and % of the device-to-device copy: "n/a" without a copy measurement (the CPU)."""
    if not copy:
        return ["n/a", "n/a"]
    frac = None if r["copy_frac"] is None else 100 * r["copy_frac"]
    return [_fmt(r["gbps"], ".0f"), _fmt(frac, ".0f")]


def _timing_cell(r: dict) -> str:
    """How the row was timed, and why not from a CUDA graph when it was meant to be."""
    if r["timing"] is None:
        return "—"
    return r["timing"] + (f" ({r['timing_note']})" if r["timing_note"] else "")


def _cuda_clock(copy: float | None) -> str:
    return ("device time: decode (M <= 16) from CUDA-graph replays over rotated weights, larger M by "
            "do_bench; the timing column says which, and ratios only compare rows timed alike"
            + (f"; bandwidth = compulsory bytes / median, % of a device-to-device copy at {copy:.0f} GB/s"
               if copy else ""))


def kernel_table(result: dict) -> list[str]:
    section, dev = result["kernels"], result["device"]
    s, cuda = section["shapes"], dev["type"] == "cuda"
    copy = section["copy_gbps"]
    head = (
        f"**Kernels on {dev['summary']}** — LoRA linear {s['n']}x{s['k']}, r={s['r']}, {s['dtype']}, "
        f"torch {result['versions']['torch']}; latency in µs "
        f"({_cuda_clock(copy) if cuda else 'wall clock'}: median, min–max); penalty = median / base median"
    )
    cols = ["M", "implementation", "median µs", "min–max µs", "penalty", "GB/s", "% of copy"]
    if cuda:
        cols += ["timing", "wall µs/call", "wall penalty"]
    rows = []
    for r in section["rows"]:
        if r["median_us"] is None:
            rows.append([str(r["m"]), r["label"], r["status"]] + ["—"] * (len(cols) - 3))
            continue
        cells = [str(r["m"]), r["label"]] + _latency_cells(r) + _bandwidth_cells(r, copy)
        if cuda:
            cells += [_timing_cell(r), _fmt(r["wall_us"]), _ratio(r["wall_penalty"])]
        rows.append(cells)
    return [head, ""] + _table(cols, rows)


def _ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def nf4_table(result: dict) -> list[str]:
    """The NF4 layer rows, then (CPU) the quantize rows."""
    section, dev = result["nf4"], result["device"]
    s, cuda = section["shapes"], dev["type"] == "cuda"
    copy = section["copy_gbps"]
    head = (
        f"**NF4 on {dev['summary']}** — one 4-bit layer (out x in), blocksize {s['blocksize']}, double quant, "
        f"{s['dtype']}, QLoRA r={s['r']}; latency in µs ({_cuda_clock(copy) if cuda else 'wall clock'}: "
        f"median, min–max); vs dense = median / dense median; vs NF4 base = QLoRA median / fastpeft NF4 median"
    )
    cols = ["layer", "M", "implementation", "median µs", "min–max µs", "vs dense", "vs NF4 base",
            "GB/s", "% of copy"]
    if cuda:
        cols += ["timing", "wall µs/call"]
    rows = []
    for r in section["rows"]:
        cells = [r["layer"], str(r["m"]), r["label"]]
        if r["median_us"] is None:
            cells += [r["status"]] + ["—"] * (len(cols) - 4)
        else:
            cells += [_fmt(r["median_us"]), f"{_fmt(r['min_us'])}–{_fmt(r['max_us'])}", _ratio(r["vs_dense"]),
                      _ratio(r["vs_nf4"])] + _bandwidth_cells(r, copy)
            if cuda:
                cells += [_timing_cell(r), _fmt(r["wall_us"])]
        rows.append(cells)
    out = [head, ""] + _table(cols, rows)
    if section["quantize"]:
        out += ["", f"**NF4 quantize on {dev['summary']}** — double quant, blocksize {s['blocksize']}, "
                f"{s['dtype']} weight; wall clock µs; vs bnb = median / bitsandbytes median", ""]
        out += _table(["layer", "implementation", "median µs", "min–max µs", "vs bnb"], [
            [r["layer"], r["label"]] + ([r["status"], "—", "—"] if r["median_us"] is None else
                                        [_fmt(r["median_us"]), f"{_fmt(r['min_us'])}–{_fmt(r['max_us'])}",
                                         _ratio(r["vs_bnb"])])
            for r in section["quantize"]])
    return out


def multi_table(result: dict) -> list[str]:
    section, dev = result["multi"], result["device"]
    s = section["shapes"]
    head = (
        f"**Mixed-adapter batches on {dev['summary']}** — layer {s['n']}x{s['k']} {s['dtype']}: row i on adapter "
        f"i % {s['adapters']} (ranks {'/'.join(map(str, s['ranks']))}), {s['registered']} registered; model: "
        f"{s['model_adapters']} adapters r=16 on every linear; latency in µs "
        f"({'device time by do_bench, launches included' if dev['type'] == 'cuda' else 'wall clock, rows sampled in turn'}"
        "; median, min–max); vs base = median / base median; peft / this = how many times faster than peft"
        + ("; bandwidth = compulsory bytes (each adapter's factors once) / median, % of a device-to-device copy "
           f"at {section['copy_gbps']:.0f} GB/s" if section["copy_gbps"] else "")
    )
    cols = ["part", "phase", "implementation", "median µs", "min–max µs", "vs base", "peft / this", "GB/s",
            "% of copy"]
    rows = []
    for r in section["rows"]:
        cells = [r["part"], r["phase"], r["label"]]
        if r["median_us"] is None:
            cells += [r["status"]] + ["—"] * (len(cols) - 4)
        else:
            cells += [_fmt(r["median_us"]), f"{_fmt(r['min_us'])}–{_fmt(r['max_us'])}", _ratio(r["vs_base"]),
                      _ratio(r["vs_peft"])] + (_bandwidth_cells(r, section["copy_gbps"]) if r["part"] == "layer"
                                               else ["—", "—"])
        rows.append(cells)
    return [head, ""] + _table(cols, rows)


def _model_line(section: dict) -> str:
    """The model a section ran on, as measured on the model itself (older results: the shape)."""
    if section.get("model_info"):
        return model_summary(section["model_info"])
    s = section["shape"]
    return f"{section['model']} (hidden {s['hidden']}, {s['layers']} layers), {s['dtype']}"


def methods_table(result: dict) -> list[str]:
    section, dev = result["methods"], result["device"]
    cuda = dev["type"] == "cuda"
    targets = section.get("targets") or {}
    head = (
        f"**Methods on {dev['summary']}** — {_model_line(section)}"
        + (f"; LoRA targets {','.join(targets['linears'])}" if targets.get("linears") else
           "; LoRA targets: the libraries' defaults for the model type" if targets else "")
        + "; latency in µs per forward (decode: per token); penalty = median / base model median"
        + ("; decode steps from CUDA-graph replays on a static cache where they capture (timing column), "
           "penalties only between rows timed alike; eager = do_bench of the eager step, launches included"
           if cuda else "")
    )
    cols = ["phase", "method", "impl", "median µs", "min–max µs", "penalty", "trainable", "trainable %"]
    if cuda:
        cols += ["timing", "eager µs", "eager penalty", "peak MiB"]
    rows = []
    for r in section["rows"]:
        cells = [r["phase"], r["method"], r["impl"]] + _latency_cells(r)
        cells += [str(r["trainable"]) if r["trainable"] is not None else "—", _fmt(r["trainable_pct"], ".3f")]
        if cuda:
            cells += [_timing_cell(r), _fmt(r["eager_us"]), _ratio(r["eager_penalty"]),
                      _fmt(r["peak_mem_mib"], ".0f")]
        rows.append(cells)
    return [head, ""] + _table(cols, rows) + [f"- {note}" for note in section.get("notes", [])]


def training_table(result: dict) -> list[str]:
    section, dev = result["training"], result["device"]
    batch, seq = section["batch"]
    model = model_summary(result["model"]) if result.get("model") else section["model"]
    head = (
        f"**Training on {dev['summary']}** — {model}, one AdamW step (forward with labels, "
        f"backward, step) on a {batch}x{seq} batch; µs per step; vs peft = fastpeft median / peft median"
    )
    cuda = dev["type"] == "cuda"
    cols = ["method", "impl", "median µs", "min–max µs", "vs peft"] + (["peak MiB"] if cuda else [])
    rows = []
    for r in section["rows"]:
        if r["median_us"] is None:
            cells = [r["method"], r["impl"], r["status"], "—", "—"]
        else:
            cells = [r["method"], r["impl"], _fmt(r["median_us"]), f"{_fmt(r['min_us'])}–{_fmt(r['max_us'])}",
                     _fmt(r["vs_peft"], ".2f") + "x" if r["vs_peft"] is not None else "—"]
        if cuda:
            cells.append(_fmt(r["peak_mem_mib"], ".0f"))
        rows.append(cells)
    return [head, ""] + _table(cols, rows)


def optimizer_table(result: dict) -> list[str]:
    section, dev = result["training"]["optimizer"], result["device"]
    side = section["shape"][0]
    head = (f"**Optimizer step on {dev['summary']}** — `optimizer.step()` over one {side}x{side} "
            f"{section['dtype']} weight; µs per step; vs torch = median / torch.optim.AdamW's median; "
            "state bytes per parameter")
    rows = [[r["impl"], r["status"], "—", "—", "—"] if r["median_us"] is None else
            [r["impl"], _fmt(r["median_us"]), f"{_fmt(r['min_us'])}–{_fmt(r['max_us'])}",
             _fmt(r["vs_torch"], ".2f") + "x", _fmt(r["state_bytes_per_param"], ".3f")] for r in section["rows"]]
    return [head, ""] + _table(["optimizer", "median µs", "min–max µs", "vs torch", "state B/param"], rows)


def format_tables(result: dict) -> str:
    parts = []
    if "kernels" in result:
        parts += kernel_table(result) + [""]
    if "nf4" in result:
        parts += nf4_table(result) + [""]
    if "multi" in result:
        parts += multi_table(result) + [""]
    if "methods" in result:
        parts += methods_table(result) + [""]
    if "training" in result:
        parts += training_table(result) + [""]
        if "optimizer" in result["training"]:
            parts += optimizer_table(result) + [""]
    parts += [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(parts).rstrip() + "\n"


def _markdown(result: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    return "\n".join([
        "# fastpeft bench: the inference latency penalty of PEFT methods", "",
        f"- device: {result['device']['summary']}",
        *([f"- model: {model_summary(result['model'])}"] if result.get("model") else []),
        f"- fastpeft.ops backend on this device: {result['ops_backend']}",
        "- env: " + ", ".join(f"{k}={v or 'unset'}" for k, v in result["env"].items()),
        f"- versions: {versions}",
        f"- timing: {result['timing']}",
        f"- created: {result['created']}" + (" (--quick: tiny shapes, a smoke test)" if result["quick"] else ""),
        "", format_tables(result),
        "peft runs with PEFT's defaults (for bf16/fp16 bases it upcasts the adapter weights to fp32). "
        "Rows without numbers say why (not installed, error, wrong output, not applicable).",
        "",
    ])


def write_outputs(result: dict, out: Path) -> list[str]:
    """results.json, results.md and plot.png in `out`; returns notes for the user (skips)."""
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(result))
    skipped = write_plot(result, out / "plot.png")
    return [skipped] if skipped else []
