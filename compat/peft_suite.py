"""PEFT's own test suite run against fastpeft: one command, a report in docs/PEFT_COMPAT.md.

    python -m compat.peft_suite                 # sampled run (8 tests per test function)
    python -m compat.peft_suite --sample 0      # every in-scope test (slow)
    python -m compat.peft_suite --no-strict     # skip the strict-mode run

Steps: (1) fetch the test files of the installed peft version from the package registry
(`pip download peft==X --no-binary :all: --no-deps`; the sdist ships tests/), cached in
$FASTPEFT_PEFT_TESTS_CACHE or ~/.cache/fastpeft/peft-tests/<version>; (2) run FILES against real
PEFT, which decides the scope (methods and LoRA variants outside the plan are excluded) and the
sample; (3) run the same ids against fastpeft (the shim: fastpeft's top-level names, PEFT's
submodules) and in strict mode (fastpeft only); (4) classify every failure and write the report.
Each pytest run has a wall-clock limit and runs in its own process; with $FASTPEFT_CPU_LOCK set,
each takes that lock first (`flock`), as every test run on the shared machine must.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

from compat import classify

FILES = ("test_custom_models.py", "test_config.py", "test_low_level_api.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "docs", "PEFT_COMPAT.md")
INI = os.path.join(ROOT, "compat", "pytest.ini")


def peft_version() -> str:
    return importlib.metadata.version("peft")


def cache_dir(version: str) -> str:
    base = os.environ.get("FASTPEFT_PEFT_TESTS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastpeft", "peft-tests"
    )
    return os.path.join(base, version)


def fetch_tests(version: str | None = None) -> str:
    """The folder holding PEFT `version`'s `tests/` (downloaded once, then cached)."""
    version = version or peft_version()
    root = cache_dir(version)
    tests = os.path.join(root, "tests")
    if os.path.isfile(os.path.join(tests, "__init__.py")):
        return root
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"peft=={version}", "--no-binary", ":all:", "--no-deps",
             "--no-build-isolation", "-d", tmp, "-q"],
            check=True,
        )
        (sdist,) = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
        with tarfile.open(os.path.join(tmp, sdist)) as tar:
            prefix = f"{sdist[: -len('.tar.gz')]}/tests/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for member in members:
                member.name = member.name[len(prefix) - len("tests/") :]
            tar.extractall(root, members=members, filter="data")
    # PEFT's repository has tests/__init__.py (the files import each other relatively); the sdist not
    with open(os.path.join(tests, "__init__.py"), "w") as f:
        f.write(f"# PEFT {version}'s tests, fetched by fastpeft's compat/peft_suite.py\n")
    return root


def plugin_path() -> str:
    """A folder holding only a link to compat/, for PYTHONPATH: the repository root must not go on
    sys.path, its `kernels/` folder would shadow the hub's `kernels` package (DESIGN.md)."""
    base = os.path.join(os.path.dirname(cache_dir("x")), "pythonpath",
                        hashlib.sha1(ROOT.encode()).hexdigest()[:12])
    link = os.path.join(base, "compat")
    if not os.path.islink(link):
        os.makedirs(base, exist_ok=True)
        os.symlink(os.path.join(ROOT, "compat"), link)
    return base


def run_pytest(root: str, impl: str, out: str, files=FILES, extra=(), timeout: int = 3600) -> float:
    """One pytest process over PEFT's `files` with `import peft` as `impl`; returns seconds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([plugin_path(), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env.setdefault("TRITON_INTERPRET", "1")
    env.setdefault("FASTPEFT_BACKEND", "torch")
    lock = os.environ.get("FASTPEFT_CPU_LOCK")  # a shared machine: each pytest run takes the lock
    cmd = [
        *(["flock", lock] if lock else []), "timeout", str(timeout),
        sys.executable, "-m", "pytest", "-c", INI, "--rootdir", root, "-p", "compat.peft_plugin",
        "-p", "no:cacheprovider", "-q", "--no-header", "--continue-on-collection-errors",
        f"--peft-impl={impl}", f"--compat-out={out}", *extra,
        *[os.path.join(root, "tests", f) for f in files],
    ]
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    if rc == 124:
        print(f"  {impl}: stopped after {timeout}s (the report counts what finished)", file=sys.stderr)
    return time.perf_counter() - start


def read_rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, default=8, help="tests per test function (0: all)")
    parser.add_argument("--files", nargs="*", default=list(FILES))
    parser.add_argument("--no-strict", action="store_true")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run")
    parser.add_argument("--work", default=None, help="folder for the raw JSON lines (default: a temp dir)")
    parser.add_argument("--report", default=REPORT)
    parser.add_argument("--reuse", action="store_true", help="reuse the baseline of a previous --work run")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the report from --work's results")
    args = parser.parse_args(argv)

    version = peft_version()
    root = fetch_tests(version)
    work = args.work or tempfile.mkdtemp(prefix="peft-compat-")
    os.makedirs(work, exist_ok=True)
    base_out, ids = os.path.join(work, "peft.jsonl"), os.path.join(work, "ids.txt")
    times = {}
    if not ((args.reuse or args.render_only) and os.path.isfile(base_out)):
        print(f"PEFT {version} tests in {root}; baseline (real PEFT), sample={args.sample} ...", file=sys.stderr)
        times["peft"] = run_pytest(root, "peft", base_out, args.files,
                                   ["--compat-scope", f"--compat-sample={args.sample}"], args.timeout)
    base = read_rows(base_out)
    with open(ids, "w") as f:
        f.writelines(r["id"] + "\n" for r in base if r["kind"] == "test")
    runs = {"peft": base}
    for impl in ("fastpeft",) if args.no_strict else ("fastpeft", "strict"):
        out = os.path.join(work, f"{impl}.jsonl")
        if not args.render_only:
            print(f"{impl} ...", file=sys.stderr)
            times[impl] = run_pytest(root, impl, out, args.files, [f"--compat-ids={ids}"], args.timeout)
        runs[impl] = read_rows(out)
    summary = classify.summarize(runs, args.files)
    text = classify.render(summary, version=version, sample=args.sample, times=times)
    os.makedirs(os.path.dirname(args.report), exist_ok=True)
    with open(args.report, "w") as f:
        f.write(text)
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(classify.headline(summary), file=sys.stderr)
    print(f"report: {args.report}; raw results: {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
