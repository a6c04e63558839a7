"""The multi section: mixed-adapter batches (`adapter_names=`), fastpeft against real peft.

A service hosting one base model and many customers' adapters runs batches in which every row
uses its own adapter. Two parts, timed in one run on one device:
  layer  one LoRA linear layer [N, K]; `adapters` adapters with ranks cycling through `ranks`,
         row i of the batch on adapter i % adapters; decode (rows of one token) and prefill
         (rows of `seq` tokens):
           base        ``F.linear(x, W, b)``, no adapter;
           single      ``ops.lora_linear``, one adapter of the largest rank for every row: what the
                       batch costs when all rows share one adapter, the bar a mixed batch is held to;
           fastpeft    ``ops.multi_lora_linear`` over a bank holding the batch's adapters;
           registered  the same batch over a bank of `registered` adapters (the batch's spread
                       among them): its cost must not depend on how many are registered;
           peft        real peft's ``lora.Linear`` holding the same adapters, ``adapter_names=``.
  model  a whole model: the tiny Llama of --quick on every device (the issue's CPU case; its GPU
         goals are the layer's, and a 1B model built twice would not fit the section's budget in
         bench/gpu.sh), `model_adapters` adapters r=16 on every linear, `model_rows` rows, a prefill of
         `model_seq` tokens per row and one decode step; fastpeft and peft both through
         ``model(..., adapter_names=...)`` with the same weights (outputs compared first).
Each output is checked against an fp32 reference (layer: computed per adapter here; model: peft's
logits) before anything is timed: a wrong one gets a status, not a number. Ratios: `vs base` =
median / base median (layer), `peft / this` = peft's median / this row's median (how many times
faster than peft). CUDA: do_bench for every row, eager launches included (peft's mixed path
synchronises with the host, so no row is graph-timed here: all are timed alike), and each layer
row's bandwidth: its compulsory bytes (`layer.lora_bytes`, every adapter the batch uses read
once) over the median, as a fraction of a device-to-device copy timed in the same run. CPU: the
rows of a phase are sampled in turn (timing.time_cpu), so noise on a busy machine hits them alike.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fastpeft.bench import layer, timing
from fastpeft.bench.env import Quietly, peer_warnings
from fastpeft.bench.timing import Progress

IMPLS = ("base", "single", "fastpeft", "registered", "peft")


@dataclass(frozen=True)
class Shapes:
    k: int
    n: int
    adapters: int
    ranks: tuple[int, ...]
    registered: int
    decode_rows: int
    prefill: tuple[int, int]  # rows, tokens per row
    model_adapters: int
    model_rows: int
    model_seq: int
    dtype: str
    budget_s: float  # CPU: seconds of samples per phase, all rows sampled in turn

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def shapes_for(device: str, quick: bool) -> Shapes:
    """GPU: the issue's 4096x4096 bf16 layer, 64 tokens over 32 adapters of ranks 8-64, 1000
    registered. CPU: a 1024-wide fp32 layer, and the issue's tiny-Llama case (64 rows, 16
    adapters). --quick: tiny, for the CI smoke test."""
    if quick:
        return Shapes(64, 48, 4, (2, 8), 12, 8, (4, 8), 4, 8, 4, "float32", 0.02)
    if device == "cuda":
        return Shapes(4096, 4096, 32, (8, 16, 32, 64), 1000, 64, (8, 128), 16, 64, 16, "bfloat16", 0.0)
    return Shapes(1024, 1024, 32, (8, 16, 32, 64), 1000, 64, (8, 128), 16, 64, 16, "float32", 0.5)


@dataclass
class Row(timing.Timed):
    part: str  # "layer" or "model"
    phase: str  # "decode RxT" / "prefill RxT": rows x tokens per row
    impl: str
    label: str
    timing: str | None = None
    vs_base: float | None = None
    vs_peft: float | None = None  # peft's median / this median
    bytes: int | None = None  # layer rows: compulsory bytes (layer.lora_bytes, each adapter's factors once)
    gbps: float | None = None  # CUDA only: bytes / median, and that over a device-to-device copy's
    copy_frac: float | None = None


def steps(quick: bool) -> int:
    return 2 * len(IMPLS) + 2 * 2


def make_adapters(s: Shapes, count: int, device: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """`count` adapters (A [r, K], B [N, r], scaling 2.0), ranks cycling through s.ranks, nonzero;
    drawn on `device` (1000 adapters of a 4096-wide layer are ~1 GB: not worth a host detour)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(count):
        r = s.ranks[i % len(s.ranks)]
        a = torch.randn(r, s.k, generator=g, device=device) * s.k ** -0.5
        b = torch.randn(s.n, r, generator=g, device=device) * r ** -0.5
        out.append((a.to(s.torch_dtype), b.to(s.torch_dtype), 2.0))
    return out


def make_bank(s: Shapes, adapters: list, device: str):
    from fastpeft.multi import AdapterBank

    bank = AdapterBank(s.k, s.n, s.torch_dtype, device)
    for i, (a, b, scaling) in enumerate(adapters):
        bank.add(i, a, b, scaling)
    return bank


