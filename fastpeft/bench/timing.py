"""Timers: CUDA device time by `triton.testing.do_bench` or CUDA-graph replay, CPU wall clock
sampled in turn; and the device-to-device copy that bandwidth figures are measured against."""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# Timing modes, recorded on every row (`Row.timing`): only rows timed the same way are compared.
GRAPH = "cuda graph"      # replays of a captured CUDA graph, timed with events: no launch overhead
DO_BENCH = "do_bench"     # triton.testing.do_bench on eager calls: L2 flushed, launches included
WALL = "wall clock"       # CPU: time.perf_counter
GRAPH_MAX_TOKENS = 16     # decode: at most this many tokens per call, the launches would dominate

_COPY_BYTES = 1 << 30     # the copy whose bandwidth is the yardstick: far larger than any L2
_GRAPH_REPLAY_S = 2e-3    # device time one replay aims for (calls per graph = this / a call)
_GRAPH_MAX_CALLS = 200
_L2_FALLBACK = 256 << 20  # when torch does not report the L2 size: more than any GPU's today


@dataclass(kw_only=True)
class Timed:
    """What every section's result row has: a status ("ok", or why there is no number) and the
    latency statistics in µs. Keyword-only, so each section's Row puts its own keys first."""
    status: str = "ok"
    median_us: float | None = None
    min_us: float | None = None
    max_us: float | None = None
    samples: int | None = None

    def set_times(self, st) -> None:
        """Take (median, min, max) seconds and the sample count, a timer's tuple, as µs."""
        self.median_us, self.min_us, self.max_us, self.samples = st[0] * 1e6, st[1] * 1e6, st[2] * 1e6, st[3]


def timing_mode(device: str, tokens: int) -> str:
    """How a case of `tokens` tokens per call is timed on `device`: decode-sized calls on CUDA
    from a CUDA graph (launch overhead would hide the kernel), bigger ones by do_bench."""
    if device != "cuda":
        return WALL
    return GRAPH if tokens <= GRAPH_MAX_TOKENS else DO_BENCH


def time_cpu(calls: dict[str, Callable[[], object]],
             budget_s: float) -> dict[str, tuple[float, float, float, int]]:
    """impl -> (median, min, max) seconds per call and the sample count, by wall clock.

    The implementations are sampled in turn (the order rotates every round), so drift and
    noise on a busy machine hit them alike; a sample batches calls to last >= ~1 ms.
    """
    if not calls:  # every implementation failed its output check: nothing to time
        return {}
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


def _eager_call_s(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return max(time.perf_counter() - t0, 1e-6)


def wall_clock(fn: Callable[[], object], quick: bool) -> float:
    """Median host wall clock per call over back-to-back eager calls (launch overhead included):
    what a caller without CUDA graphs pays."""
    calls = max(10, min(1000, int((0.005 if quick else 0.02) / _eager_call_s(fn))))
    walls = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) / calls)
    return statistics.median(walls)


def time_cuda(fn: Callable[[], object], quick: bool) -> tuple[float, float, float, int, float]:
    """(median, min, max) seconds of device time per call by do_bench, a sample-count estimate,
    and the median host wall clock per call over back-to-back calls (launch overhead included)."""
    from triton.testing import do_bench

    warmup, rep = (5, 20) if quick else (25, 100)
    try:
        times = do_bench(fn, warmup=warmup, rep=rep, return_mode="all")
    except (AssertionError, TypeError):  # an older triton without return_mode="all"
        times = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.0, 0.5, 1.0])
    ms = sorted(times)  # all the samples, or [min, median, max] from the fallback
    return (statistics.median(ms) / 1e3, ms[0] / 1e3, ms[-1] / 1e3,
            len(ms) if len(ms) > 3 else None, wall_clock(fn, quick))


def graph_calls(call_s: float, copies: int) -> int:
    """Calls captured in one graph: enough that a replay lasts ~2 ms (its launch amortised), a
    whole number of passes over the `copies` rotated operands, at most 200 (and >= one pass)."""
    calls = max(1, min(_GRAPH_MAX_CALLS, int(_GRAPH_REPLAY_S / max(call_s, 1e-9))))
    return max(copies, calls - calls % copies)


