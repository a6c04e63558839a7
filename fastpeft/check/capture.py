"""Record the Triton launches that fastpeft's launchers make on their GPU path, without a GPU.

Runs in a child process (`python -m fastpeft.check.capture ...`, started by `run.capture`),
because it patches process-wide state:
  * ``torch.Tensor.is_cuda`` answers True, so `fastpeft.ops` picks the Triton backend and the
    launchers take their GPU branch (GPU tiles, autotuned kernels, GPU-only options);
  * ``torch.cuda.get_device_capability`` / ``get_device_properties`` describe the target card
    (H100: 9.0, 132 SMs; A100: 8.0, 108 SMs), and ``FASTPEFT_ARCH`` is set by the parent, so a
    launcher that picks configs per arch sees the card it is checked for;
  * ``JITFunction.run`` records the launch instead of running it: the signature, constexprs and
    16-divisibility attributes exactly as Triton's own binder specializes them for that target,
    the launch options and the grid;
  * ``Autotuner.run`` applies the launcher's own pruning (`prune_configs_by`: on a card these
    are the configs the tuner benchmarks, any of which it may keep) and records every config
    left (a scenario with ``all_configs`` off: only the heaviest, `config_weight`). Code that reads ``best_config`` after the launch is re-run once per config, so the
    launches that depend on the pick are recorded for each pick.
Kernels never execute: outputs stay garbage, and that is fine for a static check.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
import types

__all__ = ["encode", "decode", "main"]

SM_COUNT = {90: 132, 80: 108}


def encode(v):
    """A constexpr value as JSON (tl.dtype, jit functions and tuples tagged)."""
    import triton.language as tl

    if isinstance(v, tl.constexpr):
        v = v.value
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tl.dtype):
        return {"dtype": str(v)}
    if isinstance(v, (tuple, list)):
        return {"tuple": [encode(x) for x in v]}
    fn = getattr(v, "fn", None)
    if fn is not None and hasattr(fn, "__qualname__"):
        return {"jit": f"{fn.__module__}:{fn.__qualname__}"}
    raise TypeError(f"cannot record constexpr value {v!r} ({type(v).__name__})")


def decode(v, resolve=None):
    """Inverse of `encode`; `resolve(kernel_id)` turns a jit reference back into its function."""
    if isinstance(v, dict):
        if "dtype" in v:
            import triton.language as tl

            return tl.dtype(v["dtype"])
        if "tuple" in v:
            return tuple(decode(x, resolve) for x in v["tuple"])
        if "jit" in v:
            return resolve(v["jit"], None)
    return v


class Recorder:
    """Collects launches; `scenario` and `tuner` say where the next ones come from."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        self.backend = make_backend(GPUTarget("cuda", arch, 32))
        self.launches: list[dict] = []
        self.scenario: dict = {}
        self.tuner = None          # [name, index, count, call] while expanding an autotuned launch
        self.calls = 0
        self.forced = 0            # which config best_config reports (the re-run loop)
        self.best_read = False
        self.max_configs = 1
        self._binders: dict = {}

    def record(self, jf, args, kwargs, grid) -> None:
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature

        fn = jf.fn
        rec = {"kernel": f"{fn.__module__}:{fn.__qualname__}", "file": fn.__code__.co_filename,
               "scenario": self.scenario, "tuner": self.tuner}
        try:
            kwargs = dict(kwargs)
            kwargs["debug"] = kwargs.get("debug", jf.debug) or knobs.runtime.debug
            binder = self._binders.get(id(jf))
            if binder is None:
                binder = self._binders[id(jf)] = create_function_from_signature(jf.signature, jf.params,
                                                                                self.backend)
            bound, spec, opts = binder(*args, **kwargs)
            _, signature, constexprs, attrs = jf._pack_args(self.backend, kwargs, bound, spec, opts)
            rec["signature"] = signature
            rec["constexprs"] = [[list(k), encode(v)] for k, v in sorted(constexprs.items())]
            rec["attrs"] = [[list(k), v] for k, v in sorted(attrs.items()) if v]
            rec["options"] = {k: encode(v) for k, v in sorted(opts.items()) if not (k == "debug" and not v)}
            rec["arg_names"] = list(bound)
            rec["annotated"] = [p.name for p in jf.params if p.is_constexpr]
            rec["tensors"] = {name: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape),
                                     "numel": int(v.numel())}
                              for name, v in bound.items() if hasattr(v, "data_ptr") and hasattr(v, "dtype")}
            g = grid(bound) if callable(grid) else grid
            rec["grid"] = [int(x) for x in g] + [1] * (3 - len(g))
        except Exception as e:  # the real JIT would refuse this launch too
            rec["launch_error"] = f"{type(e).__name__}: {e}"
        self.launches.append(rec)


