"""Test-wide setup.

Without a GPU, Triton kernels run under its interpreter, which must be switched on before
Triton is first imported; a GPU run (bench/gpu.sh) sets TRITON_INTERPRET=0 itself.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"].lower() in ("1", "true", "yes", "on")
HAS_CUDA = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not (HAS_CUDA and not INTERPRET):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device with TRITON_INTERPRET=0"))
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: pass --runslow"))


@pytest.fixture
def device():
    """Where kernel tests put their tensors: the GPU when kernels compile for it, else the CPU."""
    return "cuda" if HAS_CUDA and not INTERPRET else "cpu"


@pytest.fixture
def triton_backend(monkeypatch):
    """Force fastpeft.ops onto the Triton kernels (under the interpreter on a CPU)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
