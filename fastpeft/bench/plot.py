"""The bench's plot: a grid of panels, one per section (the methods section: one per phase).

Readable by construction: the figure's aspect ratio stays within 0.5-2.5 and its longest side
within MAX_PX pixels, the legend sits inside its panel, a ratio axis turns logarithmic when its
values span a decade or more, and an implementation has one colour in every panel (COLORS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

MAX_PX = 3000
DPI = 100
PANEL_IN = (6.4, 4.4)  # inches per panel (width, height)
# one colour per implementation, in every panel: fastpeft blues, peft oranges, bitsandbytes
# green, torch's own baselines greys and browns
COLORS = {
    "fastpeft": "#1f77b4", "qlora": "#17becf", "single": "#aec7e8", "registered": "#9467bd",
    "peft": "#ff7f0e", "peft merged": "#ffbb78",
    "bnb": "#2ca02c",
    "merged": "#7f7f7f", "eager": "#8c564b", "dequant": "#bcbd22", "dense": "#c7c7c7", "base": "#c7c7c7",
}
_SPARE = ["#d62728", "#e377c2", "#98df8a", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79"]


@dataclass
class Panel:
    title: str
    groups: list[str]  # x-axis groups
    series: dict[str, tuple[str, list[float | None]]]  # legend label -> (impl, one value per group)
    ylabel: str = "latency / base (median)"


def _by(rows: list[dict], key, groups: list, value: str, where) -> list[float | None]:
    return [next((r[value] for r in rows if where(r) and key(r) == g), None) for g in groups]


def panels(result: dict) -> list[Panel]:
    """The panels for the sections present in `result` (training has no latency ratio: none)."""
    out = []
    if "kernels" in result:
        rows = result["kernels"]["rows"]
        ms = sorted({r["m"] for r in rows})
        impls = list(dict.fromkeys(r["impl"] for r in rows if r["impl"] != "base"))
        out.append(Panel("LoRA layer, unmerged", [f"M={m}" for m in ms], {
            next(r["label"] for r in rows if r["impl"] == i): (i, _by(rows, lambda r: r["m"], ms, "penalty",
                                                                      lambda r, i=i: r["impl"] == i))
            for i in impls}))
    if "nf4" in result:
        rows = result["nf4"]["rows"]
        groups = list(dict.fromkeys((r["layer"], r["m"]) for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows if r["impl"] != "dense"))
        out.append(Panel("NF4 layer", [f"{lay} M={m}" for lay, m in groups], {
            next(r["label"] for r in rows if r["impl"] == i): (
                i, _by(rows, lambda r: (r["layer"], r["m"]), groups, "vs_dense", lambda r, i=i: r["impl"] == i))
            for i in impls}, "latency / dense (median)"))
    if "multi" in result:
        rows = [r for r in result["multi"]["rows"] if r["part"] == "layer"]
        phases = list(dict.fromkeys(r["phase"] for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows if r["impl"] != "base"))
        out.append(Panel("mixed-adapter batch, one layer", phases, {
            next(r["label"] for r in rows if r["impl"] == i): (
                i, _by(rows, lambda r: r["phase"], phases, "vs_base", lambda r, i=i: r["impl"] == i))
            for i in impls}))
    if "methods" in result:
        rows = [r for r in result["methods"]["rows"] if r["method"] != "base"]
        names = list(dict.fromkeys(r["method"] for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        for phase in dict.fromkeys(r["phase"] for r in rows):
            here = [r for r in rows if r["phase"] == phase]
            out.append(Panel(f"methods in {result['methods']['model']}, {phase}", names, {
                i: (i, _by(here, lambda r: r["method"], names, "penalty", lambda r, i=i: r["impl"] == i))
                for i in impls}))
    return [p for p in out if any(v is not None for _, vals in p.series.values() for v in vals)]


def _colors(all_panels: list[Panel]) -> dict[str, str]:
    colors, spare = dict(COLORS), iter(_SPARE * 4)
    for p in all_panels:
        for impl, _ in p.series.values():
            if impl not in colors:
                colors[impl] = next(spare)
    return colors


def grid(n: int) -> tuple[int, int]:
    """(rows, columns) for n panels, keeping the figure's aspect ratio within 0.5-2.5."""
    cols = 1 if n <= 2 else 2 if n <= 8 else 3
    return math.ceil(n / cols), cols


def _draw(ax, panel: Panel, colors: dict[str, str]) -> None:
    import matplotlib.transforms as mtransforms

    k = max(len(panel.series), 1)
    width = 0.8 / k
    values = [v for _, vals in panel.series.values() for v in vals if v is not None and v > 0]
    log = bool(values) and max(values) / min(values) >= 10
    floor = min(values + [1.0]) / 1.5 if log else 0.0
    na = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    for j, (label, (impl, vals)) in enumerate(panel.series.items()):
        xs = [i + (j - (k - 1) / 2) * width for i in range(len(panel.groups))]
        heights = [(v if v is not None else floor) - floor for v in vals]
        ax.bar(xs, heights, width, bottom=floor, label=label, color=colors[impl])
        for x, v in zip(xs, vals):
            if v is None:  # no number (not installed, n/a, error): say so, never draw a value
                ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, transform=na)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    top = max(values + [1.0])
    if log:
        ax.set_yscale("log")
        ax.set_ylim(floor, top * 6)  # headroom for the legend
    else:
        ax.set_ylim(0, top * 1.45)
    rotate = len(panel.groups) > 6 or sum(len(g) for g in panel.groups) > 60
    ax.set_xticks(range(len(panel.groups)), panel.groups, fontsize=7, rotation=60 if rotate else 0,
                  ha="right" if rotate else "center")
    ax.set_ylabel(panel.ylabel + (", log scale" if log else ""), fontsize=8)
    ax.set_title(panel.title, fontsize=9)
    ax.legend(fontsize=6, loc="upper left", ncol=1 if k <= 4 else 2, framealpha=0.85)


def figure(result: dict):
    """The matplotlib Figure (None when no section has latency ratios)."""
    import matplotlib.pyplot as plt

    all_panels = panels(result)
    if not all_panels:
        return None
    rows, cols = grid(len(all_panels))
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_IN[0] * cols, PANEL_IN[1] * rows + 0.4),
                             squeeze=False)
    colors = _colors(all_panels)
    flat = [ax for row in axes for ax in row]
    for ax, panel in zip(flat, all_panels):
        _draw(ax, panel, colors)
    for ax in flat[len(all_panels):]:
        ax.set_visible(False)
    fig.suptitle(result["device"]["summary"], fontsize=9)
    fig.tight_layout()
    return fig


def write_plot(result: dict, path: Path) -> str | None:
    """Write the grid as a PNG; returns why it was skipped (matplotlib missing, nothing to plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipping the plot (pip install -e \".[bench]\")"
    fig = figure(result)
    if fig is None:
        return "no section with latency ratios ran (training alone): no plot"
    dpi = min(DPI, MAX_PX / max(fig.get_size_inches()))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return None
