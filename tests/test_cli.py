"""The `fastpeft` command: `info`, `bench --quick` and its outputs, and bad input.

In-process through `fastpeft.cli.main` (fast), plus one subprocess check of the entry points.
Never asserts on speed: only that every number is there, finite and positive.
"""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpeft import bench
from fastpeft.bench import layer, methods, multi, nf4, training
from fastpeft.cli import main

HAS_PEFT = importlib.util.find_spec("peft") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture
def no_timing(monkeypatch):
    """Bad input must be refused before any timing starts: make starting one fail the test."""
    def boom(*args, **kwargs):
        raise AssertionError("bench.run started although the input was bad")

    monkeypatch.setattr(bench, "run", boom)


def test_info_names_device_backend_and_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"device:   {device}" in out
    from fastpeft import ops

    assert f"backend:  {ops.resolve_backend(torch.empty(0, device=device))} " in out
    for name in ("python", "torch", "triton", "transformers", "peft", "bitsandbytes"):
        assert f"\n{name}:" in out
    assert torch.__version__ in out


def test_bench_quick_cpu_writes_json_md_png(tmp_path, capsys):
    out = tmp_path / "new" / "bench-out"  # parents are created
    threads = torch.get_num_threads()
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the CPU thread setting is restored
    std = capsys.readouterr()

    result = json.loads((out / "results.json").read_text())
    assert result["device"]["type"] == "cpu"
    assert result["versions"]["torch"] == torch.__version__
    ms = result["kernels"]["shapes"]["ms"]
    rows = result["kernels"]["rows"]
    assert {(r["impl"], r["m"]) for r in rows} == {(i, m) for i in layer.IMPLS for m in ms}
    for r in rows:
        if r["impl"] == "peft" and not HAS_PEFT:
            assert r["status"] == "not installed" and r["median_us"] is None
            continue
        assert r["status"] == "ok", r
        for key in ("median_us", "min_us", "max_us", "penalty"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["min_us"] <= r["median_us"] <= r["max_us"]
        assert r["samples"] >= 5
        assert r["timing"] == "wall clock" and r["timing_note"] is None  # the JSON says how it was timed
        assert r["bytes"] > 0 and r["gbps"] is None and r["copy_frac"] is None  # bandwidth: CUDA only
    assert all(r["penalty"] == 1.0 for r in rows if r["impl"] == "base")
    assert result["kernels"]["copy_gbps"] is None

    nf4_rows, quant_rows = _check_nf4_section(result["nf4"])
    multi_rows = _check_multi_section(result["multi"])

    md = (out / "results.md").read_text()
    summary = result["device"]["summary"]
    heads = [line for line in std.out.splitlines() if line.startswith("**")]
    assert summary in md and len(heads) >= 4 and all(summary in h for h in heads)  # every table names its device
    table = [line for line in std.out.splitlines() if line.startswith("| ")]
    method_rows = result["methods"]["rows"]
    others = sum(len(v["rows"]) for k, v in result.items()  # sections other engineers add
                 if k not in ("kernels", "nf4", "multi", "methods") and isinstance(v, dict) and "rows" in v)
    others += len(result.get("training", {}).get("optimizer", {}).get("rows", []))
    # one header line per table, one line per row
    assert len(table) == (len(heads) + len(rows) + len(nf4_rows) + len(quant_rows) + len(multi_rows)
                          + len(method_rows) + others)
    phases = {r["phase"] for r in method_rows}
    assert len(phases) == 3  # prefill, decode at two batch sizes
    timed = {(r["method"], r["impl"], r["phase"]) for r in method_rows if r["status"] == "ok"}
    expected = {("base", "base", p) for p in phases} | {(m, "fastpeft", p) for m in methods.METHODS for p in phases}
    if HAS_PEFT:
        expected |= {(m, "peft", p) for m in methods.METHODS for p in phases
                     if (m != "qlora" or HAS_BNB) and methods.METHODS[m].peft_has}
        assert all(r["status"].startswith("n/a") for r in method_rows  # fastpeft's own methods
                   if r["impl"].startswith("peft") and not methods.METHODS[r["method"]].peft_has)
    assert expected <= timed, expected - timed
    for r in method_rows:
        if r["status"] == "ok":
            assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("median_us", "min_us", "max_us", "penalty")), r
            assert r["timing"] == "wall clock" and r["eager_us"] is None, r
        if r["impl"] == "fastpeft":
            assert r["trainable"] > 0 and 0 < r["trainable_pct"] < 100
    train_rows = result["training"]["rows"]
    assert {(r["method"], r["impl"]) for r in train_rows} == {
        (m, i) for m in training.TRAINED for i in ("fastpeft", "peft")}
    for r in train_rows:
        if r["impl"] == "peft" and (not HAS_PEFT or (r["method"] == "qlora" and not HAS_BNB)):
            continue
        assert r["status"] == "ok", r
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("median_us", "min_us", "max_us")), r
    if HAS_MPL:
        assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (out / "plot.png").exists() and "matplotlib is not installed" in std.err


