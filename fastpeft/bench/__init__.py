"""`fastpeft bench`: the inference latency penalty of PEFT methods, measured on this device.

Five sections, each compared against real peers in the same run:
  kernels  one LoRA linear layer: base GEMM, merged, PEFT's eager recipe, peft, fastpeft (layer.py);
  nf4      one NF4 layer: dense, dequantize-then-matmul, bitsandbytes, fastpeft's fused kernel and
           the fused QLoRA layer, with bandwidth on CUDA and quantize time on the CPU (nf4.py);
  multi    mixed-adapter batches (`adapter_names=`): one layer over many adapters against one
           adapter, against many registered, against peft's loop, and a whole model (multi.py);
  methods  every method in a whole model: prefill and decode against the bare model (methods.py);
  training one optimizer step of LoRA, DoRA and QLoRA models, fastpeft vs peft (training.py).
Timing: on CUDA `triton.testing.do_bench` (device time, warm-up excluded, L2 flushed), and for
decode-sized calls (<= 16 tokens) replays of a captured CUDA graph, which launch overhead cannot
hide; on the CPU wall clock sampled in turn, median and min-max (timing.py). Every row records
how it was timed (`timing`), and ratios only compare rows timed alike. Every table names its device.
"""
from __future__ import annotations

import os
import time

import torch

from fastpeft.bench import layer, methods, multi, nf4, training
from fastpeft.bench.env import BenchError, check_device, check_names, describe_device, interpreting, ops_backend, package_versions, prepare_out
from fastpeft.bench.report import format_tables, write_outputs
from fastpeft.bench.timing import Progress

SECTIONS = ("kernels", "nf4", "multi", "methods", "training")

__all__ = [
    "SECTIONS", "BenchError", "check_device", "check_sections", "describe_device", "format_tables",
    "interpreting", "ops_backend", "package_versions", "prepare_out", "run", "write_outputs",
]


def check_sections(names: list[str] | None) -> list[str]:
    return check_names("--sections", names, list(SECTIONS))


def run(
    device: str,
    quick: bool = False,
    progress: bool = True,
    threads: int | None = None,
    sections: list[str] | None = None,
    method_names: list[str] | None = None,
    model=None,
    target_modules: list[str] | None = None,
) -> dict:
    """Run the sections on `device`; returns the JSON-able result.

    `model` is the methods section's base model (default: the seeded Llama sized for `device`);
    `target_modules` what the LoRA-family methods adapt in it (default: the Llama's linear layers,
    on a user's model the libraries' default for its type; `methods.targets_for`).
    On the CPU, torch runs `threads` intra-op threads (default 1, like torch.utils.benchmark:
    stable and comparable across machines); the previous setting is restored afterwards.
    """
    sections = check_sections(sections)
    names = methods.check_methods(method_names)
    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        causal = model is None or getattr(model, "can_generate", lambda: False)()
        total = (layer.steps(quick, device) if "kernels" in sections else 0) + (
            methods.steps(names, device, quick, causal) if "methods" in sections else 0
        ) + (nf4.steps(quick, device) if "nf4" in sections else 0) + (
            multi.steps(quick) if "multi" in sections else 0
        ) + (
            training.steps(names) if "training" in sections and causal else 0
        )
        bar = Progress(total, enabled=progress)
        result = {
            "device": describe_device(device),
            "versions": package_versions(),
            "ops_backend": ops_backend(device),
            "env": {k: os.environ.get(k) for k in ("FASTPEFT_BACKEND", "TRITON_INTERPRET")},
            "quick": quick,
            "timing": (
                "triton.testing.do_bench (device time, L2 flushed before each run, warm-up excluded); "
                "decode-sized calls (<= 16 tokens) from CUDA-graph replays (kernels: over rotated weight "
                "copies, out of L2; methods: the step on a static cache); each row's `timing` says which"
                if device == "cuda"
                else "time.perf_counter, warm-up excluded, cases sampled in turn"
            ),
            "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        if "kernels" in sections:
            result["kernels"] = layer.run(device, quick, bar)
        if "nf4" in sections:
            result["nf4"] = nf4.run(device, quick, bar)
        if "multi" in sections:
            result["multi"] = multi.run(device, quick, bar)
        if "methods" in sections or "training" in sections:
            base = model if model is not None else methods.load_model(None, device, quick)
            result["model"] = methods.describe_model(base)
            targets = methods.targets_for(base, target_modules, generated=model is None)
        if "methods" in sections:
            result["methods"] = methods.run(device, quick, bar, names, base, targets)
        if "training" in sections:
            if getattr(base, "can_generate", lambda: False)():
                result["training"] = training.run(device, quick, bar, names, base, targets)
            else:
                result.setdefault("notes", []).append(
                    f"training: n/a: {type(base).__name__} is not a causal LM (the section trains with labels = input_ids)")
        bar.close()
        return result
    finally:
        torch.set_num_threads(before)
