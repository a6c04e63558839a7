"""`fastpeft bench`: the inference latency penalty of an unmerged LoRA linear on this device.

One linear layer y = x W^T + b with a rank-r LoRA (scaling s = lora_alpha / r), timed as:
  base      ``F.linear(x, W, b)``, no adapter: the denominator of every penalty;
  merged    ``F.linear(x, W + s B A, b)``: what merge_and_unload costs (nothing, if it can merge);
  eager     ``F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)``: PEFT's unfused recipe, inline;
  peft      real PEFT's ``LoraLayer`` (peft.get_peft_model on a one-Linear module, PEFT's
            defaults), the peer; "not installed" when peft is missing, never a made-up number;
  fastpeft  ``fastpeft.ops.lora_linear``, on the backend ops picks for the device.
Each output is checked against an fp32 reference before it is timed; a wrong or failing
implementation gets a status instead of a number.

Timing. CUDA: `triton.testing.do_bench` (warm-up excluded, L2 flushed before each run, CUDA
events: device time), median and min-max; plus a host wall clock per call over back-to-back
calls, which includes the launch overhead that device time hides. CPU: repeated
`time.perf_counter` samples (calls batched so a sample lasts >= ~1 ms), median and min-max.
The penalty is an implementation's median over base's median at the same M, same run.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["BenchError", "Shapes", "shapes_for", "check_device", "prepare_out", "run",
           "format_table", "write_outputs", "package_versions", "describe_device", "ops_backend"]

PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes")
IMPLS = ("base", "merged", "eager", "peft", "fastpeft")
LABELS = {
    "base": "base F.linear",
    "merged": "merged W+sBA",
    "eager": "eager unfused (PEFT recipe)",
    "peft": "peft LoraLayer",
    "fastpeft": "fastpeft ops.lora_linear",
}


class BenchError(Exception):
    """Bad input found before any timing starts (the CLI prints it and exits non-zero)."""


# --------------------------------------------------------------------------- environment

def package_versions() -> dict[str, str]:
    """python, fastpeft and each of PACKAGES: the installed version or "not installed".

    Reads package metadata only: importing bitsandbytes or peft here would be slow and noisy.
    """
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("fastpeft",) + PACKAGES[1:]:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(device: str) -> dict:
    """{"type", "name", "summary", ...} for "cpu" or "cuda" (the current CUDA device)."""
    if device == "cuda":
        idx = torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        cc = f"sm_{p.major}{p.minor}"
        gib = p.total_memory / 2**30
        return {"type": "cuda", "index": idx, "name": p.name, "capability": cc,
                "memory_gib": round(gib, 1), "count": torch.cuda.device_count(),
                "summary": f"cuda:{idx} {p.name} ({cc}, {gib:.0f} GiB)"}
    name, cores = _cpu_model(), os.cpu_count()
    return {"type": "cpu", "name": name, "cores": cores, "torch_threads": torch.get_num_threads(),
            "summary": f"cpu {name} ({cores} cores; torch threads: {torch.get_num_threads()})"}


def ops_backend(device: str) -> str:
    """The backend `fastpeft.ops` picks for tensors on `device`, or why it cannot say."""
    try:
        from fastpeft import ops
    except Exception as e:  # noqa: BLE001  (ops may be broken or missing: report, don't crash)
        return f"unknown (fastpeft.ops unavailable: {type(e).__name__}: {e})"
    try:
        return ops.resolve_backend(torch.empty(0, device=device))
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__}: {e})"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- input checks

def check_device(device: str | None) -> str:
    """Resolve None to cuda when available else cpu; raise BenchError for an unusable device."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        why = ("this torch has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise BenchError(f"--device cuda: CUDA is not available ({why}; torch {torch.__version__})")
    return device


