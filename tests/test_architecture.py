"""The shape of the code, checked: imports point down the layers, no import cycles, small
functions (docs/architecture.md draws the layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "imgcls"

# rank of each top-level part of the package: a module may import its own part and lower ranks
LAYERS = {
    "errors": 0, "registry": 0, "version": 0,
    "data": 1,
    "config": 1.5,  # validates decode settings with data/intensity.py
    "models": 2,
    "artifact": 3, "bundle": 3, "rundir": 3,
    "engine": 4,
    "evaluation": 5, "explain": 5, "export": 5,
    "serve": 6,
    "api": 7,
    "runs": 8, "curation": 8,  # label issues, ranking: workflows on the API, like runs
    "cli": 9, "__main__": 9, "__init__": 9,
}
# below the API: never the API, the run workflow or the package root
NO_API = ("data", "models", "artifact", "bundle", "rundir", "engine", "evaluation", "explain", "export", "serve")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every imgcls module ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n == "imgcls" or n.startswith("imgcls.")}
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {m: {i for i in _imports(p) if i != m} for m, p in MODULES.items()}


def test_every_part_has_a_layer():
    assert {_part(m) for m in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    mine = _part(module)
    wrong = []
    for target in GRAPH[module]:
        theirs = _part(target)
        if theirs != mine and LAYERS[theirs] > LAYERS[mine]:
            wrong.append(target)
        if mine in NO_API and (target == "imgcls" or theirs in ("api", "runs", "cli")):
            wrong.append(target)
    assert not wrong, f"{module} imports upward: {sorted(set(wrong))}"


def test_no_import_cycles():
    # module-level imports only: a cycle there is an import-order bug waiting to happen
    top = {}
    for m, p in MODULES.items():
        tree = ast.parse(p.read_text())
        body_imports = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imgcls"):
                body_imports |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                                 for a in node.names}
            elif isinstance(node, ast.Import):
                body_imports |= {a.name for a in node.names if a.name.startswith("imgcls")}
        top[m] = {t for t in body_imports if t in MODULES and t != m}
    # a package's __init__ importing its own submodules is how packages work: not a cycle
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in top[m]:
            if state.get(t) == 1 and not (m.startswith(t + ".") or t.startswith(m + ".")):
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [m, t]))
            if t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in sorted(top):
        if m not in state:
            visit(m, [])


def test_no_function_over_80_lines():
    long = []
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert not long, long


def test_api_stays_thin():
    assert len((PKG / "api.py").read_text().splitlines()) < 350