def capture(fns: Sequence[Callable[[], object]], calls: int):
    """(graph, output of its last call): `calls` back-to-back calls cycling through `fns`, after
    an eager warm-up of each on a side stream (lazy init, autotuning and allocator growth stay
    out of the capture, as torch.cuda.graphs requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(graph):
        for i in range(calls):
            out = fns[i % len(fns)]()
    return graph, out


def time_cuda_graph(fns: Sequence[Callable[[], object]], quick: bool,
                    check: Callable[[object], None] | None = None) -> tuple[float, float, float, int]:
    """(median, min, max) seconds of device time per call, and the sample count, from replays of
    a CUDA graph of back-to-back calls; each sample is one replay between two CUDA events.

    `fns` are the same call on rotated copies of the operands (see `rotations`): a replay cycles
    through them so the weights come from HBM, not from L2, as do_bench's flush ensures. `check`
    sees the output of the first replay before any timing and raises if it is wrong.
    """
    calls = graph_calls(min(_eager_call_s(fn) for fn in fns), len(fns))
    graph, out = capture(fns, calls)
    graph.replay()
    torch.cuda.synchronize()
    if check is not None:
        check(out)
    times = []
    for _ in range(10 if quick else 30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times), min(times), max(times), len(times)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max|y - ref| / max|ref|, in fp32."""
    ref = ref.float()
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def check_output(row, fn: Callable[[], torch.Tensor], ref: torch.Tensor, tol: float) -> bool:
    """Whether `fn()` is `ref` within `tol` (max_rel_err, recorded on `row`); if not, `row.status`
    says why ("error: ..." when it raised: one broken impl must not sink the run, "wrong: ...")."""
    try:
        err = rel_err(fn(), ref)
    except Exception as e:  # noqa: BLE001
        row.status = f"error: {type(e).__name__}: {e}"
        return False
    row.max_rel_err = err
    if not math.isfinite(err) or err > tol:
        row.status = f"wrong: max rel err {err:.2e} > {tol:.0e}"
        return False
    return True


def replay_check(ref: torch.Tensor, tol: float) -> Callable[[torch.Tensor], None]:
    """A `check` for time_cuda_graph: raises unless a replay's output is `ref` within `tol`."""
    def check(y: torch.Tensor) -> None:
        err = rel_err(y, ref)
        if not err <= tol:  # NaN fails too
            raise ValueError(f"replayed output wrong: max rel err {err:.2e} > {tol:.0e}")
    return check


def why(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:160]


def time_cuda_as(mode: str, fns: Sequence[Callable[[], object]], quick: bool,
                 check: Callable[[object], None] | None = None):
    """(time_cuda's tuple, the mode that produced it, why it is not `mode` or None).

    GRAPH replays a graph of `fns` (the host wall clock still comes from eager calls of the
    first); when capture, replay or `check` fails, the case is timed by do_bench instead and
    the note says why, never a number from a graph that did not run right.
    """
    if mode == GRAPH:
        try:
            return time_cuda_graph(fns, quick, check) + (wall_clock(fns[0], quick),), GRAPH, None
        except Exception as e:  # noqa: BLE001  (capture can fail in many ways: fall back, say why)
            torch.cuda.synchronize()
            note = f"cuda graph failed: {why(e)}"
        return time_cuda(fns[0], quick), DO_BENCH, note
    return time_cuda(fns[0], quick), mode, None


def penalty(row, base) -> float | None:
    """row.median_us / base.median_us when both were measured the same way (`timing`), else None:
    a graph replay against an eager launch would compare launch overhead, not the work."""
    if row.median_us is None or not base.median_us or row.timing != base.timing:
        return None
    return row.median_us / base.median_us


def l2_bytes() -> int:
    """The current CUDA device's L2 size in bytes (a generous guess when torch does not say)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "L2_cache_size", 0) or _L2_FALLBACK


def rotations(bytes_per_copy: int, l2: int, most: int = 16) -> int:
    """Copies of a case's operands that, read in turn, keep it out of L2: together >= 4x the L2
    (an LRU cache thrashes, so each call reads HBM); 1 when one copy is already that big."""
    return max(1, min(most, math.ceil(4 * l2 / max(bytes_per_copy, 1))))


def copy_gbps(device: str, quick: bool) -> float | None:
    """Device-to-device copy bandwidth (GB/s, read + write counted) on CUDA, else None."""
    if device != "cuda":
        return None
    buf = torch.empty(_COPY_BYTES // (64 if quick else 1), dtype=torch.uint8, device="cuda")
    median = time_cuda(lambda: torch.empty_like(buf).copy_(buf), quick)[0]
    return 2 * buf.numel() / median / 1e9


def bandwidth(nbytes: int, median_us: float | None, copy_bw: float | None) -> tuple[float | None, float | None]:
    """(GB/s, fraction of the copy's GB/s) for `nbytes` moved in `median_us`; (None, None) without
    a copy measurement (the CPU) or a time."""
    if not copy_bw or not median_us:
        return None, None
    gbps = nbytes / (median_us * 1e-6) / 1e9
    return gbps, gbps / copy_bw


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