def peft_mixed_layer(s: Shapes, weight, bias, adapters, device: str) -> tuple[Callable | None, str, str, int]:
    """(fn(x, names), status, label, bytes per element of its LoRA factors): real peft's
    lora.Linear holding `adapters` as a0, a1, ... (peft keeps its own factor dtype)."""
    try:
        import peft
    except ModuleNotFoundError as e:
        return None, "not installed" if e.name == "peft" else f"unavailable: {e}", "peft", 0
    label = f"peft {peft.__version__} lora.Linear, adapter_names="

    class _One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(s.k, s.n, device=device, dtype=s.torch_dtype)

        def forward(self, x):
            return self.proj(x)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = None
            for i, (a, b, scaling) in enumerate(adapters):
                cfg = peft.LoraConfig(r=a.shape[0], lora_alpha=scaling * a.shape[0], target_modules=["proj"])
                if model is None:
                    model = peft.get_peft_model(_One(), cfg, adapter_name="a0")
                else:
                    model.add_adapter(f"a{i}", cfg)
        lin = model.base_model.model.proj
        with torch.no_grad():
            lin.base_layer.weight.copy_(weight)
            lin.base_layer.bias.copy_(bias)
            for i, (a, b, _) in enumerate(adapters):
                lin.lora_A[f"a{i}"].weight.copy_(a)
                lin.lora_B[f"a{i}"].weight.copy_(b)
        model.eval()
        elt = lin.lora_A["a0"].weight.element_size()
        return (lambda x, names: model(x, adapter_names=names)), "ok", label, elt
    except Exception as e:  # noqa: BLE001  (a peer that fails is reported, not fatal)
        return None, f"error: {type(e).__name__}: {e}", label, 0


def _reference(x, weight, bias, adapters, ids: list[int] | None) -> torch.Tensor:
    """fp32 y = x W^T + b + s (x A^T) B^T, row i of x [rows, T, K] on adapter ids[i] (None: none)."""
    y = F.linear(x.float(), weight.float(), bias.float())
    for i in set(ids or ()):
        rows = [m for m, j in enumerate(ids) if j == i]
        a, b, scaling = adapters[i]
        y[rows] += scaling * F.linear(F.linear(x[rows].float(), a.float()), b.float())
    return y


def _time(device: str, calls: dict, budget_s: float, quick: bool, rows: dict, bar: Progress, label: str):
    if device == "cuda":
        for key, fn in calls.items():
            bar.step(f"{label} {key}")
            rows[key].timing = timing.DO_BENCH
            rows[key].set_times(timing.time_cuda(fn, quick))
        bar.step(label, len(rows) - len(calls))
        return
    for key, st in timing.time_cpu(calls, budget_s).items():
        rows[key].timing = timing.WALL
        rows[key].set_times(st)
    bar.step(label, len(rows))


def _ratios(rows: dict) -> None:
    base, peft = rows.get("base"), rows.get("peft")
    for row in rows.values():
        if row.median_us is None:
            continue
        if base is not None and base.median_us:
            row.vs_base = row.median_us / base.median_us
        if peft is not None and peft.median_us:
            row.vs_peft = peft.median_us / row.median_us


