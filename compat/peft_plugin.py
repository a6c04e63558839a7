"""pytest plugin that runs PEFT's test files against real PEFT or fastpeft (`-p compat.peft_plugin`).

Options:
  --peft-impl peft|fastpeft|strict   what `import peft` is (compat/peft_shim.py)
  --compat-out FILE                  write one JSON line per test: outcome, exception, cause hints
  --compat-scope                     (baseline run) decide the scope: deselect and record the
                                     tests of methods and LoRA variants outside the plan
  --compat-sample K                  (with --compat-scope) keep K tests per test function
  --compat-ids FILE                  run only these test ids (the baseline's selection)

The baseline run (real PEFT) decides scope and sample, since only there are the config classes
real; the fastpeft runs then take exactly its ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import os
import re
import sys

import pytest

from compat import peft_shim

# fastpeft's plan for this measure: these PEFT methods (LoRA includes DoRA and rsLoRA).
IN_SCOPE_CONFIGS = frozenset({"LoraConfig", "IA3Config", "AdaLoraConfig"})
# fastpeft implements these too, but issue 23 measures LoRA, IA3 and AdaLoRA only.
OTHER_FASTPEFT_CONFIGS = frozenset({"PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig"})
GENERIC_CONFIGS = frozenset({"PeftConfig", "PromptLearningConfig", "PeftConfigMixin"})
# LoRA variants outside the plan: a LoraConfig keyword (and value test) -> the variant's name.
LORA_VARIANTS = {
    "velora_config": (lambda v: v is not None, "VeLoRA"),
    "kasa_config": (lambda v: v is not None, "KaSA"),
    "use_bdlora": (lambda v: bool(v), "BD-LoRA"),
    "lora_bias": (lambda v: v is True, "lora_bias"),
    "monteclora_config": (lambda v: v is not None, "MonteCLoRA"),
    "init_lora_weights": (lambda v: v == "mica", "MiCA"),
}
_SOURCE_VARIANTS = [
    (re.compile(r"velora_config\s*="), "VeLoRA"),
    (re.compile(r"kasa_config\s*=|KasaConfig\("), "KaSA"),
    (re.compile(r"use_bdlora\s*=|BdLoraConfig\("), "BD-LoRA"),
    (re.compile(r"lora_bias\s*=\s*True"), "lora_bias"),
    (re.compile(r"monteclora_config\s*=|MontecloraConfig\("), "MonteCLoRA"),
    (re.compile(r"init_lora_weights\s*=\s*[\"']mica"), "MiCA"),
]
# LoRA variants configured by a config class of their own (a LoraConfig field's value)
VARIANT_CONFIGS = {"VeloraConfig": "VeLoRA", "KasaConfig": "KaSA", "BdLoraConfig": "BD-LoRA",
                   "MontecloraConfig": "MonteCLoRA", "ArrowConfig": "Arrow"}
_CONFIG_NAME = re.compile(r"\b([A-Z][A-Za-z0-9]*Config)\b")


def pytest_addoption(parser):
    group = parser.getgroup("compat", "PEFT test suite against fastpeft (issue 23)")
    group.addoption("--peft-impl", default=os.environ.get("FASTPEFT_PEFT_IMPL", "peft"), choices=peft_shim.MODES)
    group.addoption("--compat-out", default=None)
    group.addoption("--compat-scope", action="store_true")
    group.addoption("--compat-sample", type=int, default=0)
    group.addoption("--compat-ids", default=None)


def pytest_configure(config):
    _block_network()
    peft_shim.install(config.getoption("--peft-impl"))
    _stay_offline(str(config.rootpath))
    config._compat = _Recorder(config.getoption("--compat-out"))


def pytest_unconfigure(config):
    recorder = getattr(config, "_compat", None)
    if recorder is not None:
        recorder.close(sorted(peft_shim.MISSING_MODULES))


class _Recorder:
    """Writes each row as soon as it is known, so a run stopped by its time limit still reports."""

    def __init__(self, path):
        self.file = open(path, "w") if path else None
        self.rows: dict[str, dict] = {}

    def add(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def finish(self, nodeid: str) -> None:
        row = self.rows.pop(nodeid, None)
        if row is not None:
            self.add(row)

    def close(self, missing_modules) -> None:
        for nodeid in list(self.rows):
            self.finish(nodeid)
        self.add({"kind": "meta", "missing_modules": missing_modules})
        if self.file is not None:
            self.file.close()


def _no_network(*args, **kwargs):
    raise OSError("network disabled by compat/peft_plugin.py: the model hub is not reachable here")


def _block_network() -> None:
    """Hub downloads fail at once instead of waiting for timeouts (PEFT's `hub_online_once` turns
    offline mode off for a model's first use); the same in every run."""
    import socket

    socket.socket.connect = _no_network
    socket.create_connection = _no_network
    socket.getaddrinfo = _no_network


@contextlib.contextmanager
def _offline_once(model_id):
    yield


def _stay_offline(rootdir: str) -> None:
    """PEFT's `hub_online_once` goes online for a model's first use; here every use stays offline
    (HF_HUB_OFFLINE=1), so a test that needs the hub fails at once, the same in every run. The test
    modules import the helper by name, so it is swapped before they are collected."""
    if not os.path.isfile(os.path.join(rootdir, "tests", "testing_utils.py")):
        return
    if rootdir not in sys.path:
        sys.path.insert(0, rootdir)
    testing_utils = importlib.import_module("tests.testing_utils")
    testing_utils.hub_online_once = _offline_once


# -- scope -----------------------------------------------------------------------------------
def _config_names_in(value, depth: int = 0) -> set[str]:
    import peft

    names = set()
    if isinstance(value, type) and issubclass(value, peft.PeftConfig):
        names.add(value.__name__)
    elif isinstance(value, peft.PeftConfig):
        names.add(type(value).__name__)
    elif isinstance(value, (list, tuple)) and depth < 2:
        for item in value:
            names |= _config_names_in(item, depth + 1)
    return names


def _variants_in(value) -> set[str]:
    out = set()
    if isinstance(value, dict):
        for key, val in value.items():
            if key in LORA_VARIANTS and LORA_VARIANTS[key][0](val):
                out.add(LORA_VARIANTS[key][1])
    elif isinstance(value, (list, tuple)):
        for item in value:
            out |= _variants_in(item)
    else:  # a LoraConfig instance
        for key, (test, variant) in LORA_VARIANTS.items():
            try:
                if key in getattr(value, "__dataclass_fields__", {}) and test(getattr(value, key)):
                    out.add(variant)
            except Exception:
                pass
    return out


def _known_peft_configs() -> set[str]:
    import peft
    from peft.tuners.lora import config as lora_config

    out = set()
    for module in (peft, lora_config):
        for name in dir(module):
            obj = getattr(module, name, None)
            if name.endswith("Config") and isinstance(obj, type):
                out.add(name)
    return out


def scope_of(item, known: set[str]) -> tuple[set[str], str | None]:
    """(config class names the test uses, exclusion reason or None)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    configs, variants = set(), set()
    for value in params.values():
        configs |= _config_names_in(value)
        variants |= _variants_in(value)
    if not configs:  # not parametrized by config: what the test's own code names
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError):
            source = ""
        configs = {n for n in _CONFIG_NAME.findall(source) if n in known}
        variants |= {name for pattern, name in _SOURCE_VARIANTS if pattern.search(source)}
    configs -= GENERIC_CONFIGS
    variants |= {VARIANT_CONFIGS[c] for c in configs if c in VARIANT_CONFIGS}
    configs -= set(VARIANT_CONFIGS)
    outside = sorted(configs - IN_SCOPE_CONFIGS)
    not_planned = [c for c in outside if c not in OTHER_FASTPEFT_CONFIGS]
    if not_planned:
        return configs, f"method not in fastpeft's plan: {not_planned[0].removesuffix('Config')}"
    if outside:
        return configs, ("method outside this measure (fastpeft has it; issue 23 measures LoRA/IA3/AdaLoRA): "
                         f"{outside[0].removesuffix('Config')}")
    if variants:
        return configs, f"LoRA variant not in the plan: {sorted(variants)[0]}"
    return configs, None


def stratum(nodeid: str) -> str:
    """The test function a test id belongs to (parameters dropped)."""
    return nodeid.split("[", 1)[0]


def _rank(nodeid: str) -> str:
    return hashlib.sha1(nodeid.encode()).hexdigest()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    recorder = config._compat
    keep, drop = [], []
    if config.getoption("--compat-scope"):
        known = _known_peft_configs()
        by_stratum: dict[str, list] = {}
        for item in items:
            configs, reason = scope_of(item, known)
            if reason:
                drop.append(item)
                recorder.add({"kind": "excluded", "id": item.nodeid, "reason": reason})
            else:
                by_stratum.setdefault(stratum(item.nodeid), []).append(item)
        k = config.getoption("--compat-sample")
        for group in by_stratum.values():
            chosen = sorted(group, key=lambda it: _rank(it.nodeid))
            if k > 0:
                for item in chosen[k:]:
                    recorder.add({"kind": "unsampled", "id": item.nodeid})
                drop.extend(chosen[k:])
                chosen = chosen[:k]
            keep.extend(chosen)
        keep.sort(key=lambda it: items.index(it))
    else:
        keep = list(items)
    ids_file = config.getoption("--compat-ids")
    if ids_file:
        with open(ids_file) as f:
            wanted = {line.strip() for line in f if line.strip()}
        found = {item.nodeid for item in keep}
        drop.extend(item for item in keep if item.nodeid not in wanted)
        keep = [item for item in keep if item.nodeid in wanted]
        for nodeid in sorted(wanted - found):
            recorder.add({"kind": "not_collected", "id": nodeid})
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_collectreport(report):
    if report.failed:
        config = _CONFIG[0]
        if config is not None:
            message = str(report.longrepr)[-2000:]
            config._compat.add({"kind": "collect_error", "id": report.nodeid, "message": message})


_CONFIG = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    _CONFIG[0] = session.config


# -- outcomes --------------------------------------------------------------------------------
def _fastpeft_dir() -> str | None:
    module = sys.modules.get("fastpeft")
    return os.path.dirname(module.__file__) if module is not None and module.__file__ else None


def _exception_row(excinfo) -> dict:
    exc = excinfo.value
    missing = None
    seen, cur = set(), exc
    while cur is not None and id(cur) not in seen:  # a MissingName anywhere in the chain
        seen.add(id(cur))
        if isinstance(cur, peft_shim.MissingName):
            missing = cur.name
            break
        cur = cur.__cause__ or cur.__context__
    fp_dir = _fastpeft_dir()
    in_fastpeft = False
    if fp_dir:
        tb = excinfo.tb
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.startswith(fp_dir):
                in_fastpeft = True
            tb = tb.tb_next
    return {
        "exc_type": type(exc).__name__,
        "message": str(exc)[:600],
        "missing": missing,
        "raised_in_fastpeft": in_fastpeft,
    }


def pytest_runtest_logfinish(nodeid, location):
    config = _CONFIG[0]
    if config is not None:
        config._compat.finish(nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    recorder = item.config._compat
    row = recorder.rows.setdefault(item.nodeid, {"kind": "test", "id": item.nodeid, "outcome": "passed"})
    if report.skipped and row["outcome"] == "passed":
        row["outcome"] = "skipped"
        longrepr = report.longrepr
        row["message"] = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)[:300]
    elif report.failed and row["outcome"] in ("passed", "skipped"):
        row["outcome"] = "failed" if call.when == "call" else "error"
        row["when"] = call.when
        if call.excinfo is not None:
            row.update(_exception_row(call.excinfo))
        else:
            row["message"] = str(report.longrepr)[-600:]
    if call.when == "call":
        row["duration"] = round(report.duration, 3)
