"""What a fresh install and a fresh checkout give a user: the version, and a `kernels/` folder
that never shadows the Hugging Face hub package of that name."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import fastpeft
from fastpeft.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_comes_from_the_installed_metadata(capsys):
    assert fastpeft.__version__ == importlib.metadata.version("fastpeft")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastpeft {fastpeft.__version__}"


def _python_in_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    """`python -c code` started in the checkout's root, which puts the root on sys.path."""
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_import_kernels_in_the_checkout_gets_the_hub_package_or_nothing():
    code = ("import importlib.util, os, kernels; "
            "print(os.path.dirname(os.path.abspath(kernels.__file__)))")
    run = _python_in_root(code)
    hub = importlib.util.find_spec("kernels")  # outside the root: only an installed package
    if hub is None:
        assert run.returncode != 0 and "No module named 'kernels'" in run.stderr, run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert Path(run.stdout.strip()) == Path(hub.origin).parent
        assert Path(run.stdout.strip()) != ROOT / "kernels"


def test_import_kernels_in_the_checkout_without_the_hub_package_fails_cleanly():
    run = _python_in_root("import kernels", "-S")  # -S: no site-packages, so no hub package
    assert run.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in run.stderr, run.stderr


def test_fastpeft_kernels_is_this_folder():
    import fastpeft.kernels

    assert Path(fastpeft.kernels.__file__).parent.name == "kernels"
    assert fastpeft.kernels.__name__ == "fastpeft.kernels"
