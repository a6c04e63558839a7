"""The `fastpeft` command: `fastpeft info`, `fastpeft bench` and `fastpeft check-kernels` (also
`python -m fastpeft`).

`main(argv)` returns the exit status instead of exiting, so tests call it in-process:
0 on success, 2 for bad input (unknown option, unusable --device or --out), found before any
timing starts; 1 when a run fails.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastpeft import __version__

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastpeft",
        description="fastpeft: fused Triton kernels for PEFT. Inspect this machine or measure "
                    "the LoRA inference latency penalty on it.")
    p.add_argument("--version", action="version", version=f"fastpeft {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{info,bench,check-kernels}")
    sub.add_parser("info", help="device, the backend fastpeft.ops picks, package versions")
    b = sub.add_parser(
        "bench", help="the inference latency penalty of PEFT methods on this device",
        description="Kernels: time base F.linear, merged W+sBA, PEFT's eager unfused LoRA, real "
                    "peft's LoraLayer and fastpeft.ops.lora_linear at decode and prefill M. "
                    "NF4: the 4-bit layer against dense and bitsandbytes. Multi: mixed-adapter "
                    "batches against one adapter and against peft's adapter_names=. "
                    "Methods: every method in a whole model (prefill, decode) against the bare "
                    "model, fastpeft and real peft side by side. Prints Markdown tables (and "
                    "with --out writes results.json, results.md, plot.png).")
    b.add_argument("--out", metavar="DIR", help="write results.json, results.md and plot.png here")
    b.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a benchmark")
    b.add_argument("--device", choices=("cpu", "cuda"),
                   help="where to run (default: cuda when available, else cpu)")
    b.add_argument("--threads", type=int, metavar="N",
                   help="CPU only: torch intra-op threads while timing (default 1)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.add_argument("--sections", type=_names, metavar="A,B",
                   help="comma-separated subset of: kernels, nf4, multi, methods, training (default: all)")
    b.add_argument("--methods", type=_names, metavar="A,B",
                   help="comma-separated methods for the methods section (default: all)")
    b.add_argument("--model", metavar="PATH",
                   help="a local transformers model for the methods section (default: a seeded "
                        "Llama sized for the device): a causal LM or an encoder such as BERT")
    b.add_argument("--target-modules", type=_names, metavar="A,B",
                   help="module names the LoRA-family methods adapt (e.g. query,value for BERT; "
                        "default: every linear layer of the generated Llama, on --model the "
                        "libraries' default for its model type)")
    c = sub.add_parser(
        "check-kernels", help="compile every kernel for H100/A100 without a GPU and check it",
        description="Drive every launcher's GPU path through fastpeft.ops without a GPU, compile each "
                    "launch with Triton for sm_90a and sm_80, read registers, spills, shared memory, "
                    "tensor-core instructions, load widths and grids, print one table and exit 1 if "
                    "any pass criterion fails (fastpeft/check/criteria.py), 2 if it cannot run.")
    from fastpeft.check import add_arguments

    add_arguments(c)
    return p


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _info() -> int:
    import torch

    from fastpeft import bench

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = bench.describe_device(device)
    backend = bench.ops_backend(device)
    env = {k: os.environ.get(k) or "unset" for k in ("FASTPEFT_BACKEND", "TRITON_INTERPRET")}
    lines = [f"device:   {dev['summary']}"]
    if device == "cuda" and dev["count"] > 1:
        lines.append(f"          ({dev['count']} CUDA devices visible; this is the current one)")
    lines.append(f"backend:  {backend}  (what fastpeft.ops picks for tensors on {device}; "
                 + ", ".join(f"{k}={v}" for k, v in env.items()) + ")")
    import fastpeft
    from fastpeft import registry

    for name, version in bench.package_versions().items():
        where = f"  ({os.path.dirname(fastpeft.__file__)})" if name == "fastpeft" else ""
        lines.append(f"{name + ':':<14}{version}{where}")
    lines.append(f"methods:  {', '.join(registry.methods())}  (peft_type, as registered)")
    print("\n".join(lines))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fastpeft import bench

    # Everything that can be wrong with the input is found here, before any timing starts.
    try:
        device = bench.check_device(args.device)
        if args.threads is not None and args.threads < 1:
            raise bench.BenchError(f"--threads must be >= 1, got {args.threads}")
        sections = bench.check_sections(args.sections)
        names = bench.methods.check_methods(args.methods)
        out = bench.prepare_out(args.out) if args.out else None
        model = None
        if args.model and ("methods" in sections or "training" in sections):
            model = bench.methods.load_model(args.model, device, args.quick)
        if args.target_modules is not None:
            bench.methods.check_targets(model, args.target_modules)
    except bench.BenchError as e:
        print(f"fastpeft bench: error: {e}", file=sys.stderr)
        return 2
    if device == "cuda" and bench.interpreting():
        print("fastpeft bench: warning: TRITON_INTERPRET is on, so Triton kernels run in the "
              "interpreter: the fastpeft row will not show kernel speed", file=sys.stderr)

    if args.threads is not None and device != "cpu":
        print("fastpeft bench: note: --threads only applies to --device cpu", file=sys.stderr)
    result = bench.run(device, quick=args.quick, progress=not args.no_progress,
                       threads=args.threads, sections=sections, method_names=names, model=model,
                       target_modules=args.target_modules)
    table = bench.format_tables(result)
    if out is not None:
        for note in bench.write_outputs(result, out):
            print(f"fastpeft bench: {note}", file=sys.stderr)
        print(f"fastpeft bench: wrote {out}/results.json, results.md"
              + (", plot.png" if (out / "plot.png").exists() else ""), file=sys.stderr)
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error (or --help)
        return e.code if isinstance(e.code, int) else 2
    if args.command == "info":
        return _info()
    if args.command == "bench":
        return _bench(args)
    if args.command == "check-kernels":
        from fastpeft.check import run_cli

        return run_cli(args)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
