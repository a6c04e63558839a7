"""The methods section: each PEFT method's inference latency penalty in a whole model.

A Llama-shaped model built from a config (random weights, fixed seed, sized by the device), or a
local transformers model (`--model PATH`), is timed bare (the base), then with each method's
adapter injected by fastpeft and, where installed, by real peft (unmerged, and merged when the
method can merge). The same config call builds both libraries' configs: the API is the same.

Phases: prefill (batch x sequence, one forward) and decode (one token per step on a KV cache that
the method's own prefill filled, batch 1 and 16; the cache is cropped back after every step so
each step sees the same context). The penalty is a case's median over the base model's median in
the same phase of the same run, timed the same way (`timing`).

On CUDA a decode step is also timed from a CUDA graph, which a DynamicCache cannot be captured in:
the prefilled cache is copied into a transformers StaticCache sized to hold one more token, and
the step on it, at a fixed position (every replay overwrites the same slot: constant work), is
captured and replayed (`_Decode.static_step`). Its output must match the eager step's before it
is timed. Where capture fails (e.g. a mixed batch whose adapter bank syncs on the host) the row
is timed eagerly and `timing_note` says why. Every CUDA row also keeps the eager step's do_bench
time (`eager_us`, `eager_penalty`): the cost without graphs.

qlora: the base is quantized to NF4 first (`Method.prepare`): by `fastpeft.quantize_model` for
fastpeft, and for peft the same codes in `bitsandbytes.nn.Linear4bit` layers (as transformers
loads a prequantized model), so both libraries run LoRA over identical 4-bit weights. Its penalty
is still against the bare full-precision model: what QLoRA costs at inference. Not merged here:
merging into a 4-bit base re-quantizes, which changes the weights being compared.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from fastpeft.bench import timing
from fastpeft.bench.env import BenchError, Quietly, check_names, peer_warnings
from fastpeft.bench.timing import Progress, time_cpu, time_cuda
from fastpeft.hf_compat import cache_kwarg, output_cache

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Targets:
    """What the methods' configs adapt in the model at hand: `linears` for the methods on every
    linear layer, `attention` for rslora's query/value pair (None: the library's default for the
    model type, PEFT's table), `task_type` for the prompt methods."""

    linears: list[str] | None = None
    attention: list[str] | None = None
    task_type: str = "CAUSAL_LM"


LLAMA = Targets(LLAMA_LINEARS, ["q_proj", "v_proj"])


def targets_for(base, target_modules: list[str] | None = None, generated: bool = False) -> Targets:
    """The `generated` Llama: LLAMA; a user's model: `target_modules` (--target-modules) for every
    LoRA-family method, else the libraries' per-architecture defaults; prompt methods as a causal
    LM when the model generates, else as FEATURE_EXTRACTION (a bare encoder)."""
    causal = hasattr(base, "generate") and base.can_generate()
    task = "CAUSAL_LM" if causal else "FEATURE_EXTRACTION"
    if target_modules:
        return Targets(list(target_modules), list(target_modules), task)
    if generated:
        return LLAMA
    return Targets(None, None, task)


@dataclass(frozen=True)
class Method:
    """`config(lib, targets)` builds the method's config with `lib` = fastpeft or peft (same API)
    for the model `targets` describes (default: the generated Llama); `prepare(base, lib)`, when
    set, turns a copy of the base model into the one the adapter goes on (default: the copy)."""

    config: Callable[..., Any]
    mergeable: bool
    prepare: Callable[[Any, Any], Any] | None = None
    # > 1: a mixed batch, `adapters` adapters of `config` loaded and row i run on adapter
    # i % adapters through `adapter_names=` (both libraries' mixed-batch path)
    adapters: int = 1
    # False for fastpeft's own methods (BitFit, bottleneck adapters): the peft rows say so
    peft_has: bool = True


def _quantized(base, lib):
    """`base` quantized to NF4 (double quant, the model's dtype for compute) by fastpeft; for peft
    the same codes moved into bitsandbytes' Linear4bit layers."""
    import fastpeft
    from fastpeft.bench.nf4 import to_bnb_model

    dtype = next(base.parameters()).dtype
    model = fastpeft.quantize_model(base, fastpeft.NF4Config(double_quant=True, compute_dtype=dtype))
    return model if lib is fastpeft else to_bnb_model(model, dtype)


