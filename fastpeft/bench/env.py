"""The bench's environment: which device, which versions, and the input checks that run
before any timing starts."""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import warnings
from pathlib import Path

import torch

PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes")


class BenchError(Exception):
    """Bad input found before any timing starts (the CLI prints it and exits non-zero)."""


@contextlib.contextmanager
def peer_warnings():
    """Silence the deprecation warnings a peer (real peft) raises from its own calls into
    transformers, e.g. peft 0.21's ``is_gradient_checkpointing`` read in ``get_peft_model``: we
    cannot fix its calls, and they would fill the progress bar (or, under ``-W error``, fail the
    peer's rows). Wrap only peer code in it; fastpeft's own calls are fixed, never silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


class Quietly:
    """A peer's callable (a forward, a decode step, a training step) that runs inside
    `peer_warnings()`; other attributes pass through (a decode step's `static_step`)."""

    def __init__(self, call):
        self.call = call

    def __call__(self):
        with peer_warnings():
            return self.call()

    def __getattr__(self, name: str):
        return getattr(self.call, name)


def package_versions() -> dict[str, str]:
    """python, fastpeft and each of PACKAGES: the installed version or "not installed".

    Reads package metadata only: importing bitsandbytes or peft here would be slow and noisy.
    """
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("fastpeft",) + PACKAGES[1:]:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(device: str) -> dict:
    """{"type", "name", "summary", ...} for "cpu" or "cuda" (the current CUDA device)."""
    if device == "cuda":
        idx = torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        cc = f"sm_{p.major}{p.minor}"
        gib = p.total_memory / 2**30
        return {"type": "cuda", "index": idx, "name": p.name, "capability": cc,
                "memory_gib": round(gib, 1), "count": torch.cuda.device_count(),
                "summary": f"cuda:{idx} {p.name} ({cc}, {gib:.0f} GiB)"}
    name, cores = _cpu_model(), os.cpu_count()
    return {"type": "cpu", "name": name, "cores": cores, "torch_threads": torch.get_num_threads(),
            "summary": f"cpu {name} ({cores} cores; torch threads: {torch.get_num_threads()})"}


def ops_backend(device: str) -> str:
    """The backend `fastpeft.ops` picks for tensors on `device`, or why it cannot say."""
    try:
        from fastpeft import ops
    except Exception as e:  # noqa: BLE001  (ops may be broken or missing: report, don't crash)
        return f"unknown (fastpeft.ops unavailable: {type(e).__name__}: {e})"
    try:
        return ops.resolve_backend(torch.empty(0, device=device))
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__}: {e})"


def check_names(option: str, names: list[str] | None, known: list[str], listed: list[str] | None = None) -> list[str]:
    """`names`, or all of `known` when none are given; BenchError names the unknown ones and the
    known ones (as `listed`, default `known`) after the `option` they came with."""
    if not names:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"{option}: unknown {unknown}; known: {known if listed is None else listed}")
    return names


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on")


def check_device(device: str | None) -> str:
    """Resolve None to cuda when available else cpu; raise BenchError for an unusable device."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        why = ("this torch has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise BenchError(f"--device cuda: CUDA is not available ({why}; torch {torch.__version__})")
    return device


def prepare_out(out: str | os.PathLike) -> Path:
    """Create `out` (and parents) and prove it is writable; raise BenchError if not."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise BenchError(f"--out {out}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".fastpeft-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise BenchError(f"--out {out}: cannot create or write the directory ({e.strerror or e})")
    return path


