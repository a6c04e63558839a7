"""Compile captured launches for a GPU target on this CPU machine and read what the card would run.

`compile_unit(unit, arch)` runs Triton's own compiler (``triton.compile`` of an ``ASTSource``
built from the captured signature, constexprs and attributes) for ``GPUTarget("cuda", arch)``,
then the ``ptxas -v`` and ``cuobjdump`` that ship in the triton wheel, and returns registers,
spills, shared memory, the SASS summary, the TTIR dots and the global loads per argument.

`compile_all(todo, ...)` spreads (unit, arch) pairs over worker processes
(``python -m fastpeft.check.compile``): Triton must not run in interpreter mode there, and a
compiler crash must cost one unit, not the whole check. Each worker appends one JSON line per
unit; a worker that dies or stalls is replaced and the unit it was on is reported as failed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

from fastpeft.check import parse
from fastpeft.check.capture import decode

__all__ = ["compile_unit", "compile_all", "toolchain"]


def toolchain(arch: int = 90) -> dict:
    """Paths of ptxas and cuobjdump in the triton wheel (missing ones are None)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:
        return {"ptxas": None, "cuobjdump": None}
    cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    return {"ptxas": ptxas if os.path.exists(ptxas) else None,
            "cuobjdump": cuobjdump if os.path.exists(cuobjdump) else None}


def resolve(kernel_id: str, source_file: str | None):
    """The JITFunction named ``module:qualname`` (from `source_file` if the module won't import)."""
    from triton.runtime.jit import JITFunction

    mod_name, qual = kernel_id.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError:
        if not source_file or not os.path.exists(source_file):
            raise
        spec = importlib.util.spec_from_file_location(mod_name, source_file)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        spec.loader.exec_module(mod)
    obj = mod
    for part in qual.split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    if not isinstance(obj, JITFunction):
        raise TypeError(f"{kernel_id} is not a triton.jit function")
    return obj


def _error_text(err: BaseException) -> str:
    """The innermost message of a CompilationError chain, with the jit source lines it went through."""
    chain, x = [], err
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    where = []
    for x in chain:
        src, node = getattr(x, "src", None), getattr(x, "node", None)
        if src and node is not None and getattr(node, "lineno", None):
            lines = src.split("\n")
            line = lines[node.lineno - 1].strip() if node.lineno - 1 < len(lines) else ""
            where.append(f"  at line {node.lineno} of {lines[0].strip()[:60]}: {line[:120]}")
    inner = chain[-1]
    msg = f"{type(err).__name__}: {inner}" if inner is not err else f"{type(err).__name__}: {err}"
    return (msg.split("Repro command")[0].strip()[:3000] + ("\n" + "\n".join(where[:6]) if where else ""))