def _lora(**kw):
    return lambda lib, t=LLAMA: lib.LoraConfig(r=16, lora_alpha=32, target_modules=t.linears, **kw)


def _prompt(cls: str, **kw):
    return lambda lib, t=LLAMA: getattr(lib, cls)(task_type=t.task_type, num_virtual_tokens=20, **kw)


METHODS: dict[str, Method] = {
    "lora": Method(_lora(), True),
    "rslora": Method(
        lambda lib, t=LLAMA: lib.LoraConfig(r=16, lora_alpha=32, use_rslora=True, target_modules=t.attention), True
    ),
    "dora": Method(_lora(use_dora=True), True),
    "adalora": Method(
        lambda lib, t=LLAMA: lib.AdaLoraConfig(init_r=12, target_r=8, total_step=1000, target_modules=t.linears), True
    ),
    "prompt_tuning": Method(_prompt("PromptTuningConfig"), False),
    "ptuning": Method(_prompt("PromptEncoderConfig", encoder_hidden_size=128), False),
    "prefix_tuning": Method(_prompt("PrefixTuningConfig"), False),
    "qlora": Method(_lora(), False, _quantized),
    "ia3": Method(lambda lib, t=LLAMA: lib.IA3Config(), True),
    "bitfit": Method(lambda lib, t=LLAMA: lib.BitFitConfig(biases="all", add_bias=True), True, peft_has=False),
    "adapter_houlsby": Method(lambda lib, t=LLAMA: lib.AdapterConfig(variant="houlsby", reduction_factor=16), False,
                              peft_has=False),
    "adapter_parallel": Method(
        lambda lib, t=LLAMA: lib.AdapterConfig(variant="parallel", reduction_factor=16, scaling=4.0), False,
        peft_has=False),
    "mam": Method(_prompt("MAMConfig", reduction_factor=16), False, peft_has=False),
    "unipelt": Method(_prompt("UniPELTConfig", r=8, reduction_factor=16), False, peft_has=False),
    "lora_mixed16": Method(_lora(init_lora_weights=False), False, adapters=16),
}


@dataclass(frozen=True)
class ModelShape:
    """The generated Llama and the phases' sizes."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    prefill: tuple[int, int]  # batch, sequence
    decode_batches: tuple[int, ...]
    context: int  # tokens in the cache before a decode step
    dtype: str
    budget_s: float  # CPU: seconds of samples per phase, all cases sampled in turn


def model_shape(device: str, quick: bool) -> ModelShape:
    """GPU: about 1.1B parameters (hidden 2048, 16 layers), bf16. CPU: small enough that the
    default run ends in about two minutes. --quick: tiny, for the CI smoke test."""
    if quick:
        return ModelShape(64, 2, 4, 2, 128, 128, (2, 16), (1, 4), 16, "float32", 0.02)
    if device == "cuda":
        return ModelShape(2048, 16, 32, 8, 8192, 32000, (4, 512), (1, 16), 512, "bfloat16", 0.0)
    # intermediate 704 (not Llama's 8/3 ratio, 688): bitsandbytes' CPU 4-bit kernels need out
    # features divisible by 32 and in features a multiple of the NF4 blocksize (qlora's peft row)
    return ModelShape(256, 4, 8, 4, 704, 2048, (2, 128), (1, 16), 64, "float32", 0.3)


def check_methods(names: list[str] | None) -> list[str]:
    """The methods to run (default: all); BenchError names the unknown ones and the known ones."""
    return check_names("--methods", names, list(METHODS), sorted(METHODS))


def check_targets(model, names: list[str]) -> None:
    """--target-modules: non-empty, and on a given model each name is some module's name or
    dotted suffix (PEFT's matching); BenchError lists what the model has otherwise."""
    if not names:
        raise BenchError("--target-modules: give at least one module name, e.g. query,value")
    if model is None:
        return
    found = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    modules = [n for n, _ in model.named_modules()]
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in modules)]
    if missing:
        raise BenchError(f"--target-modules: {missing} not found in {type(model).__name__}; "
                         f"its linear layers are named {sorted(found)}")


