"""The NF4 section: one 4-bit layer (QLoRA's base) against its dense and 4-bit peers.

One linear layer W [out, in] (no bias, as in Llama), quantized to NF4 by fastpeft (blocksize 64,
double quant), timed at decode and prefill M as:
  dense     ``F.linear(x, W16)`` with W16 the same weight dequantized to the bench dtype: the
            full-precision layer the 4-bit one replaces, the denominator of "vs dense";
  dequant   ``F.linear(x, ops.nf4_dequantize(Wq))``: dequantize-then-matmul, every call;
  bnb       ``bitsandbytes.nn.Linear4bit`` holding the very same codes (loaded from the fastpeft
            layer's bnb-format state dict), in eval mode as a user runs it; "not installed"
            when bitsandbytes is missing, never a made-up number;
  fastpeft  ``ops.nf4_linear(x, Wq)``: the fused dequant-matmul (split-K decode path for M <= 16;
            on the CPU kernels/nf4_cpu.py: a compiled GEMV at M = 1, L2-sized tiles, one GEMM);
  qlora     ``ops.nf4_linear(x, Wq, None, A, B, s)`` with r = 16: the QLoRA layer in one launch,
            also reported against fastpeft's bare NF4 kernel ("vs NF4 base").
Every output is checked against an fp32 reference (x @ dequant(Wq)^T, + the LoRA term) before it
is timed. On CUDA, decode rows (M <= 16) are timed from replays of a captured CUDA graph over
rotated copies of the layer (each call reads its weight from HBM), larger M by do_bench; a row
whose graph fails is timed by do_bench and says why (`timing_note`), and every CUDA row keeps
the host wall clock of eager calls. Each CUDA row also gets its effective bandwidth: the
compulsory bytes (the weight as stored, x, y, and A, B for qlora) over the median time, and that
as a fraction of a device-to-device copy (timing.copy_gbps) timed in the same run.
On the CPU the section also times NF4 quantization, fastpeft against bitsandbytes' CPU backend,
after checking that both produce the same codes.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fastpeft.bench import timing
from fastpeft.bench.timing import Progress, time_cpu

IMPLS = ("dense", "dequant", "bnb", "fastpeft", "qlora")
QUANT_IMPLS = ("fastpeft", "bnb")
LABELS = {
    "dense": "dense F.linear",
    "dequant": "dequantize, then F.linear",
    "bnb": "bitsandbytes Linear4bit",
    "fastpeft": "fastpeft ops.nf4_linear",
    "qlora": "fastpeft QLoRA (NF4 + LoRA fused)",
}


@dataclass(frozen=True)
class NF4Shapes:
    """Layers (out, in), each timed at each M in `ms` (or in its own entry of `layer_ms`);
    LoRA rank r for the qlora row."""
    layers: tuple[tuple[int, int], ...]
    ms: tuple[int, ...]
    r: int
    alpha: float
    blocksize: int
    dtype: str
    budget_s: float  # CPU: seconds of timed samples per (impl, M), all impls sampled in turn
    layer_ms: tuple[tuple[int, ...], ...] | None = None

    def ms_of(self, i: int) -> tuple[int, ...]:
        return self.ms if self.layer_ms is None else self.layer_ms[i]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def shapes_for(device: str, quick: bool) -> NF4Shapes:
    """CUDA: Llama-3-8B's 4096x4096 (q/o_proj) and up_proj (out 14336, in 4096), bf16, decode M 1
    and 16, prefill 2048. CPU: fp32 (bnb's CPU backend computes in fp32 too), 1024 wide at M 1, 16
    and 256, and the 4096x4096 layer of issue 17's CPU goals at decode (M 1) and prefill (M 2048).
    --quick: tiny."""
    if quick:
        return NF4Shapes(((128, 128),), (1, 16, 64), 16, 32.0, 64,
                         "bfloat16" if device == "cuda" else "float32", 0.02)
    if device == "cuda":
        return NF4Shapes(((4096, 4096), (14336, 4096)), (1, 16, 2048), 16, 32.0, 64, "bfloat16", 0.0)
    return NF4Shapes(((1024, 1024), (4096, 4096)), (1, 16, 256), 16, 32.0, 64, "float32", 0.3,
                     ((1, 16, 256), (1, 2048)))


@dataclass
class Row(timing.Timed):  # status: "ok", "not installed", "unavailable: ...", "error: ...", "wrong: ..."
    layer: str  # "out x in"
    m: int
    impl: str
    label: str
    vs_dense: float | None = None   # median / dense median at the same layer and M
    vs_nf4: float | None = None     # qlora only: median / fastpeft's bare NF4 median
    wall_us: float | None = None    # CUDA only: host wall clock per back-to-back call
    bytes: int | None = None        # compulsory bytes moved (weight as stored, x, y, LoRA)
    gbps: float | None = None       # CUDA only: bytes / median
    copy_frac: float | None = None  # CUDA only: gbps / device-to-device copy GB/s
    max_rel_err: float | None = None
    timing: str | None = None       # how median_us was measured: timing.GRAPH, DO_BENCH or WALL
    timing_note: str | None = None  # why a row meant for a CUDA graph was timed otherwise


@dataclass
class QuantRow(timing.Timed):
    layer: str
    impl: str
    label: str
    vs_bnb: float | None = None


def _import_bnb():
    """(bitsandbytes or None, status, version label)."""
    try:
        import bitsandbytes as bnb
    except ModuleNotFoundError as e:
        if e.name == "bitsandbytes":
            return None, "not installed", ""
        return None, f"unavailable: {type(e).__name__}: {e}", ""
    except Exception as e:  # noqa: BLE001  (a broken install is reported, not fatal)
        return None, f"unavailable: {type(e).__name__}: {e}", ""
    return bnb, "ok", getattr(bnb, "__version__", "")


def bnb_linear4bit(bnb, layer, compute_dtype: torch.dtype):
    """A `bitsandbytes.nn.Linear4bit` (nf4) holding the codes of a fastpeft `Linear4bit`: loaded
    from its bnb-format state dict, as transformers loads a prequantized checkpoint."""
    sd = layer.state_dict()
    device = layer.weight.device
    theirs = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               compute_dtype=compute_dtype, quant_type="nf4", device="meta")
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device=device, module=theirs)
    if layer.bias is not None:
        theirs.bias = torch.nn.Parameter(sd["bias"].to(compute_dtype), requires_grad=False)
    return theirs.eval()


def to_bnb_model(model: torch.nn.Module, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Swap every fastpeft `Linear4bit` of `model` for a bitsandbytes one with the same codes, in
    place (the peer of a fastpeft-quantized model: identical 4-bit weights); returns `model`."""
    import bitsandbytes as bnb

    from fastpeft.quant.nf4 import Linear4bit

    swaps = [(name, bnb_linear4bit(bnb, m, compute_dtype)) for name, m in model.named_modules()
             if isinstance(m, Linear4bit)]
    for name, layer in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model


class _NF4Layer:
    """One quantized layer and everything the implementations share (seeded, on the device)."""

    def __init__(self, s: NF4Shapes, out_f: int, in_f: int, device: str):
        from fastpeft import ops
        from fastpeft.quant.nf4 import Linear4bit, NF4Config

        g = torch.Generator(device="cpu").manual_seed(0)
        dt = s.torch_dtype
        linear = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
        linear.weight = torch.nn.Parameter((torch.randn(out_f, in_f, generator=g) * in_f ** -0.5).to(device, dt),
                                           requires_grad=False)
        self.module = Linear4bit.from_linear(linear, NF4Config(s.blocksize, True, dt))
        self.qweight = self.module.nf4_weight()
        self.weight32 = ops.nf4_dequantize(self.qweight, torch.float32)
        self.dense = ops.nf4_dequantize(self.qweight, dt)
        self.lora_A = (torch.randn(s.r, in_f, generator=g) * in_f ** -0.5).to(device, dt)
        self.lora_B = (torch.randn(out_f, s.r, generator=g) * s.r ** -0.5).to(device, dt)  # trained, not init
        self.scaling = s.alpha / s.r
        self.stored_bytes = sum(t.numel() * t.element_size() for t in (
            self.module.weight, self.module.absmax, self.module.quant_map, self.module.nested_absmax,
            self.module.nested_quant_map, self.module.offset) if t is not None)

    def clone(self) -> "_NF4Layer":
        """The same codes and factors at new addresses: a rotated copy for CUDA-graph timing."""
        twin = copy.copy(self)
        twin.module = copy.deepcopy(self.module)
        twin.qweight = twin.module.nf4_weight()
        twin.dense, twin.lora_A, twin.lora_B = self.dense.clone(), self.lora_A.clone(), self.lora_B.clone()
        return twin

    def reference(self, x: torch.Tensor, lora: bool) -> torch.Tensor:
        y = x.float() @ self.weight32.t()
        if lora:
            y = y + self.scaling * ((x.float() @ self.lora_A.float().t()) @ self.lora_B.float().t())
        return y

    def bytes_moved(self, impl: str, m: int, elt: int) -> int:
        n, k = self.qweight.shape
        weight = n * k * elt if impl == "dense" else self.stored_bytes
        lora = (self.lora_A.numel() + self.lora_B.numel()) * elt if impl == "qlora" else 0
        return weight + m * (k + n) * elt + lora


def _impls(layer: _NF4Layer, s: NF4Shapes) -> dict[str, tuple[Callable | None, str, str]]:
    """impl -> (fn(x) or None, status, label)."""
    from fastpeft import ops

    qw, dt, A, B, sc = layer.qweight, s.torch_dtype, layer.lora_A, layer.lora_B, layer.scaling
    backend = ops.resolve_backend(layer.dense)
    out = {
        "dense": (lambda x: F.linear(x, layer.dense), "ok", f"{LABELS['dense']} ({s.dtype})"),
        "dequant": (lambda x: F.linear(x, ops.nf4_dequantize(qw, dt)), "ok", f"{LABELS['dequant']} [{backend}]"),
    }
    bnb, status, version = _import_bnb()
    label = f"{LABELS['bnb']} {version}".rstrip()
    if bnb is None:
        out["bnb"] = (None, status, label)
    else:
        try:
            out["bnb"] = (bnb_linear4bit(bnb, layer.module, dt), "ok", label)
        except Exception as e:  # noqa: BLE001
            out["bnb"] = (None, f"error: {type(e).__name__}: {e}", label)
    out["fastpeft"] = (lambda x: ops.nf4_linear(x, qw), "ok", f"{LABELS['fastpeft']} [{backend}]")
    out["qlora"] = (lambda x: ops.nf4_linear(x, qw, None, A, B, sc), "ok",
                    f"{LABELS['qlora']} r={s.r} [{backend}]")
    return out


def _tolerance(impl: str, dtype: str) -> float:
    """Max relative error accepted: a few ulps of the bench dtype; bitsandbytes' CPU inference
    path computes in bf16 whatever the compute dtype, so its row gets bf16's tolerance."""
    if dtype == "float32" and impl != "bnb":
        return 1e-3
    return 5e-2


def steps(quick: bool, device: str) -> int:
    s = shapes_for(device, quick)
    return sum(len(s.ms_of(i)) * len(IMPLS) + (len(QUANT_IMPLS) if device == "cpu" else 0)
               for i in range(len(s.layers)))


def _copies(layer: _NF4Layer, s: NF4Shapes, device: str) -> list[dict]:
    """Every impl on each rotated copy of the layer: enough copies that CUDA-graph replays read
    the 4-bit weight from HBM (timing.rotations); one on the CPU, where no row is graph-timed."""
    if timing.GRAPH not in {timing.timing_mode(device, m) for m in set().union(*map(s.ms_of, range(len(s.layers))))}:
        return [_impls(layer, s)]
    n = timing.rotations(layer.stored_bytes, timing.l2_bytes())
    return [_impls(one, s) for one in [layer] + [layer.clone() for _ in range(n - 1)]]


def _time(device, quick, s, calls, bar, label, n_impls, m, checks):
    """impl -> (timing tuple, mode, note); a failure to time comes back as impl -> exception."""
    if device == "cuda":
        stats = {}
        for impl, fns in calls.items():
            bar.step(f"{label} {impl}")
            try:
                stats[impl] = timing.time_cuda_as(timing.timing_mode(device, m), fns, quick, checks[impl])
            except Exception as e:  # noqa: BLE001
                stats[impl] = e
        bar.step(label, n_impls - len(calls))
        return stats
    stats = time_cpu({impl: fns[0] for impl, fns in calls.items()}, s.budget_s) if calls else {}
    bar.step(label, n_impls)
    return {impl: (st, timing.WALL, None) for impl, st in stats.items()}


def _fill(row, st) -> None:
    if isinstance(st, Exception):
        row.status = f"error: {type(st).__name__}: {st}"
        return
    row.set_times(st)
    if len(st) > 4:
        row.wall_us = st[4] * 1e6


def _run_layer(layer, s, device, quick, bar, name, copy_bw, ms) -> list[Row]:
    copies = _copies(layer, s, device)
    impls = copies[0]
    rows: list[Row] = []
    g = torch.Generator(device="cpu").manual_seed(1)
    elt = s.torch_dtype.itemsize
    for m in ms:
        x = torch.randn(m, layer.qweight.shape[1], generator=g).to(device=device, dtype=s.torch_dtype)
        refs = {lora: layer.reference(x, lora) for lora in (False, True)}
        here = {impl: Row(name, m, impl, label, status=status) for impl, (_, status, label) in impls.items()}
        rows.extend(here.values())
        calls, checks = {}, {}
        for impl, (fn, _, _) in impls.items():  # check every output before timing any
            if fn is None:
                continue
            ref, tol = refs[impl == "qlora"], _tolerance(impl, s.dtype)
            if not timing.check_output(here[impl], lambda: fn(x), ref, tol):
                continue
            calls[impl] = [(lambda f: lambda: f(x))(c[impl][0]) for c in copies]
            checks[impl] = timing.replay_check(ref, tol)
        for impl, st in _time(device, quick, s, calls, bar, f"{name} M={m}", len(impls), m, checks).items():
            if not isinstance(st, Exception):
                st, here[impl].timing, here[impl].timing_note = st
            _fill(here[impl], st)
        dense, base = here["dense"], here["fastpeft"]
        for impl, row in here.items():
            if row.median_us is None:
                continue
            row.vs_dense = timing.penalty(row, dense)
            if impl == "qlora":
                row.vs_nf4 = timing.penalty(row, base)
            row.bytes = layer.bytes_moved(impl, m, elt)
            row.gbps, row.copy_frac = timing.bandwidth(row.bytes, row.median_us, copy_bw)
    return rows


def _run_quantize(layer, s, bar, name) -> list[QuantRow]:
    """NF4 quantize (double quant) of the layer's fp weight: fastpeft vs bitsandbytes' CPU backend."""
    from fastpeft import ops

    w = layer.dense
    bnb, status, version = _import_bnb()
    rows = {"fastpeft": QuantRow(name, "fastpeft", "fastpeft ops.nf4_quantize"),
            "bnb": QuantRow(name, "bnb", f"bitsandbytes quantize_4bit {version}".rstrip(), status=status)}
    calls = {"fastpeft": lambda: ops.nf4_quantize(w, s.blocksize, double_quant=True)}
    if bnb is not None:
        def theirs():
            return bnb.functional.quantize_4bit(w, blocksize=s.blocksize, compress_statistics=True, quant_type="nf4")
        try:
            packed, state = theirs()
            mine = calls["fastpeft"]()
            same = (torch.equal(packed.reshape(-1), mine["packed"].reshape(-1))
                    and torch.equal(state.absmax, mine["absmax"]))
            if same:
                calls["bnb"] = theirs
            else:
                rows["bnb"].status = "wrong: codes differ from fastpeft's"
        except Exception as e:  # noqa: BLE001
            rows["bnb"].status = f"error: {type(e).__name__}: {e}"
    stats = time_cpu(calls, s.budget_s)
    bar.step(f"{name} quantize", len(QUANT_IMPLS))
    for impl, st in stats.items():
        _fill(rows[impl], st)
    theirs_us = rows["bnb"].median_us
    for row in rows.values():
        if row.median_us is not None and theirs_us:
            row.vs_bnb = row.median_us / theirs_us
    return list(rows.values())


def run(device: str, quick: bool, bar: Progress) -> dict:
    """Every implementation at every (layer, M), and on the CPU the quantize timings:
    {"shapes", "copy_gbps", "rows", "quantize"}."""
    s = shapes_for(device, quick)
    copy_bw = timing.copy_gbps(device, quick)
    rows: list[Row] = []
    quant: list[QuantRow] = []
    with torch.inference_mode():
        for i, (out_f, in_f) in enumerate(s.layers):
            name = f"{out_f}x{in_f}"
            layer = _NF4Layer(s, out_f, in_f, device)
            rows += _run_layer(layer, s, device, quick, bar, name, copy_bw, s.ms_of(i))
            if device == "cpu":
                quant += _run_quantize(layer, s, bar, name)
            del layer
    return {"shapes": asdict(s), "copy_gbps": copy_bw, "rows": [asdict(r) for r in rows],
            "quantize": [asdict(r) for r in quant]}