def _check_multi_section(section):
    """Every layer impl in both phases and both libraries' model rows, checked and timed (peft: or
    "not installed"), with the ratios against base and peft. Returns the rows."""
    rows = section["rows"]
    layer_rows = [r for r in rows if r["part"] == "layer"]
    assert {r["impl"] for r in layer_rows} == set(multi.IMPLS) and len({r["phase"] for r in layer_rows}) == 2
    assert {(r["part"], r["impl"]) for r in rows if r["part"] == "model"} == {("model", "fastpeft"), ("model", "peft")}
    for r in rows:
        if r["impl"] == "peft" and not HAS_PEFT:
            assert r["status"] == "not installed" and r["median_us"] is None
            continue
        assert r["status"] == "ok", r
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("median_us", "min_us", "max_us")), r
        assert r["min_us"] <= r["median_us"] <= r["max_us"] and r["samples"] >= 5
        assert r["timing"] == "wall clock"
        assert (r["vs_base"] is not None) == (r["part"] == "layer")
        assert (r["vs_peft"] is not None) == HAS_PEFT
        assert (r["bytes"] is not None and r["bytes"] > 0) == (r["part"] == "layer")
        assert r["gbps"] is None and r["copy_frac"] is None  # bandwidth: CUDA only
    assert section["copy_gbps"] is None
    return rows


def _check_nf4_section(section):
    """Every (layer, M, impl) row is there with finite numbers (bnb: or "not installed"); on the
    CPU the quantize rows too. Returns (rows, quantize rows)."""
    s = section["shapes"]
    rows = section["rows"]
    assert {(r["layer"], r["m"], r["impl"]) for r in rows} == {
        (f"{o}x{i}", m, impl) for o, i in s["layers"] for m in s["ms"] for impl in nf4.IMPLS}
    for r in rows:
        if r["impl"] == "bnb" and not HAS_BNB:
            assert r["status"] == "not installed" and r["median_us"] is None
            continue
        assert r["status"] == "ok", r
        for key in ("median_us", "min_us", "max_us", "vs_dense", "max_rel_err"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
        assert r["min_us"] <= r["median_us"] <= r["max_us"] and r["samples"] >= 5 and r["bytes"] > 0
        assert (r["vs_nf4"] is not None) == (r["impl"] == "qlora")
        if r["impl"] == "qlora":
            assert math.isfinite(r["vs_nf4"]) and r["vs_nf4"] > 0
        if r["impl"] == "dense":
            assert r["vs_dense"] == 1.0
        assert r["gbps"] is None and r["copy_frac"] is None  # bandwidth: CUDA only
        assert r["timing"] == "wall clock" and r["timing_note"] is None
    quant = section["quantize"]
    assert [r["impl"] for r in quant] == ["fastpeft", "bnb"] * len(s["layers"])
    for r in quant:
        if r["impl"] == "bnb" and not HAS_BNB:
            assert r["status"] == "not installed" and r["median_us"] is None
            continue
        assert r["status"] == "ok", r
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("median_us", "min_us", "max_us")), r
        assert r["vs_bnb"] is not None and math.isfinite(r["vs_bnb"])
    return rows, quant