def compile_unit(unit: dict, arch: int, workdir: str) -> dict:
    """Compile one captured unit for sm_{arch} and measure it (see the module docstring)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = {"uid": unit["uid"], "arch": arch}
    t0 = time.time()
    try:
        jf = resolve(unit["kernel"], unit.get("file"))
        sig = dict(unit["signature"])
        cex = {tuple(p): decode(v, resolve) for p, v in unit["constexprs"]}
        attrs = {tuple(p): v for p, v in unit["attrs"]}
        src = ASTSource(jf, sig, cex, attrs)
    except Exception as e:
        return {**res, "ok": False, "stage": "setup", "error": f"{type(e).__name__}: {e}"}
    knobs.nvidia.dump_ptxas_log = True
    out, diag = io.StringIO(), tempfile.TemporaryFile(mode="w+b")
    saved = os.dup(2)
    os.dup2(diag.fileno(), 2)  # MLIR diagnostics go to fd 2
    try:
        with contextlib.redirect_stdout(out):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(unit["options"]))
        err = None
    except Exception as e:
        k, err = None, e
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
    diag.seek(0)
    diagnostics = "\n".join(line for line in diag.read().decode(errors="replace").splitlines()
                            if "FP_FUSION" not in line and "warn_once" not in line)
    diag.close()
    res["seconds"] = round(time.time() - t0, 2)
    if err is not None:
        return {**res, "ok": False, "stage": "compile", "error": _error_text(err),
                "diagnostics": diagnostics.strip()[-2000:]}
    md = k.metadata
    res.update(ok=True, name=md.name, shared=int(md.shared or 0), num_warps=int(md.num_warps),
               num_stages=int(md.num_stages))
    tools = toolchain(arch)
    log = out.getvalue() if "Used" in out.getvalue() else ""
    base = os.path.join(workdir, f"u{unit['uid']}_{arch}")
    with open(base + ".cubin", "wb") as f:
        f.write(k.asm["cubin"])
    if not log and tools["ptxas"]:  # a Triton cache hit ran no ptxas: run it with Triton's flags
        with open(base + ".ptx", "w") as f:
            f.write(k.asm["ptx"])
        from triton.backends.nvidia.compiler import sm_arch_from_capability

        fmad = [] if getattr(md, "enable_fp_fusion", True) else ["--fmad=false"]
        p = subprocess.run([tools["ptxas"], "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                            f"--gpu-name={sm_arch_from_capability(arch)}", base + ".ptx", "-o", base + ".o"],
                           capture_output=True, text=True)
        log = p.stderr + p.stdout
    res.update(parse.ptxas_info(log))
    if tools["cuobjdump"]:
        usage = parse.res_usage(subprocess.run([tools["cuobjdump"], "-res-usage", base + ".cubin"],
                                               capture_output=True, text=True).stdout)
        res["res_usage"] = usage
        if res["regs"] is None and usage:
            res["regs"] = usage["REG"]
        sass = subprocess.run([tools["cuobjdump"], "-sass", base + ".cubin"], capture_output=True, text=True).stdout
        res["sass"] = parse.sass_summary(sass)
    for ext in (".cubin", ".ptx", ".o"):
        if os.path.exists(base + ext):
            os.remove(base + ext)
    res["dots"] = parse.ttir_dots(k.asm.get("ttir", ""))
    res["wgmma"] = k.asm.get("ttgir", "").count("warp_group_dot")
    ptx_args = [name for name, ty in unit["signature"].items() if ty != "constexpr"]
    by_arg: dict[str, dict[str, int]] = {}
    for ld in parse.ptx_global_loads(k.asm["ptx"]):
        names = [ptx_args[i] for i in ld["params"] if i < len(ptx_args) and unit["signature"][ptx_args[i]].startswith("*")]
        for name in names or ["?"]:
            slot = by_arg.setdefault(name, {})
            slot[str(ld["width"])] = slot.get(str(ld["width"]), 0) + 1
    res["loads_by_arg"] = by_arg
    res["seconds"] = round(time.time() - t0, 2)
    return res


def _worker(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastpeft.check.compile")
    ap.add_argument("--units", required=True)
    ap.add_argument("--todo", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    with open(a.units) as f:
        units = {u["uid"]: u for u in json.load(f)}
    with open(a.todo) as f:
        todo = json.load(f)
    for uid, arch in todo:
        with open(a.results, "a") as f:
            f.write(json.dumps({"start": [uid, arch]}) + "\n")
        try:
            res = compile_unit(units[uid], arch, a.workdir)
        except Exception as e:  # a bug here must not hide the other units
            res = {"uid": uid, "arch": arch, "ok": False, "stage": "tool", "error": f"{type(e).__name__}: {e}",
                   "trace": traceback.format_exc()[-1500:]}
        with open(a.results, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


def compile_all(units: list[dict], todo: list[tuple[int, int]], *, jobs: int, workdir: str, env: dict,
                python: str = sys.executable, unit_timeout: float = 600.0, progress=None) -> dict:
    """{(uid, arch): result} for every pair of `todo`, compiled by `jobs` worker processes."""
    os.makedirs(workdir, exist_ok=True)
    units_path = os.path.join(workdir, "units.json")
    with open(units_path, "w") as f:
        json.dump(units, f)
    env = dict(env, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done: dict = {}

    def start(i, items):
        todo_path, res_path = os.path.join(workdir, f"todo{i}.json"), os.path.join(workdir, f"results{i}.jsonl")
        with open(todo_path, "w") as f:
            json.dump(items, f)
        if os.path.exists(res_path):
            os.remove(res_path)
        p = subprocess.Popen([python, "-m", "fastpeft.check.compile", "--units", units_path, "--todo", todo_path,
                              "--results", res_path, "--workdir", workdir], env=env,
                             stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, f"worker{i}.log"), "a"))
        return {"p": p, "items": items, "res": res_path, "i": i, "last": time.time(), "lines": 0}

    jobs = max(1, min(jobs, len(todo) or 1))
    workers = [start(i, [list(t) for t in todo[i::jobs]]) for i in range(jobs) if todo[i::jobs]]
    while workers:
        time.sleep(0.5)
        for w in list(workers):
            lines = open(w["res"]).read().splitlines() if os.path.exists(w["res"]) else []
            if len(lines) != w["lines"]:
                w["lines"], w["last"] = len(lines), time.time()
            started = None
            for line in lines:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if "start" in r:
                    started = tuple(r["start"])
                else:
                    done[(r["uid"], r["arch"])] = r
            rc = w["p"].poll()
            stalled = rc is None and time.time() - w["last"] > unit_timeout
            if rc is None and not stalled:
                continue
            if stalled:
                w["p"].kill()
                w["p"].wait()
            workers.remove(w)
            left = [it for it in w["items"] if tuple(it) not in done]
            if left and started and started not in done:
                why = f"no result after {unit_timeout:.0f} s" if stalled else f"compile worker died (exit {rc})"
                done[started] = {"uid": started[0], "arch": started[1], "ok": False, "stage": "crash", "error": why}
                left = [it for it in left if tuple(it) != started]
            if left and (rc != 0 or stalled):
                workers.append(start(w["i"], left))
            for it in left if rc == 0 and not stalled else []:
                done[tuple(it)] = {"uid": it[0], "arch": it[1], "ok": False, "stage": "tool", "error": "not compiled"}
        if progress:
            progress(len(done), len(todo))
    return done


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