def load_model(path: str | None, device: str, quick: bool):
    """The base model: a local transformers model, or a seeded Llama from `model_shape`."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    s = model_shape(device, quick)
    dtype = getattr(torch, s.dtype)
    if path is None:
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
            num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate, vocab_size=s.vocab,
            max_position_embeddings=4096,
        )
        with torch.device(device):  # initialise in place: a 1B model is slow to init on a CPU
            return LlamaForCausalLM(config).to(dtype=dtype).eval()
    try:
        config = AutoConfig.from_pretrained(path)
        auto = AutoModelForCausalLM if getattr(config, "is_decoder", False) or config.architectures and any(
            a.endswith("ForCausalLM") for a in config.architectures
        ) else AutoModel
        return auto.from_pretrained(path, dtype=dtype).to(device).eval()
    except Exception as e:  # noqa: BLE001  (any failure to load is the user's input problem)
        raise BenchError(f"--model {path}: cannot load it with transformers ({type(e).__name__}: {e})") from e


def describe_model(base) -> dict:
    """The model actually benchmarked: class, hidden size, layers, parameters, dtype."""
    config = getattr(base, "config", None)

    def first(*names):
        return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)

    return {
        "class": type(base).__name__,
        "model_type": getattr(config, "model_type", None),
        "hidden": first("hidden_size", "n_embd", "d_model"),
        "layers": first("num_hidden_layers", "n_layer", "num_layers"),
        "params": sum(p.numel() for p in base.parameters()),
        "dtype": str(next(base.parameters()).dtype).removeprefix("torch."),
        "path": getattr(base, "name_or_path", None) or None,
    }


def model_summary(info: dict) -> str:
    """One line: `BertModel (bert): hidden 384, 6 layers, 22.7M parameters, float32`."""
    kind = f" ({info['model_type']})" if info.get("model_type") else ""
    params = info["params"]
    count = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M" if params >= 1e5 else f"{params:,d}"
    return (f"{info['class']}{kind}: hidden {info['hidden'] or '?'}, {info['layers'] or '?'} layers, "
            f"{count} parameters, {info['dtype']}")


def _not_applicable(err: Exception) -> bool:
    """A method that cannot go on this model (fastpeft's and peft's clear refusals before any
    compute: no target modules found, no default for the model type, an unsupported task)."""
    return isinstance(err, (ValueError, KeyError, NotImplementedError)) and not isinstance(err, ModuleNotFoundError)


@dataclass
class Row(timing.Timed):
    method: str  # "base" for the bare model
    impl: str  # "base", "fastpeft", "peft", "peft merged"
    phase: str  # "prefill BxS" or "decode bN"
    penalty: float | None = None
    trainable: int | None = None
    trainable_pct: float | None = None
    peak_mem_mib: float | None = None
    timing: str | None = None  # how median_us was measured: timing.GRAPH, DO_BENCH or WALL
    timing_note: str | None = None  # why a decode row meant for a CUDA graph was timed otherwise
    eager_us: float | None = None  # CUDA only: do_bench median of the eager call
    eager_penalty: float | None = None


@dataclass
class Case:
    model: Any  # None when there is nothing to time; `status` says why
    status: str = "ok"
    counts: tuple[int, int] | None = None  # (trainable, all) parameters, before freezing
    names: list[str] | None = None  # a mixed batch's adapters (Method.adapters > 1)


def _cases(base, names: list[str], targets: Targets = LLAMA) -> dict[tuple[str, str], Case]:
    """(method, impl) -> Case; rows without a model say why (not installed, n/a: a method that
    does not apply to this model, with the library's reason; error)."""
    import fastpeft

    try:
        import peft
    except ImportError:
        peft = None
    cases = {("base", "base"): Case(base)}
    for name in names:
        method = METHODS[name]
        for impl, lib in (("fastpeft", fastpeft), ("peft", peft)):
            if lib is None or (impl == "peft" and not method.peft_has):
                why = "not installed" if lib is None else "n/a: peft lacks this method"
                cases[(name, impl)] = Case(None, why)
                if method.mergeable:
                    cases[(name, "peft merged")] = Case(None, why)
                continue
            try:
                model = copy.deepcopy(base)
                if method.prepare is not None:
                    model = method.prepare(model, lib)
                with contextlib.nullcontext() if lib is fastpeft else peer_warnings():
                    try:
                        model = lib.get_peft_model(model, method.config(lib, targets)).eval()
                    except Exception as e:  # noqa: BLE001
                        if not _not_applicable(e):
                            raise
                        why = f"n/a: {type(e).__name__}: {e}"
                        cases[(name, impl)] = Case(None, why)
                        if impl == "peft" and method.mergeable:
                            cases[(name, "peft merged")] = Case(None, why)
                        continue
                counts = model.get_nb_trainable_parameters()
                mixed = ["default"] + [f"mix{i}" for i in range(1, method.adapters)]
                for extra in mixed[1:]:
                    model.add_adapter(extra, method.config(lib, targets))
                _make_nontrivial(model)
            except ModuleNotFoundError as e:  # a peer package the method needs (bitsandbytes)
                cases[(name, impl)] = Case(None, f"not installed: {e.name}" if e.name else f"error: {e}")
                continue
            except Exception as e:  # noqa: BLE001  (one broken method must not sink the run)
                cases[(name, impl)] = Case(None, f"error: {type(e).__name__}: {e}")
                continue
            cases[(name, impl)] = Case(model, counts=counts, names=mixed if method.adapters > 1 else None)
            if impl == "peft" and method.mergeable:
                cases[(name, "peft merged")] = Case(copy.deepcopy(model).merge_and_unload().eval(), counts=counts)
    return cases


def _make_nontrivial(model) -> None:
    """Give every adapter parameter random values: zero-initialised factors would let a lazy
    implementation skip work that a trained adapter needs."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=g) * 0.02
                param.add_(noise.to(device=param.device, dtype=param.dtype))
            param.requires_grad_(False)


def _mixed_kwargs(names: list[str] | None, batch: int) -> dict:
    """`adapter_names=` for a mixed case: row i on adapter i % len(names); {} otherwise."""
    return {} if names is None else {"adapter_names": [names[i % len(names)] for i in range(batch)]}


def _prefill_fn(model, ids, mask, names=None) -> Callable[[], object]:
    kwargs = _mixed_kwargs(names, ids.shape[0])
    return lambda: model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)


class _Decode:
    """One decode step after the model's own prefill (prompt methods fill the cache with their
    virtual tokens or prefixes there); the step runs the adapted inner model on the cache (a
    mixed case runs the wrapper: `adapter_names=` lives there). Calling it runs the step on the
    prefilled DynamicCache and crops the token back off; returns the logits."""

    def __init__(self, model, ids, mask, names=None):
        self.kwargs = _mixed_kwargs(names, ids.shape[0])
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **self.kwargs)
        self.cache = output_cache(out)
        self.cache_kwarg = cache_kwarg(model.get_base_model() if hasattr(model, "get_base_model") else model)
        self.length = self.cache.get_seq_length()
        self.token = out.logits[:, -1:].argmax(-1)
        self.mask = torch.ones(ids.shape[0], self.length + 1, dtype=mask.dtype, device=ids.device)
        wrapped = hasattr(model, "get_base_model")
        self.inner = model.get_base_model() if wrapped and not self.kwargs else model
        self.config = (model.get_base_model() if wrapped else model).config

    def __call__(self) -> torch.Tensor:
        out = self.inner(input_ids=self.token, attention_mask=self.mask, use_cache=True,
                         **{self.cache_kwarg: self.cache}, **self.kwargs)
        self.cache.crop(-1)  # drop the token just appended (negative: works on old and new caches)
        return out.logits

    def static_step(self):
        """The same step on a StaticCache holding a copy of the prefilled cache (max length: one
        more token), at the fixed position `length`: no host sync, fixed addresses, so it can be
        captured in a CUDA graph, and every call (replay) rewrites the same slot."""
        from transformers import StaticCache

        static = StaticCache(config=self.config, max_cache_len=self.length + 1)
        for i, layer in enumerate(self.cache.layers):
            static.update(layer.keys, layer.values, i)
        for name, value in vars(self.cache).items():  # tags a method put on its cache (UniPELT's gate)
            if name not in vars(static):
                setattr(static, name, value)
        # transformers 5 appends at a per-layer device counter: reset it to `length` each call
        counters = [c for c in (getattr(layer, "cumulative_length", None) for layer in static.layers)
                    if isinstance(c, torch.Tensor)]
        position = torch.full((1,), self.length, dtype=torch.long, device=self.token.device)

        def step() -> torch.Tensor:
            for c in counters:
                c.fill_(self.length)
            return self.inner(input_ids=self.token, attention_mask=self.mask, cache_position=position,
                              use_cache=True, **{self.cache_kwarg: static}, **self.kwargs).logits

        return step


def _time_cuda_case(call, make, batch: int, quick: bool, row: Row) -> tuple:
    """(median, min, max, samples) of one case on CUDA; sets row's timing, note, eager time and
    peak memory. do_bench times the eager call (and the peak memory is its); a decode step
    (timing.timing_mode) is then timed from a graph of its static-cache twin."""
    torch.cuda.reset_peak_memory_stats()
    eager = time_cuda(call, quick)[:4]
    row.peak_mem_mib = torch.cuda.max_memory_allocated() / 2**20
    row.eager_us, row.timing = eager[0] * 1e6, timing.DO_BENCH
    if make is not _Decode or timing.timing_mode("cuda", batch) != timing.GRAPH:
        return eager
    try:
        # the replayed static-cache logits must be the eager step's (bf16 roundings apart)
        stats = timing.time_cuda_graph([call.static_step()], quick, timing.replay_check(call(), 5e-2))
    except Exception as e:  # noqa: BLE001  (no static cache or no capture: the eager time, say why)
        torch.cuda.synchronize()
        row.timing_note = f"cuda graph failed: {timing.why(e)}"
        return eager
    row.timing = timing.GRAPH
    return stats


def steps(names: list[str], device: str, quick: bool, causal: bool = True) -> int:
    """Progress-bar steps: every case in every phase (a model that does not generate: prefill only)."""
    s = model_shape(device, quick)
    per_phase = 1 + sum(2 + METHODS[n].mergeable for n in names)
    return per_phase * (1 + (len(s.decode_batches) if causal else 0))


def run(device: str, quick: bool, bar: Progress, names: list[str], base, targets: Targets = LLAMA) -> dict:
    """Time the base model and every (method, impl) in every phase: {"shape", "model", "rows"}."""
    s = model_shape(device, quick)
    is_causal = hasattr(base, "generate") and base.can_generate()
    cases = _cases(base, names, targets)
    rows: list[Row] = []
    phases: list[tuple[str, int, int, Callable]] = [(f"prefill {s.prefill[0]}x{s.prefill[1]}", *s.prefill, _prefill_fn)]
    if is_causal:
        phases += [(f"decode b{b}", b, s.context, _Decode) for b in s.decode_batches]
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for phase, batch, seq, make in phases:
            ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
            mask = torch.ones_like(ids)
            here = {key: Row(key[0], key[1], phase, status=case.status) for key, case in cases.items()}
            rows.extend(here.values())
            calls = {}
            for key, case in cases.items():
                model = case.model
                if model is None:
                    continue
                try:
                    if key[1].startswith("peft"):
                        with peer_warnings():
                            calls[key] = Quietly(make(model, ids, mask, case.names))
                    else:
                        calls[key] = make(model, ids, mask, case.names)
                    calls[key]()
                except Exception as e:  # noqa: BLE001
                    here[key].status = f"error: {type(e).__name__}: {e}"
                    calls.pop(key, None)
            stats = {}
            if device == "cuda":
                for key, call in calls.items():
                    bar.step(f"{phase} {key[0]} {key[1]}")
                    try:
                        stats[key] = _time_cuda_case(call, make, batch, quick, here[key])
                    except Exception as e:  # noqa: BLE001
                        here[key].status = f"error: {type(e).__name__}: {e}"
                bar.step(phase, len(cases) - len(calls))
            else:
                stats = time_cpu(calls, s.budget_s) if calls else {}
                for key in stats:
                    here[key].timing = timing.WALL
                bar.step(phase, len(cases))
            for key, st in stats.items():
                here[key].set_times(st)
            base_row = here[("base", "base")]
            for key, row in here.items():
                row.penalty = timing.penalty(row, base_row)
                if row.eager_us is not None and base_row.eager_us:
                    row.eager_penalty = row.eager_us / base_row.eager_us
                if cases[key].counts is not None:
                    trainable, total = cases[key].counts
                    row.trainable, row.trainable_pct = trainable, 100 * trainable / total
    notes = [] if is_causal else [f"decode: n/a: {type(base).__name__} does not generate (prefill only)"]
    return {"shape": asdict(s), "model": type(base).__name__, "model_info": describe_model(base),
            "targets": asdict(targets), "rows": [asdict(r) for r in rows], "notes": notes}

