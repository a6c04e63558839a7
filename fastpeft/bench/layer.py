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
over base's median at the same M, in the same run.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fastpeft.bench.timing import Progress, time_cpu, time_cuda

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


def steps(quick: bool, device: str) -> int:
    """How many progress steps `run` takes."""
    return len(shapes_for(device, quick).ms) * len(IMPLS)


def run(device: str, quick: bool, bar: Progress) -> dict:
    """Time every implementation at every M: {"shapes", "rows"}."""
    s = shapes_for(device, quick)
    layer = _Layer(s, device)
    impls = _impls(layer, s, device)
    tol = 1e-3 if s.dtype == "float32" else 5e-2
    rows: list[Row] = []
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
                        stats[impl] = time_cuda(call, quick)
                    except Exception as e:  # noqa: BLE001
                        here[impl].status = f"error: {type(e).__name__}: {e}"
                bar.step(f"M={m}", len(impls) - len(calls))
            else:
                stats = time_cpu(calls, s.budget_s) if calls else {}
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
    return {"shapes": asdict(s), "rows": [asdict(r) for r in rows]}