def test_bench_without_bitsandbytes_says_so_never_a_number(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out), "--no-progress",
                 "--sections", "nf4,methods", "--methods", "qlora"]) == 0
    result = json.loads((out / "results.json").read_text())
    bnb_rows = [r for r in result["nf4"]["rows"] + result["nf4"]["quantize"] if r["impl"] == "bnb"]
    assert bnb_rows and all(r["status"] == "not installed" and r["median_us"] is None for r in bnb_rows)
    assert all(r["status"] == "ok" for r in result["nf4"]["rows"] + result["nf4"]["quantize"] if r["impl"] != "bnb")
    qlora = {r["impl"]: r for r in result["methods"]["rows"] if r["method"] == "qlora"}
    assert qlora["fastpeft"]["status"] == "ok" and qlora["fastpeft"]["median_us"] > 0
    if HAS_PEFT:
        assert qlora["peft"]["status"] == "not installed: bitsandbytes" and qlora["peft"]["median_us"] is None
    md = (out / "results.md").read_text()
    assert "| bitsandbytes Linear4bit | not installed |" in md


def test_bench_without_peft_or_matplotlib_says_so_never_a_number(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)        # `import peft` now fails
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    rows = result["kernels"]["rows"] + result["methods"]["rows"] + result["multi"]["rows"]
    peft_rows = [r for r in rows if r["impl"].startswith("peft")]
    assert peft_rows and all(r["status"] == "not installed" and r["median_us"] is None
                             and r.get("penalty", r.get("vs_base")) is None for r in peft_rows)
    md = (out / "results.md").read_text()
    assert "| peft LoraLayer | not installed |" in md and "| lora | peft | not installed |" in md
    assert all(r["status"] == "ok" for r in rows if not r["impl"].startswith("peft"))
    assert all(r["status"] == "ok" for r in result["nf4"]["rows"] if r["impl"] != "bnb" or HAS_BNB)
    assert not (out / "plot.png").exists() and "matplotlib is not installed" in err


def test_bench_stdout_only_without_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick", "--device", "cpu", "--no-progress", "--sections", "kernels"]) == 0
    out = capsys.readouterr().out
    assert "| M | implementation | median µs | min–max µs | penalty | GB/s | % of copy |" in out
    assert "| n/a | n/a |" in out  # no copy bandwidth measured on the CPU
    assert list(tmp_path.iterdir()) == []


def test_bench_one_section_at_a_time_writes_its_outputs(tmp_path, capsys):
    """bench/gpu.sh runs one section per call: a section with nothing to plot (training) still
    writes its JSON and Markdown, and says why there is no plot."""
    out = tmp_path / "training"
    assert main(["bench", "--quick", "--device", "cpu", "--no-progress", "--sections", "training",
                 "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result) & {"kernels", "nf4", "multi", "methods"} == set() and result["training"]["rows"]
    assert (out / "results.md").exists() and not (out / "plot.png").exists()
    if HAS_MPL:
        assert "no plot" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["under_a_file", "is_a_file"])
def test_bench_bad_out_dir_fails_before_timing(tmp_path, capsys, no_timing, kind):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    target = afile / "sub" if kind == "under_a_file" else afile
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(target) in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_cuda_without_cuda_fails_before_timing(capsys, no_timing):
    assert main(["bench", "--quick", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--bogus"], "unrecognized arguments: --bogus"),
    (["bench", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["bench", "--threads", "0"], "--threads must be >= 1"),
    (["bench", "--methods", "lora,nope"], "--methods: unknown ['nope']"),
    (["bench", "--sections", "kernels,gpus"], "--sections: unknown ['gpus']"),
    (["bench", "--methods", "qlora,nope"], "--methods: unknown ['nope']"),
    (["bench", "--model", "/nonexistent/model"], "--model /nonexistent/model: cannot load it"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_exit_nonzero_with_message(capsys, no_timing, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: fastpeft" in capsys.readouterr().err


def _console_script():
    found = Path(sys.executable).with_name("fastpeft")
    return str(found) if found.exists() else shutil.which("fastpeft")


@pytest.mark.parametrize("entry", ["python -m fastpeft", "fastpeft"])
def test_entry_points_run_in_a_subprocess(tmp_path, entry):
    if entry == "fastpeft":
        script = _console_script()
        if script is None:
            pytest.skip("the fastpeft console script is not installed next to this python")
        cmd = [script]
    else:
        cmd = [sys.executable, "-m", "fastpeft"]
    done = subprocess.run(cmd + ["info"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert "device:" in done.stdout and "backend:" in done.stdout
    bad = subprocess.run(cmd + ["bench", "--bogus"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ))
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