def config_weight(cfg) -> int:
    """How much of the machine an autotune config asks for: tile elements x pipeline stages."""
    tiles = 1
    for name, v in cfg.kwargs.items():
        if name.startswith("BLOCK_") and isinstance(v, int) and v > 0:
            tiles *= v
    return tiles * max(1, int(cfg.num_stages or 1))


def install(rec: Recorder, arch: int) -> None:
    """Patch Triton and torch for the capture (see the module docstring)."""
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self, *args, grid, warmup, **kwargs):
        rec.record(self, args, kwargs, grid)

    JITFunction.run = jit_run

    def get_best(self):
        rec.best_read = True
        return self.__dict__.get("_check_best")

    def set_best(self, value):
        self.__dict__["_check_best"] = value

    Autotuner.best_config = property(get_best, set_best)

    def tuner_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = list(self.prune_configs(kwargs)) if len(self.configs) > 1 else list(self.configs)
        except Exception as e:  # a pruner that needs a GPU: fall back to every config, say so
            rec.launches.append({"kernel": "?", "scenario": rec.scenario,
                                 "launch_error": f"prune_configs_by raised {type(e).__name__}: {e}"})
            configs = list(self.configs)
        if not rec.scenario.get("all_configs", True) and len(configs) > 1:
            configs = [max(configs, key=config_weight)]  # the heaviest: most smem and registers
        rec.calls += 1
        call, outer = rec.calls, rec.tuner
        rec.max_configs = max(rec.max_configs, len(configs))
        name = getattr(getattr(self, "base_fn", None), "__qualname__", "?")
        for i, cfg in enumerate(configs):
            rec.tuner = [name, i, len(configs), call]
            try:
                self.fn.run(*args, **kwargs, **cfg.all_kwargs())
            finally:
                rec.tuner = outer
        self.__dict__["_check_best"] = configs[rec.forced % len(configs)]
        self.nargs = None

    Autotuner.run = tuner_run
    torch.Tensor.is_cuda = property(lambda self: True)
    props = types.SimpleNamespace(name={90: "NVIDIA H100 80GB HBM3", 80: "NVIDIA A100-SXM4-80GB"}[arch],
                                  major=arch // 10, minor=arch % 10, multi_processor_count=SM_COUNT[arch],
                                  total_memory=80 * 2**30, L2_cache_size=(50 if arch == 90 else 40) * 2**20)
    torch.cuda.get_device_capability = lambda device=None: (arch // 10, arch % 10)
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.current_device = lambda: 0


def load_scenarios(spec: str, level: str):
    """`spec` is ``module`` or ``path/to/file.py``, with ``:function`` to name the function
    (default ``scenarios``), called with `level`."""
    func = "scenarios"
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isidentifier() and head:
        spec, func = head, tail
    if spec.endswith(".py"):
        name = "_check_scenarios_" + os.path.splitext(os.path.basename(spec))[0]
        mod_spec = importlib.util.spec_from_file_location(name, os.path.abspath(spec))
        mod = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = mod
        mod_spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(spec)
    return getattr(mod, func)(level)


def capture(arch: int, level: str, spec: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch  # noqa: F401  (before the patches)

    rec = Recorder(arch)
    install(rec, arch)
    errors, t0 = [], time.time()
    for sc in load_scenarios(spec, level):
        forced = 0
        while True:  # re-run while code reads the tuner's pick, once per pick
            rec.scenario = dict(sc.meta(), pick=forced)
            rec.forced, rec.best_read, rec.max_configs = forced, False, 1
            try:
                sc.run()
            except Exception as e:
                tb = traceback.extract_tb(e.__traceback__)
                errors.append({"scenario": sc.label, "error": f"{type(e).__name__}: {e}",
                               "where": [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in tb[-4:]]})
                break
            if not rec.best_read or forced + 1 >= rec.max_configs:
                break
            forced += 1
    return {"arch": arch, "level": level, "launches": rec.launches, "scenario_errors": errors,
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastpeft.check.capture")
    ap.add_argument("--arch", type=int, required=True)
    ap.add_argument("--level", default="default")
    ap.add_argument("--scenarios", default="fastpeft.check.scenarios")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        print("capture: TRITON_INTERPRET must be off (the parent sets it)", file=sys.stderr)
        return 2
    result = capture(a.arch, a.level, a.scenarios)
    with open(a.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
