"""The kernel section: one LoRA linear layer, unmerged, against its base GEMM and its peers.

One linear layer y = x W^T + b with a rank-r LoRA (scaling s = lora_alpha / r), timed as:
  base      ``F.linear(x, W, b)``, no adapter: the denominator of every penalty;
  merged    ``F.linear(x, W + s B A, b)``: what merge_and_unload costs (nothing, if it can merge);
  eager     ``F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)``: PEFT's unfused recipe, inline;
  peft      real PEFT's ``LoraLayer`` (peft.get_peft_model on a one-Linear module, PEFT's
            defaults), the peer; "not installed" when peft is missing, never a made-up number;
  fastpeft  ``fastpeft.ops.lora_linear``, on the backend ops picks for the device.
Each output is checked against an fp32 reference before it is timed; a wrong or failing
implementation gets a status instead of a number. The penalty is an implementation's median
over base's median at the same M, in the same run, timed the same way (`timing`).

On CUDA, decode rows (M <= 16) are timed from replays of a captured CUDA graph, cycling through
rotated copies of the weights so each call reads them from HBM (timing.time_cuda_graph); larger
M by do_bench. A row whose graph fails is timed by do_bench and its `timing_note` says why. Every
CUDA row keeps the host wall clock of eager back-to-back calls: the launch cost a caller pays
without graphs. Each CUDA row also gets its effective bandwidth (`lora_bytes` over the median)
and that as a fraction of a device-to-device copy timed in the same run (timing.copy_gbps).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fastpeft.bench import timing
from fastpeft.bench.timing import Progress, time_cpu

IMPLS = ("base", "merged", "eager", "peft", "fastpeft")
LABELS = {
    "base": "base F.linear",
    "merged": "merged W+sBA",
    "eager": "eager unfused (PEFT recipe)",
    "peft": "peft LoraLayer",
    "fastpeft": "fastpeft ops.lora_linear",
}


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
class Row(timing.Timed):  # status: "ok", "not installed", "unavailable: ...", "error: ...", "wrong: ..."
    impl: str
    label: str
    m: int
    penalty: float | None = None        # median / base median at the same M
    wall_us: float | None = None        # CUDA only: host wall clock per back-to-back call
    wall_penalty: float | None = None
    max_rel_err: float | None = None    # max|y - ref| / max|ref| against the fp32 reference
    timing: str | None = None           # how median_us was measured: timing.GRAPH, DO_BENCH or WALL
    timing_note: str | None = None      # why a row meant for a CUDA graph was timed otherwise
    bytes: int | None = None            # compulsory bytes moved (lora_bytes)
    gbps: float | None = None           # CUDA only: bytes / median
    copy_frac: float | None = None      # CUDA only: gbps / device-to-device copy GB/s


def lora_bytes(m: int, k: int, n: int, r: int, elt: int, lora_elt: int | None) -> int:
    """Compulsory bytes of one call y = x W^T + b (+ s (x A^T) B^T) at M = m: the weight [n, k]
    (base's, or merged's W + sBA) and bias [n] read once, x [m, k] read once, y [m, n] written
    once, in `elt` bytes each; with `lora_elt` (the impl holds LoRA factors) A [r, k] and B [n, r]
    read once, in the bytes of the dtype that impl keeps them in (peft upcasts them to fp32 for a
    bf16 base). Intermediates (the [m, r] product, eager's extra passes over [m, n]) are not
    counted: the work an implementation adds shows as a lower fraction of the copy bandwidth."""
    dense = (n * k + n + m * k + m * n) * elt
    return dense + ((r * k + n * r) * lora_elt if lora_elt else 0)


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

    def clone(self) -> "_Layer":
        """The same weights at new addresses: a rotated copy for CUDA-graph timing."""
        twin = copy.copy(self)
        for name in ("weight", "bias", "lora_A", "lora_B", "merged"):
            setattr(twin, name, getattr(self, name).clone())
        return twin

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


@dataclass
class _Impl:
    fn: Callable | None  # fn(x) -> y, None when there is nothing to time (`status` says why)
    status: str
    label: str
    lora_elt: int | None = None  # bytes per element of the LoRA factors it reads (None: none)


def _impls(layer: _Layer, s: Shapes, device: str) -> dict[str, _Impl]:
    W, b, A, B, sc = layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling
    elt = A.element_size()
    out = {
        "base": _Impl(lambda x: F.linear(x, W, b), "ok", LABELS["base"]),
        "merged": _Impl(lambda x: F.linear(x, layer.merged, b), "ok", LABELS["merged"]),
        "eager": _Impl(lambda x: F.linear(x, W, b) + sc * F.linear(F.linear(x, A), B), "ok",
                       LABELS["eager"], elt),
    }
    lin, status, label = _peft_layer(layer, s, device)
    out["peft"] = _Impl(lin, status, label,
                        None if lin is None else lin.lora_A["default"].weight.element_size())
    try:
        from fastpeft import ops
        backend = ops.resolve_backend(W)
        out["fastpeft"] = _Impl(lambda x: ops.lora_linear(x, W, b, A, B, sc), "ok",
                                f"{LABELS['fastpeft']} [{backend}]", elt)
    except Exception as e:  # noqa: BLE001
        out["fastpeft"] = _Impl(None, f"unavailable: {type(e).__name__}: {e}", LABELS["fastpeft"])
    return out


def steps(quick: bool, device: str) -> int:
    """How many progress steps `run` takes."""
    return len(shapes_for(device, quick).ms) * len(IMPLS)


def _copies(layer: _Layer, s: Shapes, device: str) -> list[dict[str, _Impl]]:
    """Every impl on each rotated copy of the weights: enough copies that CUDA-graph replays
    read them from HBM (timing.rotations); one on the CPU, where no row is graph-timed."""
    if timing.GRAPH not in {timing.timing_mode(device, m) for m in s.ms}:
        return [_impls(layer, s, device)]
    n = timing.rotations(s.n * s.k * s.torch_dtype.itemsize, timing.l2_bytes())
    layers = [layer] + [layer.clone() for _ in range(n - 1)]
    return [_impls(one, s, device) for one in layers]


def _time_cuda(calls, here, m, quick, bar, tol, refs) -> dict:
    """impl -> time_cuda tuple, each in M's timing mode; notes and failures go on the rows."""
    mode = timing.timing_mode("cuda", m)
    stats = {}
    for impl, fns in calls.items():
        bar.step(f"M={m} {impl}")
        row = here[impl]
        try:
            stats[impl], row.timing, row.timing_note = timing.time_cuda_as(
                mode, fns, quick, timing.replay_check(refs[impl != "base"], tol))
        except Exception as e:  # noqa: BLE001
            row.status = f"error: {type(e).__name__}: {e}"
    return stats


def run(device: str, quick: bool, bar: Progress) -> dict:
    """Time every implementation at every M: {"shapes", "copy_gbps", "rows"}."""
    s = shapes_for(device, quick)
    copy_bw = timing.copy_gbps(device, quick)
    layer = _Layer(s, device)
    copies = _copies(layer, s, device)
    impls = copies[0]
    elt = s.torch_dtype.itemsize
    tol = 1e-3 if s.dtype == "float32" else 5e-2
    rows: list[Row] = []
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.inference_mode():
        for m in s.ms:
            x = torch.randn(m, s.k, generator=g).to(device=device, dtype=s.torch_dtype)
            refs = {True: layer.reference(x, lora=True), False: layer.reference(x, lora=False)}
            here = {impl: Row(impl, it.label, m, status=it.status) for impl, it in impls.items()}
            rows.extend(here.values())
            calls = {}
            for impl, it in impls.items():  # check every output before timing any
                ref = refs[impl != "base"]
                if it.fn is None or not timing.check_output(here[impl], lambda: it.fn(x), ref, tol):
                    continue
                calls[impl] = [(lambda f: lambda: f(x))(c[impl].fn) for c in copies]
            if device == "cuda":
                stats = _time_cuda(calls, here, m, quick, bar, tol, refs)
                bar.step(f"M={m}", len(impls) - len(calls))
            else:
                stats = time_cpu({impl: fns[0] for impl, fns in calls.items()}, s.budget_s) if calls else {}
                for impl in stats:
                    here[impl].timing = timing.WALL
                bar.step(f"M={m}", len(impls))
            for impl, st in stats.items():
                row = here[impl]
                row.set_times(st)
                if len(st) > 4:
                    row.wall_us = st[4] * 1e6
                row.bytes = lora_bytes(m, s.k, s.n, s.r, elt, impls[impl].lora_elt)
                row.gbps, row.copy_frac = timing.bandwidth(row.bytes, row.median_us, copy_bw)
            base = here["base"]
            for row in here.values():
                row.penalty = timing.penalty(row, base)
                if row.wall_us is not None and base.wall_us:
                    row.wall_penalty = row.wall_us / base.wall_us
    return {"shapes": asdict(s), "copy_gbps": copy_bw, "rows": [asdict(r) for r in rows]}
