"""The house plan's layout rules (../shared/DESIGN.md), checked on the source text with `ast`.

- Imports point down only: the graph of fastpeft's own modules has no cycle. Every import
  counts, including those inside functions (a lazy import hides a cycle, it does not remove one).
- No module over 600 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600



def _modules() -> dict[str, Path]:
    """Import name -> file, for every module of fastpeft/ and kernels/ (installed as fastpeft.kernels)."""
    found = {}
    for folder, prefix in ((ROOT / "fastpeft", "fastpeft"), (ROOT / "kernels", "fastpeft.kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b` imports the module a.b when there is one, else a name of a
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                          for alias in node.names]
        else:
            continue
        for cand in candidates:
            while cand and cand not in modules:  # `import a.b.c` imports a.b.c (and its parents)
                cand = cand.rpartition(".")[0]
            if cand and cand != name:
                targets.add(cand)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan), i.e. the cycles."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


KERNEL_IMPORTERS: set[str] = set()  # modules besides fastpeft.ops allowed to import fastpeft.kernels: none


def test_cycles_finds_every_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert [sorted(c) for c in _cycles(graph)] == [["a", "b", "c"]]


def test_only_ops_imports_kernels_and_kernels_import_nothing_above():
    graph = _graph()
    for name, imports in graph.items():
        kernels = {m for m in imports if m.startswith("fastpeft.kernels")}
        if name.startswith("fastpeft.kernels"):
            assert imports == kernels, f"{name} imports {sorted(imports - kernels)}: kernels know no modules"
        elif not name.startswith("fastpeft.ops") and name not in KERNEL_IMPORTERS:
            assert not kernels, f"{name} imports {sorted(kernels)}: only fastpeft.ops may"


def test_graph_sees_lazy_and_relative_imports():
    graph = _graph()
    assert "fastpeft.kernels.reference" in graph["fastpeft.ops"] or any(
        "fastpeft.kernels.reference" in graph[m] for m in graph if m.startswith("fastpeft.ops."))
    # fastpeft/__init__.py's imports are all found (the public API re-exports)
    assert "fastpeft.model" in graph["fastpeft"]


def test_no_import_cycles():
    cycles = [sorted(c) for c in _cycles(_graph())]
    assert cycles == [], f"import cycles (lazy imports count): {cycles}"


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_size(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (> {MAX_LINES}): split it"
