"""Classify PEFT-suite outcomes against the real-PEFT baseline and render docs/PEFT_COMPAT.md.

A test counts when it passes with real PEFT. Everything else is excluded with its reason: outside
the plan (decided when collecting, compat/peft_plugin.py), not in the sample, or failing/skipped
with real PEFT too (hub downloads, missing GPUs...). A counted test that fails with fastpeft gets
one cause: missing name, layer type, behaviour, numeric or other; and a gap key for the list.
"""

from __future__ import annotations

import collections
import re

CAUSES = ("missing name", "layer type", "behaviour", "numeric", "other")
_ATTR = re.compile(r"'(\w+)' object has no attribute '(\w+)'")
_KWARG = re.compile(r"(\w+)\(\) got an unexpected keyword argument '(\w+)'")
_IMPORT = re.compile(r"cannot import name '(\w+)'")
_LAYER = re.compile(r"of type (\w+) is not supported")
_NOTIMPL = re.compile(r"fastpeft does not implement (\w+)")
_HUB = re.compile(r"network disabled|huggingface\.co|offline|HF_HUB_OFFLINE|LocalEntryNotFound|hub|couldn't connect|"
                  r"Can't load|cached files|snapshot|\bnot a valid model identifier", re.I)


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1]


def baseline_reason(row: dict) -> str:
    """Why a test that does not pass with real PEFT is left out."""
    message = row.get("message", "") or ""
    if row["outcome"] == "skipped":
        return "skipped with real PEFT: " + _short(message, 60)
    if _HUB.search(message):
        return "fails with real PEFT: needs the model hub"
    if "diffusers" in message or "datasets" in message:
        return "fails with real PEFT: needs diffusers/datasets (not installed)"
    if "cuda" in message.lower() or "gpu" in message.lower() or "accelerator" in message.lower():
        return "fails with real PEFT: needs an accelerator"
    return f"fails with real PEFT: {row.get('exc_type', 'error')}"


def cause_of(row: dict) -> tuple[str, str]:
    """(cause, gap key) of a fastpeft failure of a test that passes with real PEFT."""
    message = row.get("message", "") or ""
    exc = row.get("exc_type", "")
    if row["outcome"] == "not_collected":
        return "other", "test id not collected (the module failed to import, or ids differ)"
    if row.get("missing"):
        return "missing name", row["missing"].split("()", 1)[0]
    if m := _NOTIMPL.search(message):
        return "missing name", f"LoraConfig field {m.group(1)}"
    if m := _LAYER.search(message):
        return "layer type", f"adapter on {m.group(1)}"
    if exc == "AttributeError" and (m := _ATTR.search(message)):
        return "missing name", f"{m.group(1)}.{m.group(2)}"
    if exc == "TypeError" and (m := _KWARG.search(message)):
        return "missing name", f"{m.group(1)}({m.group(2)}=)"
    if exc == "TypeError" and "unsupported keyword arguments" in message:
        return "missing name", "argument " + _short(message.split("unsupported keyword arguments", 1)[1], 50)
    if exc in ("ImportError", "ModuleNotFoundError") and (m := _IMPORT.search(message)):
        return "missing name", m.group(1)
    if exc == "Failed" and ("DID NOT RAISE" in message or "DID NOT WARN" in message):
        return "behaviour", _short(message, 70)
    if "Regex pattern did not match" in message or "Regex: " in message:
        return "behaviour", "different error message: " + _short(message.split("Input:", 1)[-1], 60)
    if exc == "AssertionError" and re.search(r"not close|allclose|Mismatched elements|isclose|atol", message):
        return "numeric", _short(message, 70)
    if row.get("raised_in_fastpeft") and exc in ("ValueError", "TypeError", "KeyError", "RuntimeError"):
        return "behaviour", f"fastpeft raises {exc}: {_short(message, 60)}"
    return "other", f"{exc}: {_short(message, 70)}"


def _short(text: str, n: int) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"0x[0-9a-f]+", "0x..", text)
    return text if len(text) <= n else text[: n - 3] + "..."


def _tests(rows: list[dict]) -> dict[str, dict]:
    out = {r["id"]: r for r in rows if r.get("kind") == "test"}
    for r in rows:  # an id the baseline ran that this run did not collect
        if r.get("kind") == "not_collected" and r["id"] not in out:
            out[r["id"]] = {**r, "outcome": "not_collected"}
    return out