def prepare_out(out: str | os.PathLike) -> Path:
    """Create `out` (and parents) and prove it is writable; raise BenchError if not."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise BenchError(f"--out {out}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".fastpeft-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise BenchError(f"--out {out}: cannot create or write the directory ({e.strerror or e})")
    return path


# --------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Shapes:
    """One layer [N, K] with a rank-r adapter, timed at each M (tokens) in `ms`."""
    k: int
    n: int
    r: int
    alpha: float
    ms: tuple[int, ...]
    dtype: str
    budget_s: float  # CPU: seconds of timed samples per (impl, M), all impls sampled in turn

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def shapes_for(device: str, quick: bool) -> Shapes:
    """CUDA: a 4096x4096 bf16 layer, decode M 1/4/16 and prefill 2048. CPU: 1024 wide fp32,
    prefill 256 (the whole run stays under a minute on 2 cores). --quick: tiny, for CI."""
    if quick:
        return Shapes(128, 128, 16, 32.0, (1, 4, 16, 64),
                      "bfloat16" if device == "cuda" else "float32", 0.02)
    if device == "cuda":
        return Shapes(4096, 4096, 16, 32.0, (1, 4, 16, 2048), "bfloat16", 0.0)
    return Shapes(1024, 1024, 16, 32.0, (1, 4, 16, 256), "float32", 0.5)


@dataclass
class Row:
    impl: str
    label: str
    m: int
    status: str = "ok"          # "ok", "not installed", "unavailable: ...", "error: ...", "wrong: ..."
    median_us: float | None = None
    min_us: float | None = None
    max_us: float | None = None
    samples: int | None = None
    penalty: float | None = None        # median / base median at the same M
    wall_us: float | None = None        # CUDA only: host wall clock per back-to-back call
    wall_penalty: float | None = None
    max_rel_err: float | None = None    # max|y - ref| / max|ref| against the fp32 reference


class _Layer:
    """The weights shared by every implementation (seeded, on the device, in the bench dtype)."""

    def __init__(self, s: Shapes, device: str):
        g = torch.Generator(device="cpu").manual_seed(0)
        dt = s.torch_dtype

        def rnd(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

        self.weight = rnd(s.n, s.k, scale=s.k ** -0.5)
        self.bias = rnd(s.n, scale=0.1)
        self.lora_A = rnd(s.r, s.k, scale=s.k ** -0.5)
        self.lora_B = rnd(s.n, s.r, scale=s.r ** -0.5)  # nonzero: a trained adapter, not init
        self.scaling = s.scaling
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        self.merged = (self.weight.float() + delta).to(dt)

    def reference(self, x: torch.Tensor, lora: bool) -> torch.Tensor:
        y = x.float() @ self.weight.float().t() + self.bias.float()
        if lora:
            y = y + self.scaling * ((x.float() @ self.lora_A.float().t()) @ self.lora_B.float().t())
        return y


def _peft_layer(layer: _Layer, s: Shapes, device: str):
    """(layer, status, label): real PEFT's lora.Linear around an nn.Linear holding `layer`'s
    weights, or (None, why, label) when peft is missing or fails."""
    label = LABELS["peft"]
    try:
        import peft
    except ModuleNotFoundError as e:
        if e.name == "peft":
            return None, "not installed", label
        return None, f"unavailable: {type(e).__name__}: {e}", label
    except Exception as e:  # noqa: BLE001  (a broken install is reported, not fatal)
        return None, f"unavailable: {type(e).__name__}: {e}", label
    label = f"{label} {getattr(peft, '__version__', '')}".rstrip()

    class _One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(s.k, s.n, bias=True, device=device, dtype=s.torch_dtype)

        def forward(self, x):
            return self.proj(x)

    try:
        cfg = peft.LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=0.0,
                              target_modules=["proj"], init_lora_weights=False)
        model = peft.get_peft_model(_One(), cfg)  # PEFT's defaults, as a user gets them
        model.eval()
        lin = model.base_model.model.proj
        with torch.no_grad():
            lin.base_layer.weight.copy_(layer.weight)
            lin.base_layer.bias.copy_(layer.bias)
            lin.lora_A["default"].weight.copy_(layer.lora_A)
            lin.lora_B["default"].weight.copy_(layer.lora_B)
        if not math.isclose(lin.scaling["default"], s.scaling):
            return None, f"error: peft scaling {lin.scaling['default']} != {s.scaling}", label
        return lin, "ok", label
    except Exception as e:  # noqa: BLE001
        return None, f"error: {type(e).__name__}: {e}", label


def _impls(layer: _Layer, s: Shapes, device: str) -> dict[str, tuple[Callable | None, str, str]]:
    """impl -> (fn(x) or None, status, label)."""
    W, b, A, B, sc = layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling
    out = {
        "base": (lambda x: F.linear(x, W, b), "ok", LABELS["base"]),
        "merged": (lambda x: F.linear(x, layer.merged, b), "ok", LABELS["merged"]),
        "eager": (lambda x: F.linear(x, W, b) + sc * F.linear(F.linear(x, A), B), "ok",
                  LABELS["eager"]),
    }
    out["peft"] = _peft_layer(layer, s, device)
    try:
        from fastpeft import ops
        backend = ops.resolve_backend(W)
        out["fastpeft"] = (lambda x: ops.lora_linear(x, W, b, A, B, sc), "ok",
                           f"{LABELS['fastpeft']} [{backend}]")
    except Exception as e:  # noqa: BLE001
        out["fastpeft"] = (None, f"unavailable: {type(e).__name__}: {e}", LABELS["fastpeft"])
    return out


# --------------------------------------------------------------------------- timing

def _time_cpu(calls: dict[str, Callable[[], object]],
              budget_s: float) -> dict[str, tuple[float, float, float, int]]:
    """impl -> (median, min, max) seconds per call and the sample count, by wall clock.

    The implementations are sampled in turn (the order rotates every round), so drift and
    noise on a busy machine hit them alike; a sample batches calls to last >= ~1 ms.
    """
    inner = {}
    for name, fn in calls.items():
        fn()
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, int(1e-3 / max(time.perf_counter() - t0, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    rounds, i = 5, 0
    while i < rounds:
        start = time.perf_counter()
        for name in names[i % len(names):] + names[:i % len(names)]:
            fn, k = calls[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            times[name].append((time.perf_counter() - t0) / k)
        if i == 0:  # size the run from the first round
            t_round = max(time.perf_counter() - start, 1e-6)
            rounds = min(200, max(5, int(budget_s * len(calls) / t_round)))
        i += 1
    return {n: (statistics.median(t), min(t), max(t), len(t)) for n, t in times.items()}


def _time_cuda(fn: Callable[[], object], quick: bool) -> tuple[float, float, float, int, float]:
    """(median, min, max) seconds of device time per call by do_bench, a sample-count estimate,
    and the median host wall clock per call over back-to-back calls (launch overhead included)."""
    from triton.testing import do_bench

    warmup, rep = (5, 20) if quick else (25, 100)
    try:
        times = do_bench(fn, warmup=warmup, rep=rep, return_mode="all")
    except (AssertionError, TypeError):  # an older triton without return_mode="all"
        times = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.0, 0.5, 1.0])
    walls = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-6)
    calls = max(10, min(1000, int((0.005 if quick else 0.02) / est)))
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) / calls)
    ms = sorted(times)  # all the samples, or [min, median, max] from the fallback
    return (statistics.median(ms) / 1e3, ms[0] / 1e3, ms[-1] / 1e3,
            len(ms) if len(ms) > 3 else None, statistics.median(walls))


class _Progress:
    """tqdm on stderr when installed, else a plain "[i/n] label" counter on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.i, self.enabled, self.bar = total, 0, enabled, None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc="fastpeft bench", unit="case", file=sys.stderr)
            except ImportError:
                pass

    def step(self, label: str, n: int = 1) -> None:
        if n <= 0:
            return
        self.i += n
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(n)
        elif self.enabled:
            print(f"\r[{self.i}/{self.total}] {label:<40}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


# --------------------------------------------------------------------------- the run

def run(device: str, quick: bool = False, progress: bool = True, threads: int | None = None) -> dict:
    """Time every implementation at every M on `device`; returns the JSON-able result.

    On the CPU, torch runs `threads` intra-op threads (default 1, like torch.utils.benchmark:
    stable and comparable across machines; on small shared VMs extra threads stall for whole
    scheduler ticks); the previous setting is restored afterwards.
    """
    if device != "cpu":
        return _run(device, quick, progress)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    try:
        return _run(device, quick, progress)
    finally:
        torch.set_num_threads(before)


def _run(device: str, quick: bool, progress: bool) -> dict:
    s = shapes_for(device, quick)
    layer = _Layer(s, device)
    impls = _impls(layer, s, device)
    tol = 1e-3 if s.dtype == "float32" else 5e-2
    rows: list[Row] = []
    bar = _Progress(len(s.ms) * len(impls), enabled=progress)
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.inference_mode():
        for m in s.ms:
            x = torch.randn(m, s.k, generator=g).to(device=device, dtype=s.torch_dtype)
            refs = {True: layer.reference(x, lora=True), False: layer.reference(x, lora=False)}
            here = {impl: Row(impl, label, m, status) for impl, (_, status, label) in impls.items()}
            rows.extend(here.values())
            calls = {}
            for impl, (fn, _, _) in impls.items():  # check every output before timing any
                if fn is None:
                    continue
                row = here[impl]
                try:
                    y = fn(x)
                    ref = refs[impl != "base"]
                    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                except Exception as e:  # noqa: BLE001  (one broken impl must not sink the run)
                    row.status = f"error: {type(e).__name__}: {e}"
                    continue
                row.max_rel_err = err
                if not math.isfinite(err) or err > tol:
                    row.status = f"wrong: max rel err {err:.2e} > {tol:.0e}"
                    continue
                calls[impl] = (lambda f: lambda: f(x))(fn)
            stats = {}
            if device == "cuda":
                for impl, call in calls.items():
                    bar.step(f"M={m} {impl}")
                    try:
                        stats[impl] = _time_cuda(call, quick)
                    except Exception as e:  # noqa: BLE001
                        here[impl].status = f"error: {type(e).__name__}: {e}"
                bar.step(f"M={m}", len(impls) - len(calls))
            else:
                stats = _time_cpu(calls, s.budget_s) if calls else {}
                bar.step(f"M={m}", len(impls))
            for impl, st in stats.items():
                row = here[impl]
                row.median_us, row.min_us, row.max_us = st[0] * 1e6, st[1] * 1e6, st[2] * 1e6
                row.samples = st[3]
                if len(st) > 4:
                    row.wall_us = st[4] * 1e6
            base = here["base"]
            for row in here.values():
                if row.median_us is not None and base.median_us:
                    row.penalty = row.median_us / base.median_us
                if row.wall_us is not None and base.wall_us:
                    row.wall_penalty = row.wall_us / base.wall_us
    bar.close()
    return {
        "device": describe_device(device),
        "versions": package_versions(),
        "ops_backend": ops_backend(device),
        "env": {k: os.environ.get(k) for k in ("FASTPEFT_BACKEND", "TRITON_INTERPRET")},
        "quick": quick,
        "shapes": asdict(s),
        "timing": ("triton.testing.do_bench (device time, L2 flushed before each run, warm-up "
                   "excluded) + host wall clock per call over back-to-back calls"
                   if device == "cuda" else
                   "time.perf_counter, warm-up excluded, implementations sampled in turn"),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "rows": [asdict(r) for r in rows],
    }


# --------------------------------------------------------------------------- output

def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec)


