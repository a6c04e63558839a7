"""`fastpeft check-kernels`: capture, compile, judge, report (the pieces live beside this file).

  1. capture  once per target, in a child process with ``FASTPEFT_ARCH`` set to it: every launch
              the scenarios make through `fastpeft.ops` (capture.py);
  2. units    launches deduplicated into compile units (scenarios.py says which scenarios
              keep every autotune config and which only the heaviest);
  3. compile  each unit for each target it was captured for, in worker processes (compile.py);
  4. judge    criteria.py on every unit x target; print the table (report.py); exit 1 on any
              failure, 0 when everything passes, 2 when the check cannot run (no ptxas).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from fastpeft.check import criteria, report
from fastpeft.check.compile import compile_all, toolchain

__all__ = ["check", "CheckError", "build_units"]


class CheckError(RuntimeError):
    """The check could not run (no toolchain, the capture failed)."""


def _capture(arch: int, level: str, scenarios: str, workdir: str, env: dict) -> dict:
    out = os.path.join(workdir, f"capture{arch}.json")
    cenv = dict(env, TRITON_INTERPRET="0", FASTPEFT_ARCH=criteria.LIMITS[arch]["sm"])
    cenv.pop("FASTPEFT_BACKEND", None)  # the launchers' own choice (triton: is_cuda says True)
    p = subprocess.run([sys.executable, "-m", "fastpeft.check.capture", "--arch", str(arch), "--level", level,
                        "--scenarios", scenarios, "--out", out], env=cenv, capture_output=True, text=True)
    if p.returncode != 0 or not os.path.exists(out):
        raise CheckError(f"capture for {criteria.LIMITS[arch]['sm']} failed (exit {p.returncode}):\n"
                         + (p.stderr or p.stdout)[-3000:])
    with open(out) as f:
        return json.load(f)


def build_units(captures: dict) -> tuple[list[dict], list[dict]]:
    """(units, problems) from {arch: capture}: launches sharing (kernel, signature, constexprs,
    attrs, options) become one unit, with every launch (arch, scenario, grid, tuner) listed."""
    units, by_key, problems = [], {}, []
    for arch, cap in captures.items():
        for L in cap["launches"]:
            if "launch_error" in L:
                problems.append({"arch": arch, "kind": "launch", "kernel": L.get("kernel", "?"),
                                 "scenario": L["scenario"].get("label", "?"), "error": L["launch_error"]})
                continue
            key = json.dumps([L["kernel"], L["signature"], L["constexprs"], L["attrs"], L["options"]], sort_keys=True)
            u = by_key.get(key)
            if u is None:
                u = by_key[key] = {"uid": len(units), "kernel": L["kernel"], "file": L["file"],
                                   "signature": L["signature"], "constexprs": L["constexprs"], "attrs": L["attrs"],
                                   "options": L["options"], "arg_names": L["arg_names"],
                                   "annotated": L["annotated"], "archs": [], "launches": []}
                units.append(u)
            if arch not in u["archs"]:
                u["archs"].append(arch)
            u["launches"].append({"arch": arch, "scenario": L["scenario"], "grid": L["grid"], "tuner": L["tuner"],
                                  "tensors": L["tensors"]})
        for e in cap.get("scenario_errors", []):
            problems.append({"arch": arch, "kind": "scenario", "kernel": "-", "scenario": e["scenario"],
                             "error": f"{e['error']} at {' <- '.join(reversed(e['where']))}"})
    return units, problems


def check(archs=(90, 80), *, quick: bool = False, level: str | None = None, jobs: int | None = None,
          scenarios: str = "fastpeft.check.scenarios", cache_dir: str | None = None, kernel_filter: str | None = None,
          log=None) -> dict:
    """Run the whole check; returns the result dict that report.py prints and --json writes."""
    import re

    log = log or (lambda msg: None)
    tools = toolchain(90)
    if not tools["ptxas"] or not tools["cuobjdump"]:
        raise CheckError("the triton wheel has no ptxas/cuobjdump (triton.backends.nvidia): nothing to compile with")
    level = level or ("quick" if quick else "default")
    env = dict(os.environ)
    cache_dir = cache_dir or env.get("TRITON_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastpeft", "check-kernels")
    env["TRITON_CACHE_DIR"] = cache_dir
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fastpeft-check-") as workdir:
        captures = {}
        for arch in archs:
            captures[arch] = _capture(arch, level, scenarios, workdir, env)
            log(f"captured {len(captures[arch]['launches'])} launches for {criteria.LIMITS[arch]['sm']} "
                f"in {captures[arch]['seconds']} s")
        units, problems = build_units(captures)
        if kernel_filter:
            units = [u for u in units if re.search(kernel_filter, u["kernel"])]
            for i, u in enumerate(units):
                u["uid"] = i
        todo = [(u["uid"], a) for u in units for a in archs if a in u["archs"]]
        log(f"compiling {len(units)} units, {len(todo)} unit x target pairs, {jobs or os.cpu_count()} workers")
        t1 = time.time()
        last = [0.0]

        def progress(n, total):
            if time.time() - last[0] > 20 or n == total:
                last[0] = time.time()
                log(f"  compiled {n}/{total} ({time.time() - t1:.0f} s)")

        done = compile_all(units, todo, jobs=jobs or min(8, os.cpu_count() or 1), workdir=workdir, env=env,
                           progress=progress)
    rows = []
    for u in units:
        for a in archs:
            if a not in u["archs"]:
                continue
            r = done.get((u["uid"], a), {"ok": False, "error": "missing"})
            fails, warns = criteria.evaluate(u, a, r)
            rows.append({"uid": u["uid"], "arch": a, "result": r, "failures": fails, "warnings": warns})
    failures = sum(1 for row in rows if row["failures"]) + len(problems)
    return {"archs": list(archs), "level": level, "units": units, "rows": rows, "problems": problems,
            "failures": failures, "seconds": round(time.time() - t0, 1), "compile_seconds": round(time.time() - t1, 1),
            "toolchain": {k: os.path.basename(v) for k, v in tools.items() if v},
            "versions": report.versions()}