def summarize(runs: dict[str, list[dict]], files) -> dict:
    base_rows = runs["peft"]
    base = _tests(base_rows)
    excluded = [r for r in base_rows if r.get("kind") == "excluded"]
    unsampled = [r for r in base_rows if r.get("kind") == "unsampled"]
    counted = {i for i, r in base.items() if r["outcome"] == "passed"}
    out = {"files": {}, "impls": {}, "collect_errors": {}, "missing_modules": {}}
    for f in files:
        in_file = lambda ids: [i for i in ids if file_of(i) == f]  # noqa: E731
        reasons = collections.Counter(r["reason"] for r in excluded if file_of(r["id"]) == f)
        reasons.update(baseline_reason(r) for i, r in base.items() if file_of(i) == f and r["outcome"] != "passed")
        out["files"][f] = {
            "collected": len(in_file(base)) + sum(1 for r in excluded if file_of(r["id"]) == f)
            + sum(1 for r in unsampled if file_of(r["id"]) == f),
            "unsampled": sum(1 for r in unsampled if file_of(r["id"]) == f),
            "run": len(in_file(base)),
            "counted": len(in_file(counted)),
            "excluded": dict(reasons.most_common()),
        }
    for impl, rows in runs.items():
        if impl == "peft":
            continue
        tests = _tests(rows)
        per_file, causes, gaps, examples = {}, collections.Counter(), collections.Counter(), {}
        for f in files:
            per_file[f] = {"passed": 0, "failed": 0}
        for nodeid in sorted(counted):
            row = tests.get(nodeid, {"id": nodeid, "outcome": "not_collected"})
            f = file_of(nodeid)
            if row["outcome"] == "passed":
                per_file[f]["passed"] += 1
                continue
            per_file[f]["failed"] += 1
            if row["outcome"] == "skipped":
                cause, gap = "other", "skipped with fastpeft: " + _short(row.get("message", ""), 60)
            else:
                cause, gap = cause_of(row)
            causes[cause] += 1
            gaps[(cause, gap)] += 1
            examples.setdefault((cause, gap), nodeid)
        out["impls"][impl] = {
            "per_file": per_file,
            "passed": sum(v["passed"] for v in per_file.values()),
            "counted": len(counted),
            "causes": dict(causes.most_common()),
            "gaps": [(c, g, n, examples[(c, g)]) for (c, g), n in gaps.most_common()],
        }
        out["collect_errors"][impl] = [r for r in rows if r.get("kind") == "collect_error"]
        meta = [r for r in rows if r.get("kind") == "meta"]
        out["missing_modules"][impl] = meta[-1]["missing_modules"] if meta else []
    out["collect_errors"]["peft"] = [r for r in base_rows if r.get("kind") == "collect_error"]
    return out


def headline(summary: dict) -> str:
    parts = []
    for impl, s in summary["impls"].items():
        pct = 100 * s["passed"] / s["counted"] if s["counted"] else 0.0
        parts.append(f"{impl}: {s['passed']}/{s['counted']} ({pct:.1f}%)")
    return "pass rate of the tests that pass with real PEFT: " + "; ".join(parts)


def render(summary: dict, version: str, sample: int, times: dict) -> str:
    lines = [
        "# PEFT's own tests against fastpeft",
        "",
        "Generated by `python -m compat.peft_suite` (compat/peft_suite.py); do not edit by hand.",
        "",
        f"PEFT {version}'s test files (from its sdist on PyPI) run three ways: against real PEFT (the baseline),",
        "against fastpeft through the shim (`import peft` gives fastpeft's top-level names, `peft.<submodule>`",
        "stays PEFT's, a name fastpeft lacks raises \"missing\") and in strict mode (fastpeft's modules only:",
        "`peft.<sub>` is `fastpeft.<sub>`). A test counts when it passes with real PEFT; LoRA (with DoRA and",
        "rsLoRA), IA3 and AdaLoRA are in scope.",
        "",
        ("Sampling: " + (f"at most {sample} tests per test function (parameters chosen by a hash of the test id, "
                         "the same in every run)." if sample else "none: every in-scope test ran.")),
        "Wall time on this machine's CPU: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ".",
        "",
        "## Result",
        "",
        "| run | passes / counted | rate |",
        "|---|---|---|",
    ]
    for impl, s in summary["impls"].items():
        pct = 100 * s["passed"] / s["counted"] if s["counted"] else 0.0
        lines.append(f"| {impl} | {s['passed']} / {s['counted']} | {pct:.1f}% |")
    lines += ["", "## Per file", ""]
    impls = list(summary["impls"])
    lines.append("| file | collected | not sampled | run with PEFT | counted (pass with PEFT) | "
                 + " | ".join(f"{i} pass / fail" for i in impls) + " |")
    lines.append("|---" * (5 + len(impls)) + "|")
    for f, s in summary["files"].items():
        cells = [f"{summary['impls'][i]['per_file'][f]['passed']} / {summary['impls'][i]['per_file'][f]['failed']}"
                 for i in impls]
        lines.append(f"| {f} | {s['collected']} | {s['unsampled']} | {s['run']} | {s['counted']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "### Excluded, with the reason", ""]
    plan = "method not in fastpeft's plan: "
    for f, s in summary["files"].items():
        lines.append(f"- **{f}**")
        methods = {r[len(plan):]: n for r, n in s["excluded"].items() if r.startswith(plan)}
        if methods:
            listed = ", ".join(f"{m} {n}" for m, n in methods.items())
            lines.append(f"  - {sum(methods.values())}: methods not in fastpeft's plan ({listed})")
        for reason, n in s["excluded"].items():
            if not reason.startswith(plan):
                lines.append(f"  - {n}: {reason}")
    for impl, s in summary["impls"].items():
        lines += ["", f"## Gaps ({impl}), most frequent first", ""]
        lines.append("Causes: " + ", ".join(f"{c} {s['causes'].get(c, 0)}" for c in CAUSES) + ".")
        lines += ["", "| tests | cause | gap | example test |", "|---|---|---|---|"]
        for cause, gap, n, example in s["gaps"]:
            gap_cell = gap.replace("|", "\\|")
            lines.append(f"| {n} | {cause} | {gap_cell} | `{example.split('::', 1)[1]}` |")
    lines += ["", "## Collection", ""]
    for impl, errors in summary["collect_errors"].items():
        lines.append(f"- {impl}: " + ("no collection errors" if not errors else
                                      f"{len(errors)} collection errors: "
                                      + "; ".join(f"{e['id']}: {_short(e['message'][-200:], 120)}"
                                                  for e in errors)))
    for impl, mods in summary["missing_modules"].items():
        if impl == "strict":
            lines.append("- strict: `peft.<sub>` modules fastpeft lacks (answered by placeholder modules): "
                         + (", ".join(f"`{m}`" for m in mods) or "none"))
    return "\n".join(lines) + "\n"
