"""The code's shape: one-way layers, no import cycle inside the library, first-party imports at module top,
small files, one root for library errors."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import harma
import harma.errors

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """First-party modules ``path`` imports when it is imported (statements outside functions)."""
    module, is_package = _module_name(path), path.name == "__init__.py"
    found = set()
    tree = ast.parse(path.read_text())

    def visit(body) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node)
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)  # `from . import x` names a module
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []) or [])

    visit(tree.body)
    deps = set()
    for name in found:
        # importing a.b.c runs the packages a.b first; the root package itself is left out (it
        # imports the public API and nothing imports it back at module level)
        parts = name.split(".")
        deps.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    # a package's own __init__ is already running when its submodules import each other
    return {d for d in deps if d in modules and d != module and not module.startswith(d + ".")}


def _library_graph() -> dict[str, set[str]]:
    files = sorted((ROOT / "harma").rglob("*.py"))
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _top_level_imports(p, modules) for p in files}


def _find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return []


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_library_has_no_import_cycle():
    graph = _library_graph()
    assert "harma.model" in graph and "harma.archs" in graph["harma.model"]  # the graph sees real imports
    assert _find_cycle(graph) == []


def test_first_party_imports_are_at_module_top_or_say_why():
    """An import of our own code inside a function hides a dependency (and often a cycle); one is
    allowed only with a comment on its line saying why."""
    hidden = []
    for path in sorted([*(ROOT / "harma").rglob("*.py"), *(ROOT / "training").rglob("*.py"),
                        *(ROOT / "harma_app").rglob("*.py"), ROOT / "app.py"]):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom):
                    first_party = inner.level > 0 or (inner.module or "").split(".")[0] in (
                        "harma", "training", "harma_app")
                elif isinstance(inner, ast.Import):
                    first_party = any(a.name.split(".")[0] in ("harma", "training", "harma_app") for a in inner.names)
                else:
                    continue
                if first_party and "#" not in lines[inner.lineno - 1]:
                    hidden.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert hidden == []


def test_no_source_file_over_400_lines():
    sources = [*ROOT.glob("*.py"), *(p for d in ("harma", "training", "harma_app", "benchmarks", "tests")
                                    for p in (ROOT / d).rglob("*.py"))]
    assert len(sources) > 40
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_library_error_derives_from_one_root():
    errors = [obj for _, obj in inspect.getmembers(harma.errors, inspect.isclass)
              if issubclass(obj, Exception) and obj.__module__ == "harma.errors"]
    assert len(errors) >= 10
    assert all(issubclass(e, harma.errors.HarmaError) for e in errors)
    # nothing else in the library defines an exception class of its own
    defined = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in sorted((ROOT / "harma").rglob("*.py"))
               if p.name != "errors.py" for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.ClassDef) and any(
                   getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception")) for b in node.bases)]
    assert defined == []
    assert issubclass(harma.ConfigError, harma.errors.HarmaError) and harma.HarmaError is harma.errors.HarmaError


def _imports_of(folder: Path, names: tuple[str, ...]) -> list[str]:
    """``file:line`` of every import statement in ``folder/**/*.py`` naming one of the top-level ``names``."""
    pattern = re.compile(rf"^\s*(?:from|import)\s+(?:{'|'.join(names)})(?:[.\s,]|$)")
    return [f"{p.relative_to(ROOT)}:{i}" for p in sorted(folder.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.match(line)]


@pytest.mark.slow
def test_layers_import_one_way():
    """harma (library) <- harma_app (the app; app.py is its entry) and harma <- training: the library imports
    neither (nor gradio), and the app does not import training."""
    assert _imports_of(ROOT / "harma", ("training", "app", "harma_app")) == []
    assert _imports_of(ROOT / "harma_app", ("training", "app")) == []
    # at run time, in one fresh interpreter: the library first, then the app on top of it
    code = ("import sys, harma, harma.data, harma.summary; "
            "print(any(m.startswith(('training', 'app', 'harma_app', 'gradio')) for m in sys.modules)); "
            "import app, harma_app; print(sorted({m for m in sys.modules if m.split('.')[0] == 'training'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["False", "[]"], out.stderr