def _layer_part(s: Shapes, device: str, quick: bool, bar: Progress, copy_bw: float | None) -> list[Row]:
    from fastpeft import ops
    from fastpeft.multi import TokenGroups

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(s.n, s.k, generator=g) * s.k ** -0.5).to(device, s.torch_dtype)
    bias = (torch.randn(s.n, generator=g) * 0.1).to(device, s.torch_dtype)
    adapters = make_adapters(s, s.adapters, device, seed=1)
    bank = make_bank(s, adapters, device)
    # the batch's adapters at ids spread over a bank of `registered` (the others: random, unused)
    stride = s.registered // s.adapters
    others = iter(make_adapters(s, s.registered - s.adapters, device, seed=2))
    big = make_bank(s, [adapters[i // stride] if i % stride == 0 and i // stride < s.adapters else next(others)
                    for i in range(s.registered)], device)
    top = max(range(s.adapters), key=lambda i: adapters[i][0].shape[0])
    a1, b1, sc1 = adapters[top]
    peft_fn, peft_status, peft_label, peft_elt = peft_mixed_layer(s, weight, bias, adapters, device)
    elt = s.torch_dtype.itemsize
    labels = {
        "base": "base F.linear",
        "single": f"fastpeft ops.lora_linear, one adapter r={a1.shape[0]}",
        "fastpeft": f"fastpeft ops.multi_lora_linear, {s.adapters} adapters r={'/'.join(map(str, s.ranks))}",
        "registered": f"fastpeft ops.multi_lora_linear, the same batch among {s.registered} registered",
        "peft": peft_label,
    }
    tol = 1e-4 if s.dtype == "float32" else 3e-2
    out = []
    for phase, rows_n, seq in (("decode", s.decode_rows, 1), ("prefill", *s.prefill)):
        name = f"{phase} {rows_n}x{seq}"
        ids = [i % s.adapters for i in range(rows_n)]
        x = torch.randn(rows_n, seq, s.k, generator=g).to(device, s.torch_dtype)
        groups = TokenGroups(ids, seq, device)
        big_groups = TokenGroups([i * stride for i in ids], seq, device)
        names = [f"a{i}" for i in ids]
        batch_rank = sum(adapters[i][0].shape[0] for i in set(ids))  # each adapter's factors read once
        factors = {"base": (0, None), "single": (a1.shape[0], elt), "fastpeft": (batch_rank, elt),
                   "registered": (batch_rank, elt), "peft": (batch_rank, peft_elt)}
        fns = {
            "base": (lambda: F.linear(x, weight, bias), None),
            "single": (lambda: ops.lora_linear(x, weight, bias, a1, b1, sc1), [top] * rows_n),
            "fastpeft": (lambda: ops.multi_lora_linear(x, weight, bias, bank, groups), ids),
            "registered": (lambda: ops.multi_lora_linear(x, weight, bias, big, big_groups), ids),
            "peft": (None if peft_fn is None else (lambda: peft_fn(x, names)), ids),
        }
        here = {impl: Row("layer", name, impl, labels[impl], status="ok" if impl != "peft" else peft_status)
                for impl in IMPLS}
        calls = {}
        with torch.inference_mode():
            for impl, (fn, row_ids) in fns.items():
                if fn is None:
                    continue
                try:
                    err = timing.rel_err(fn(), _reference(x, weight, bias, adapters, row_ids))
                    if not err <= tol:
                        here[impl].status = f"wrong output: max rel err {err:.1e}"
                        continue
                    calls[impl] = fn
                except Exception as e:  # noqa: BLE001
                    here[impl].status = f"error: {type(e).__name__}: {e}"
            _time(device, calls, s.budget_s, quick, here, bar, name)
        _ratios(here)
        for impl, row in here.items():
            rank, lora_elt = factors[impl]
            row.bytes = layer.lora_bytes(rows_n * seq, s.k, s.n, rank, elt, lora_elt)
            row.gbps, row.copy_frac = timing.bandwidth(row.bytes, row.median_us, copy_bw)
        out.extend(here.values())
    return out


def _model_part(s: Shapes, device: str, quick: bool, bar: Progress) -> list[Row]:
    import fastpeft
    from fastpeft.bench import methods

    base = methods.load_model(None, device, quick=True)
    names = ["default"] + [f"mix{i}" for i in range(1, s.model_adapters)]
    libs: dict[str, object] = {"fastpeft": fastpeft}
    try:
        import peft
        libs["peft"] = peft
    except ModuleNotFoundError:
        pass
    models = {}
    for impl, lib in libs.items():
        def config(lib=lib):
            return lib.LoraConfig(r=16, lora_alpha=32, target_modules=methods.LLAMA_LINEARS, init_lora_weights=False)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = lib.get_peft_model(copy.deepcopy(base), config())
            for name in names[1:]:
                model.add_adapter(name, config())
        models[impl] = model.eval()
    if "peft" in models:  # the same adapters in both: PEFT's state-dict names are ours
        models["peft"].load_state_dict(models["fastpeft"].state_dict(), strict=False)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, base.config.vocab_size, (s.model_rows, s.model_seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    out = []
    for phase, make in (("prefill", methods._prefill_fn), ("decode", methods._Decode)):
        name = f"{phase} {s.model_rows}x{s.model_seq if phase == 'prefill' else 1}"
        here = {impl: Row("model", name, impl, f"{impl} model(..., adapter_names=) [{s.model_adapters} adapters, "
                          "r=16, all linears]") for impl in ("fastpeft", "peft")}
        if "peft" not in models:
            here["peft"].status = "not installed"
        calls, logits = {}, {}
        with torch.inference_mode():
            for impl, model in models.items():
                try:
                    if impl == "peft":
                        with peer_warnings():
                            calls[impl] = Quietly(make(model, ids, mask, names))
                    else:
                        calls[impl] = make(model, ids, mask, names)
                    y = calls[impl]()
                    logits[impl] = y if isinstance(y, torch.Tensor) else y.logits
                except Exception as e:  # noqa: BLE001
                    here[impl].status = f"error: {type(e).__name__}: {e}"
                    calls.pop(impl, None)
            if "fastpeft" in calls and "peft" in calls:
                err = timing.rel_err(logits["fastpeft"], logits["peft"])
                if not err <= (1e-4 if base.dtype == torch.float32 else 3e-2):
                    here["fastpeft"].status = f"wrong output: max rel err {err:.1e} vs peft"
                    del calls["fastpeft"]
            _time(device, calls, s.budget_s, quick, here, bar, f"model {name}")
        _ratios(here)
        out.extend(here.values())
    return out


def run(device: str, quick: bool, bar: Progress) -> dict:
    """{"shapes", "rows"}: the layer part's rows, then the model part's."""
    s = shapes_for(device, quick)
    copy_bw = timing.copy_gbps(device, quick)
    rows = _layer_part(s, device, quick, bar, copy_bw) + _model_part(s, device, quick, bar)
    return {"shapes": asdict(s), "copy_gbps": copy_bw, "rows": [asdict(r) for r in rows]}
