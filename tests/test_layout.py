"""The package's layout keeps its design: imports between the stage folders go one way,
and no module imports itself back through others (docs/architecture.md).

The import graph is read from the source (every `import` statement, at the top of a
module or inside a function: a lazy import is still a dependency), not by importing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Circles that issue 17a (the trainer's TokenSource protocol) removes in parallel with the
# layout; the integrator drops each line once that work is merged.
KNOWN_CIRCLES: list[set[str]] = []  # (the trainer's two went with issue 17's TokenSource)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "featcache").rglob("*.py")):
        out[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    for path in sorted((ROOT / "cli").rglob("*.py")):  # installed as featcache.cli
        out["featcache.cli." + ".".join(path.relative_to(ROOT / "cli").with_suffix("").parts)] \
            = path
    return {name.removesuffix(".__init__"): path for name, path in out.items()}


def _targets(module: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The featcache modules one import statement names."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.startswith("featcache")}
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parts, base] if base else parts)
    if not base.startswith("featcache"):
        return set()
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found |= _targets(name, path, node, modules)
        edges[name] = {t for t in found if t in modules and t != name}
    return edges


FOLDERS = ("backbones", "cache", "cli", "extracting", "probing", "records", "reporting",
           "serving", "sources", "suites")


def _folder(module: str) -> str:
    """The folder a module lives in ("top" for the package's shared modules)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS else "top"


# folder → the folders it must never import
FORBIDDEN = {
    "records": {"probing", "reporting", "serving", "extracting", "cli"},
    "cache": {"probing", "records", "reporting", "serving", "extracting", "cli"},
    "extracting": {"probing", "records", "reporting", "serving", "cli"},
    "probing": {"reporting", "serving", "cli"},
    "reporting": {"serving", "extracting", "cli"},
    "backbones": {"probing", "records", "reporting", "serving", "extracting", "cli"},
    "sources": {"probing", "records", "reporting", "serving", "extracting", "cli"},
    "suites": {"serving", "cli"},  # a suite runs extract, probe and report in turn
}
# The shared top-level modules import only one another and the plugin families
# (backbones/, sources/: at the top for their documented plugin paths), except:
TOP_ALLOWED = {
    "featcache.offline_demo": {"*"},  # `featcache demo` runs every stage in turn
    "featcache.__main__": {"featcache.cli.main"},  # `python -m featcache` is the CLI
    "featcache.atomic": {"featcache.records.schema"},  # no output may land on a run's files
}


def test_the_stages_import_one_way(graph):
    wrong = [f"{m} imports {t}" for m, targets in graph.items() for t in targets
             if _folder(t) in FORBIDDEN.get(_folder(m), set())]
    assert not wrong, "\n".join(wrong)


def test_serving_is_imported_only_by_the_cli(graph):
    wrong = [f"{m} imports {t}" for m, targets in graph.items() for t in targets
             if _folder(t) == "serving" and _folder(m) not in ("serving", "cli")]
    assert not wrong, "\n".join(wrong)


def test_shared_modules_import_no_stage(graph):
    wrong = []
    for module, targets in graph.items():
        if _folder(module) != "top" or TOP_ALLOWED.get(module) == {"*"}:
            continue
        for target in targets:
            if _folder(target) in ("top", "backbones", "sources"):
                continue
            if target not in TOP_ALLOWED.get(module, set()):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def _circles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    item = stack.pop()
                    on_stack.discard(item)
                    component.add(item)
                    if item == node:
                        break
                if len(component) > 1:
                    out.append(component)
    return out


def test_the_circle_finder_finds_circles():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert _circles(edges) == [{"a", "b", "c"}]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back(graph):
    circles = [c for c in _circles(graph) if c not in KNOWN_CIRCLES]
    assert not circles, "import circles: " + "; ".join(" ↔ ".join(sorted(c)) for c in circles)


def test_few_modules_at_the_top():
    top = sorted(p.name for p in (ROOT / "featcache").glob("*.py"))
    assert len(top) <= 15, top


def test_the_graph_sees_lazy_and_relative_imports(graph):
    """The checks above read what they claim to: a function-level import counts."""
    assert "featcache.probing.methods" in graph["featcache.reporting.columns"]
    assert "featcache.reporting.figures" in graph["featcache.reporting.build"]  # lazy
    assert "featcache.serving.inference" in graph["featcache.cli.predict_cmd"]  # lazy
