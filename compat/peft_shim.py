"""`import peft` answered by fastpeft, for running PEFT's own tests against it.

Three modes:
- "peft": the real PEFT, untouched (the baseline);
- "fastpeft": `import peft` gives fastpeft's public names (`fastpeft.__all__`), while
  `peft.<submodule>` stays the real PEFT's (the tests' own helper imports, e.g. `peft.utils`);
- "strict": `peft` and every `peft.<sub>` are fastpeft's (`fastpeft.<sub>`), nothing of PEFT's.

A name fastpeft lacks is a placeholder class (`Missing`): it can be imported, compared, hashed
and put in a parametrize list (its `__name__` is PEFT's, so test ids are PEFT's), but calling
into it, or using what a call returned, raises `MissingName`. In strict mode a `peft.<sub>` module
that fastpeft lacks is a placeholder module (all of its names are placeholders) and is listed in
`MISSING_MODULES`. Optional packages the tests import but this project does not need (diffusers,
datasets) are placeholder modules when absent; tests that really use them fail in both runs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

MODES = ("peft", "fastpeft", "strict")
OPTIONAL_PACKAGES = ("diffusers", "datasets")
MISSING_MODULES: set[str] = set()  # strict mode: `peft.<sub>` modules fastpeft does not have


class MissingName(Exception):
    """A PEFT name that fastpeft does not have was used."""

    def __init__(self, name: str):
        super().__init__(f"missing: fastpeft has no {name}")
        self.name = name


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


class _MissingMeta(type):
    """Metaclass of the placeholder classes: any use but identity, hashing and naming raises."""

    def __getattr__(cls, name):
        if _dunder(name):
            raise AttributeError(name)
        return missing(f"{cls._qualified}.{name}")

    def __call__(cls, *args, **kwargs):
        # A module-level `VeraConfig(...)` (a parametrize list) must not break collection; the
        # result raises as soon as it is used.
        return _MissingInstance(f"{cls._qualified}()")

    def __getitem__(cls, key):
        raise MissingName(f"{cls._qualified}[{key!r}]")

    def __iter__(cls):
        raise MissingName(cls._qualified)

    def __len__(cls):
        raise MissingName(cls._qualified)

    def __repr__(cls):
        return f"<missing {cls._qualified}>"


class _MissingInstance:
    def __init__(self, qualified: str):
        object.__setattr__(self, "_qualified", qualified)

    def __getattr__(self, name):
        if _dunder(name):
            raise AttributeError(name)
        raise MissingName(f"{self._qualified}.{name}")

    def __call__(self, *args, **kwargs):
        raise MissingName(self._qualified)

    def __iter__(self):
        raise MissingName(self._qualified)

    def __len__(self):
        raise MissingName(self._qualified)

    def __getitem__(self, key):
        raise MissingName(self._qualified)

    def __repr__(self):
        return f"<missing {self._qualified}>"


def missing(qualified: str) -> type:
    """A placeholder class for the PEFT name `qualified` (e.g. "peft.VeraConfig")."""
    return _MissingMeta(qualified.rsplit(".", 1)[-1], (), {"_qualified": qualified})


def is_missing(obj) -> bool:
    return isinstance(obj, _MissingMeta) or isinstance(obj, _MissingInstance)


class _PlaceholderModule(types.ModuleType):
    """A module whose every public name is a placeholder."""

    def __getattr__(self, name):
        if _dunder(name):
            raise AttributeError(name)
        return missing(f"{self.__name__}.{name}")


def _placeholder_module(name: str) -> types.ModuleType:
    module = _PlaceholderModule(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []
    return module


class _FastpeftModule(types.ModuleType):
    """`peft` or `peft.<sub>` answered by a fastpeft module: its names, else placeholders."""

    _target: types.ModuleType
    _public: frozenset | None  # the names exposed (None: every attribute)
    _strict: bool

    def __getattr__(self, name):
        if _dunder(name):
            raise AttributeError(name)
        target = object.__getattribute__(self, "_target")
        public = object.__getattribute__(self, "_public")
        if public is None or name in public:
            try:
                value = getattr(target, name)
            except AttributeError:
                value = None
            else:
                if not isinstance(value, types.ModuleType):
                    return value
        sub = f"{self.__name__}.{name}"
        if object.__getattribute__(self, "_strict") and not _has_module(f"{target.__name__}.{name}"):
            return missing(sub)
        try:  # a submodule: PEFT's own (fastpeft mode) or fastpeft's proxy (strict mode)
            return importlib.import_module(sub)
        except ImportError:
            return missing(sub)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _fastpeft_module(name: str, target: types.ModuleType, public, strict: bool, path) -> types.ModuleType:
    module = _FastpeftModule(name, getattr(target, "__doc__", None))
    object.__setattr__(module, "_target", target)
    object.__setattr__(module, "_public", None if public is None else frozenset(public))
    object.__setattr__(module, "_strict", strict)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = list(path)
    module.__file__ = getattr(target, "__file__", None)
    if public is not None:
        module.__all__ = sorted(public)
    return module


class _StrictFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Strict mode: `peft.<sub>` is `fastpeft.<sub>`, or a placeholder module when fastpeft lacks it."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("peft."):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        name = spec.name
        target = "fast" + name
        if not _has_module(target):
            MISSING_MODULES.add(name)
            return _placeholder_module(name)
        return _fastpeft_module(name, importlib.import_module(target), None, True, [])

    def exec_module(self, module):
        pass


def _install_optional_stubs() -> None:
    for name in OPTIONAL_PACKAGES:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _placeholder_module(name)


def install(mode: str) -> None:
    """Make `import peft` answer as `mode` says (idempotent within one process, one mode)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "peft":
        import peft  # noqa: F401  the real one, fully imported before the stubs go in

        _install_optional_stubs()
        return
    import fastpeft

    public = set(fastpeft.__all__) | {"__version__"}
    if mode == "fastpeft":
        import peft as real

        for name in list(sys.modules):  # keep PEFT's submodules, replace only the package
            if name == "peft":
                del sys.modules[name]
        sys.modules["peft"] = _fastpeft_module("peft", fastpeft, public, False, real.__path__)
    else:
        for name in [n for n in sys.modules if n == "peft" or n.startswith("peft.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StrictFinder())
        sys.modules["peft"] = _fastpeft_module("peft", fastpeft, public, True, [])
    _install_optional_stubs()
