"""Timers: CUDA device time by `triton.testing.do_bench`, CPU wall clock sampled in turn."""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

import torch


def time_cpu(calls: dict[str, Callable[[], object]],
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


def time_cuda(fn: Callable[[], object], quick: bool) -> tuple[float, float, float, int, float]:
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


class Progress:
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

