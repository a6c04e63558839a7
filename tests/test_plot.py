"""The bench plot's size rules, checked on the PNG and on the figure: one panel per section (per
phase for methods), aspect ratio 0.5-2.5, at most 3000 px, legends inside the figure, log axes
where values span a decade, one colour per implementation in every panel."""
import json
from pathlib import Path

import pytest

from fastpeft.bench import plot

pytest.importorskip("matplotlib")


def _row(**kw):
    return {"status": "ok", **kw}


def _result(methods_phases=("prefill 2x128", "decode b1", "decode b16")):
    kernels = [_row(m=m, impl=i, label=f"{i} label", penalty=p) for m in (1, 16, 512)
               for i, p in (("base", 1.0), ("merged", 1.01), ("eager", 3.0), ("peft", 120.0), ("fastpeft", 2.0))]
    nf4 = [_row(layer="4096x4096", m=m, impl=i, label=f"{i} label", vs_dense=v) for m in (1, 64)
           for i, v in (("dense", 1.0), ("dequant", 2.5), ("bnb", 1.8), ("fastpeft", 1.2), ("qlora", 1.3))]
    multi = [_row(part="layer", phase=ph, impl=i, label=f"{i} label", vs_base=v) for ph in ("decode 8x1", "prefill 4x8")
             for i, v in (("base", 1.0), ("single", 1.5), ("fastpeft", 2.0), ("peft", None))]
    names = ["lora", "dora", "qlora", "prompt_tuning", "bitfit", "lora_mixed16"]
    rows = [_row(method=n, impl=i, phase=ph, penalty=None if (n, i) == ("bitfit", "peft") else 1.2)
            for ph in methods_phases for n in names for i in ("fastpeft", "peft", "peft merged")]
    rows += [_row(method="base", impl="base", phase=ph, penalty=1.0) for ph in methods_phases]
    return {"device": {"summary": "cpu test"}, "kernels": {"rows": kernels}, "nf4": {"rows": nf4},
            "multi": {"rows": multi}, "methods": {"model": "LlamaForCausalLM", "rows": rows}}


@pytest.mark.parametrize("sections", [("kernels",), ("kernels", "nf4"), ("kernels", "nf4", "multi"),
                                      ("kernels", "nf4", "multi", "methods")])
def test_png_size_and_aspect(sections, tmp_path):
    from PIL import Image

    full = _result()
    result = {"device": full["device"], **{s: full[s] for s in sections}}
    path = tmp_path / "plot.png"
    assert plot.write_plot(result, path) is None
    width, height = Image.open(path).size
    assert max(width, height) <= plot.MAX_PX
    assert 0.5 <= width / height <= 2.5, (width, height)


def test_legends_inside_log_axes_and_one_colour_per_implementation():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot.figure(_result())
    try:
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert len(axes) == 3 + 3  # kernels, nf4, multi, and methods once per phase
        fig.canvas.draw()
        box = fig.bbox
        colour_of: dict[str, tuple] = {}
        for ax in axes:
            legend = ax.get_legend()
            ext = legend.get_window_extent()
            assert box.x0 <= ext.x0 and ext.x1 <= box.x1 and box.y0 <= ext.y0 and ext.y1 <= box.y1
            for handle, text in zip(legend.legend_handles, legend.get_texts()):
                impl = text.get_text().split(" ")[0] if "label" in text.get_text() else text.get_text()
                colour = tuple(handle.get_facecolor())
                assert colour_of.setdefault(impl, colour) == colour, impl
        kernels = axes[0]
        assert kernels.get_yscale() == "log"  # penalties from 1.0 to 120: two decades
        assert axes[3].get_yscale() == "linear"  # the methods' penalties all near 1
        assert colour_of["fastpeft"] != colour_of["peft"]
    finally:
        plt.close(fig)


def test_nothing_to_plot_says_why(tmp_path):
    assert "no plot" in plot.write_plot({"device": {"summary": "x"}, "training": {"rows": []}}, tmp_path / "p.png")
