"""What the pytest-benchmark suites in bench/ (bench_lora.py, bench_nf4.py, bench_multi_lora.py)
share: the device they time on and one timed call. `fastpeft bench` does not use it."""
from __future__ import annotations

from typing import Callable

import torch

from fastpeft.bench.env import interpreting


def suite_device() -> str:
    """cuda when a GPU is there and Triton compiles for it, else cpu (the interpreter is far too
    slow to time: never time it)."""
    return "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def bench_call(benchmark, device: str, group: str, name: str, fn: Callable[[], torch.Tensor], **extra):
    """Time `fn()` as row `name` of `group`: without grad, synchronised on CUDA (so decode numbers
    include launch overhead, as a real step does), after one warm-up call (autotuning and lazy
    initialisation stay out of the timings). `extra` goes to the row's extra_info. Returns the
    output of the last timed call."""
    benchmark.group = group
    benchmark.name = name
    benchmark.extra_info.update(device=device, **extra)

    def step():
        with torch.no_grad():
            y = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return y

    step()
    return benchmark(step)
