"""`fastpeft check-kernels`: every kernel compiled for H100 (sm_90a) and A100 (sm_80) on a CPU.

Without a GPU, the tests run the kernels under ``TRITON_INTERPRET=1``, and the interpreter
accepts programs that the real compiler rejects or that spill, overflow shared memory or leave
the tensor cores idle on a card. This package drives every launcher's GPU path through the public
`fastpeft.ops` calls, records the launches instead of running them, compiles each distinct one
with Triton for each target, reads registers, spills, shared memory, tensor-core instructions,
load widths and grid sizes from the toolchain in the triton wheel, and judges them:

  scenarios.py  the shapes (decode M = 1/4/16, prefill 2048; 4096x4096, 4096x14336; ranks 8-64;
                fp16/bf16/fp32) and families driven;
  capture.py    the launch recorder (a child process: it patches torch and Triton);
  compile.py    compile + ptxas/cuobjdump per unit and target (worker processes);
  parse.py      parsers of ptxas -v, cuobjdump, SASS, TTIR and PTX;
  criteria.py   the pass criteria;  report.py  table, JSON, bench/KERNELS.md;
  run.py        the pipeline.
"""
from __future__ import annotations

import argparse
import sys

from fastpeft.check.run import CheckError, check

__all__ = ["check", "CheckError", "run_cli", "add_arguments"]

def add_arguments(p) -> None:
    """The `check-kernels` options, added to an argparse (sub)parser."""
    p.add_argument("--arch", default="sm_90a,sm_80", metavar="A,B",
                   help="targets, comma-separated: sm_90a (H100), sm_80 (A100) (default: both)")
    p.add_argument("--quick", action="store_true",
                   help="every kernel family once on the shapes the criteria look at, the heaviest "
                        "autotune config of each launch: the CI smoke set")
    p.add_argument("--full", action="store_true", help="the whole dtype x M x rank x shape product")
    p.add_argument("--json", metavar="PATH", help="write every unit x target, its numbers and verdicts here")
    p.add_argument("--markdown", metavar="PATH", help="write the report as Markdown (bench/KERNELS.md)")
    p.add_argument("--jobs", type=int, metavar="N", help="compile workers (default: the CPU count, at most 8)")
    p.add_argument("--kernel", metavar="REGEX", help="only kernels whose module:name matches")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="Triton cache for the compiles (default: $TRITON_CACHE_DIR or "
                        "~/.cache/fastpeft/check-kernels); a warm cache makes a rerun much faster")
    p.add_argument("--scenarios", default="fastpeft.check.scenarios", help=argparse.SUPPRESS)


def run_cli(args) -> int:
    """Run `fastpeft check-kernels` from parsed arguments: 0 pass, 1 any failure, 2 cannot run."""
    from fastpeft.check import criteria, report

    try:
        archs = tuple(dict.fromkeys(criteria.arch_of(a) for a in args.arch.split(",") if a.strip()))
        if not archs:
            raise ValueError("--arch: give at least one target")
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        if args.quick and args.full:
            raise ValueError("--quick and --full exclude each other")
    except ValueError as e:
        print(f"fastpeft check-kernels: error: {e}", file=sys.stderr)
        return 2
    level = "quick" if args.quick else "full" if args.full else "default"
    try:
        result = check(archs, level=level, jobs=args.jobs, scenarios=args.scenarios, cache_dir=args.cache_dir,
                       kernel_filter=args.kernel,
                       log=lambda msg: print(f"fastpeft check-kernels: {msg}", file=sys.stderr, flush=True))
    except CheckError as e:
        print(f"fastpeft check-kernels: cannot run: {e}", file=sys.stderr)
        return 2
    print(report.format_table(result))
    if args.json:
        report.write_json(result, args.json)
    if args.markdown:
        command = " ".join(["fastpeft check-kernels", f"--arch {args.arch}", *(["--quick"] if args.quick else []),
                            *(["--full"] if args.full else []), *([f"--kernel '{args.kernel}'"] if args.kernel else []),
                            f"--markdown {args.markdown}"])
        with open(args.markdown, "w") as f:
            f.write(report.markdown(result, command))
    return 1 if result["failures"] else 0
