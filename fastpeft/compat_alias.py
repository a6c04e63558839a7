"""`fastpeft.install_as_peft()`: make `import peft` (and `peft.tuners`, `peft.utils`...) fastpeft.

    import fastpeft
    fastpeft.install_as_peft()
    from peft import LoraConfig, get_peft_model          # fastpeft's
    from peft.tuners.lora import LoraLayer               # fastpeft.tuners.lora
    from peft.utils import get_peft_model_state_dict     # fastpeft.utils

It puts `fastpeft` into `sys.modules["peft"]` and every already imported `fastpeft.<sub>` at
`peft.<sub>`, and adds an import hook so that a later `import peft.<sub>` imports `fastpeft.<sub>`.
The real PEFT, if it was imported before, is replaced for the rest of the process; call it
before anything imports peft. `uninstall_as_peft()` undoes it (for tests).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


class _PeftAliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`peft.<sub>` -> the module object `fastpeft.<sub>` (one object under both names)."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("peft."):
            return None
        real = "fast" + fullname
        try:
            spec = importlib.util.find_spec(real)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=spec.submodule_search_locations is not None)

    def create_module(self, spec):
        return importlib.import_module("fast" + spec.name)

    def exec_module(self, module):
        pass  # already executed under its fastpeft name


_FINDER = _PeftAliasFinder()
_SAVED: dict[str, object] = {}


def install_as_peft() -> None:
    """Alias `peft` and `peft.<sub>` to fastpeft in `sys.modules` (idempotent)."""
    fastpeft = sys.modules[__name__.rpartition(".")[0]]  # the package this module belongs to
    if sys.modules.get("peft") is fastpeft:
        return
    for name in [n for n in sys.modules if n == "peft" or n.startswith("peft.")]:
        _SAVED[name] = sys.modules.pop(name)
    for name, module in list(sys.modules.items()):
        if name == "fastpeft" or name.startswith("fastpeft."):
            sys.modules[name[len("fast") :]] = module
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall_as_peft() -> None:
    """Undo `install_as_peft()`: drop the aliases, restore whatever `peft` modules were there."""
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    for name in [n for n in sys.modules if n == "peft" or n.startswith("peft.")]:
        module = sys.modules[name]
        if getattr(module, "__name__", "").startswith("fastpeft"):
            del sys.modules[name]
    sys.modules.update(_SAVED)
    _SAVED.clear()