def format_table(result: dict) -> str:
    """The compact Markdown table: a header line naming the device and shapes, then one row per
    (M, implementation)."""
    s, dev = result["shapes"], result["device"]
    cuda = dev["type"] == "cuda"
    head = (f"**{dev['summary']}** — LoRA linear {s['n']}x{s['k']}, r={s['r']}, {s['dtype']}, "
            f"torch {result['versions']['torch']}; latency in µs "
            f"({'device time by do_bench' if cuda else 'wall clock'}: median, min–max); "
            "penalty = median / base median")
    cols = ["M", "implementation", "median µs", "min–max µs", "penalty"]
    if cuda:
        cols += ["wall µs/call", "wall penalty"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in result["rows"]:
        if r["median_us"] is None:
            cells = [str(r["m"]), r["label"], r["status"], "—", "—"] + (["—", "—"] if cuda else [])
        else:
            cells = [str(r["m"]), r["label"], _fmt(r["median_us"]),
                     f"{_fmt(r['min_us'])}–{_fmt(r['max_us'])}", _fmt(r["penalty"], ".2f") + "x"]
            if cuda:
                cells += [_fmt(r["wall_us"]), _fmt(r["wall_penalty"], ".2f") + "x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(result: dict) -> str:
    v = result["versions"]
    vers = ", ".join(f"{k} {v[k]}" for k in v)
    return "\n".join([
        "# fastpeft bench: LoRA inference latency penalty", "",
        f"- device: {result['device']['summary']}",
        f"- fastpeft.ops backend on this device: {result['ops_backend']}",
        "- env: " + ", ".join(f"{k}={val or 'unset'}" for k, val in result["env"].items()),
        f"- versions: {vers}",
        f"- timing: {result['timing']}",
        f"- created: {result['created']}" + (" (--quick: tiny shapes, a smoke test)"
                                              if result["quick"] else ""),
        "", format_table(result), "",
        "peft LoraLayer runs with PEFT's defaults (for bf16/fp16 bases it upcasts the adapter "
        "weights to fp32). Rows without numbers say why (not installed, error, wrong output).",
        "",
    ])


def _plot(result: dict, path: Path) -> str | None:
    """Bars of the penalty per implementation, grouped by M. Returns why it was skipped, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipping the plot (pip install -e \".[bench]\")"
    rows = [r for r in result["rows"] if r["impl"] != "base"]
    ms = sorted({r["m"] for r in rows})
    impls = [i for i in IMPLS if i != "base"]
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for j, impl in enumerate(impls):
        vals = [next((r["penalty"] for r in rows if r["impl"] == impl and r["m"] == m), None)
                for m in ms]
        label = next((r["label"] for r in rows if r["impl"] == impl), impl)
        xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(ms))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=label)
        for xpos, v in zip(xs, vals):
            if v is None:  # no number (not installed, error): say so, never draw a value
                ax.text(xpos, 0.05, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    top = max([r["penalty"] for r in rows if r["penalty"] is not None] + [1.0])
    ax.set_ylim(0, top * 1.3)  # headroom for the legend
    ax.set_xticks(range(len(ms)), [f"M={m}" for m in ms])
    ax.set_ylabel("latency / base F.linear (median)")
    s = result["shapes"]
    ax.set_title(f"LoRA latency penalty, {s['n']}x{s['k']} r={s['r']} {s['dtype']}\n"
                 f"{result['device']['summary']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(result: dict, out: Path) -> list[str]:
    """results.json, results.md and plot.png in `out`; returns notes for the user (skips)."""
    notes = []
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(result))
    skipped = _plot(result, out / "plot.png")
    if skipped:
        notes.append(skipped)
    return notes
