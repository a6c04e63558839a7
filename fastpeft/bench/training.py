"""The training section: one optimizer step of a PEFT model, fastpeft next to real peft.

A step is what a training loop does per batch: zero the grads, forward with labels, backward,
AdamW step over the trainable parameters. Each method's model is built from the same seeded
base by both libraries with the same config call (methods.py's `Method` records). Reported: the
step time (median, min-max), its ratio to peft's step for the same method, and on a GPU the peak
memory of the step. Adapters start non-trivial (random B), as after some training.

The optimizer row (`run_optimizer`) times `optimizer.step()` alone over one fp32 weight (4096 x
4096 on a GPU, 1024 x 1024 on a CPU, 128 x 128 with --quick) for torch.optim.AdamW, fastpeft's
AdamW8bit and bitsandbytes' AdamW8bit, and counts the bytes of each one's state tensors per
parameter (each storage once). A peer that is missing or fails on the device gets a status, no
number.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fastpeft.bench.env import Quietly, peer_warnings
from fastpeft.bench.methods import LLAMA, METHODS, Targets, model_shape
from fastpeft.bench.timing import Progress, Timed, time_cpu, time_cuda

# The methods whose training the section times (when the methods section knows them).
TRAINED = ("lora", "dora", "qlora")


@dataclass
class Row(Timed):
    method: str
    impl: str  # "fastpeft" or "peft"
    vs_peft: float | None = None  # fastpeft's median / peft's median, same method
    peak_mem_mib: float | None = None


def trained(names: list[str]) -> list[str]:
    return [n for n in TRAINED if n in names and n in METHODS]


def steps(names: list[str]) -> int:
    return len(trained(names)) + 1  # + the optimizer row


def _step_fn(model, ids) -> Any:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def _build(base, name: str, lib, targets: Targets = LLAMA) -> Any:
    method = METHODS[name]
    prepare = getattr(method, "prepare", None)
    model = copy.deepcopy(base)
    if prepare is not None:
        model = prepare(model, lib)
    model = lib.get_peft_model(model, method.config(lib, targets)).train()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.add_((torch.randn(p.shape, generator=g) * 0.02).to(device=p.device, dtype=p.dtype))
    return model


def run(device: str, quick: bool, bar: Progress, names: list[str], base, targets: Targets = LLAMA) -> dict:
    """Time one training step per (method, library): {"batch", "rows"}."""
    import fastpeft

    try:
        import peft
    except ImportError:
        peft = None
    s = model_shape(device, quick)
    batch, seq = s.prefill
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    rows: list[Row] = []
    for name in trained(names):
        here = {impl: Row(name, impl) for impl in ("fastpeft", "peft")}
        rows.extend(here.values())
        calls = {}
        for impl, lib in (("fastpeft", fastpeft), ("peft", peft)):
            if lib is None:
                here[impl].status = "not installed"
                continue
            try:
                if impl == "peft":
                    with peer_warnings():
                        calls[impl] = Quietly(_step_fn(_build(base, name, lib, targets), ids))
                else:
                    calls[impl] = _step_fn(_build(base, name, lib, targets), ids)
                calls[impl]()  # warm-up, and proof that it runs
            except Exception as e:  # noqa: BLE001  (one broken case must not sink the run)
                here[impl].status = f"error: {type(e).__name__}: {e}"
                calls.pop(impl, None)
        stats = {}
        if device == "cuda":
            for impl, call in calls.items():
                torch.cuda.reset_peak_memory_stats()
                stats[impl] = time_cuda(call, quick)[:4]
                here[impl].peak_mem_mib = torch.cuda.max_memory_allocated() / 2**20
        elif calls:
            stats = time_cpu(calls, s.budget_s)
        bar.step(f"train {name}")
        for impl, st in stats.items():
            here[impl].set_times(st)
        if here["fastpeft"].median_us is not None and here["peft"].median_us:
            here["fastpeft"].vs_peft = here["fastpeft"].median_us / here["peft"].median_us
    return {"batch": [batch, seq], "model": type(base).__name__, "rows": [asdict(r) for r in rows],
            "optimizer": run_optimizer(device, quick, bar, s.budget_s)}


# -- the optimizer row -------------------------------------------------------------------------
@dataclass
class OptimRow(Timed):
    impl: str  # "torch AdamW", "fastpeft AdamW8bit" or "bnb AdamW8bit"
    vs_torch: float | None = None  # median / torch AdamW's median
    state_bytes_per_param: float | None = None


def _optimizers() -> dict[str, Any]:
    """impl -> a constructor over a parameter list, or the reason there is none."""
    from fastpeft.optim import AdamW8bit

    makers: dict[str, Any] = {
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0),
        "fastpeft AdamW8bit": lambda ps: AdamW8bit(ps, lr=1e-3, weight_decay=0.0),
    }
    try:
        with peer_warnings():
            import bitsandbytes as bnb
        makers["bnb AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.0)
    except ImportError:
        makers["bnb AdamW8bit"] = "not installed"
    return makers


def state_bytes(optimizer, params: list) -> int:
    """Bytes of every tensor in `optimizer.state` for `params`, each storage counted once."""
    seen: dict[int, int] = {}
    for p in params:
        for t in optimizer.state[p].values():
            if isinstance(t, torch.Tensor):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def run_optimizer(device: str, quick: bool, bar: Progress, budget_s: float) -> dict:
    """Time `optimizer.step()` per implementation over one fp32 weight: {"shape", "rows"}."""
    side = 128 if quick else (4096 if device == "cuda" else 1024)
    g = torch.Generator().manual_seed(3)
    init, grad = torch.randn(side, side, generator=g), torch.randn(side, side, generator=g) * 1e-2
    rows, calls = {}, {}
    for impl, make in _optimizers().items():
        rows[impl] = row = OptimRow(impl)
        if isinstance(make, str):
            row.status = make
            continue
        try:
            p = torch.nn.Parameter(init.to(device))
            p.grad = grad.to(device)
            optimizer = make([p])
            step = Quietly(optimizer.step) if impl.startswith("bnb") else optimizer.step
            step()  # warm-up, creates the state, proves it runs here
            row.state_bytes_per_param = state_bytes(optimizer, [p]) / p.numel()
            calls[impl] = step
        except Exception as e:  # noqa: BLE001  (a peer that fails here gets a status, not a number)
            row.status = f"error: {type(e).__name__}: {e}"
    if device == "cuda":
        stats = {impl: time_cuda(call, quick)[:4] for impl, call in calls.items()}
    else:
        stats = time_cpu(calls, budget_s) if calls else {}
    bar.step("train optimizer")
    for impl, st in stats.items():
        rows[impl].set_times(st)
    base = rows["torch AdamW"].median_us
    for row in rows.values():
        if base and row.median_us is not None:
            row.vs_torch = row.median_us / base
    return {"shape": [side, side], "dtype": "float32", "rows": [asdict(r) for r in rows.values()]}
