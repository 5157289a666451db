"""The package's import graph, parsed (module-level imports and those deferred inside functions): no cycle
between modules, and no module imports a layer above its own (DESIGN.md's direction of imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import nestlm

SRC = Path(nestlm.__file__).parent

# lowest first; a module may import its own layer or any below it (a module's layer: its longest prefix here)
LAYERS = [
    ["errors", "device"],
    ["model.config", "io", "data"],
    ["model", "arch"],
    ["convert", "quant.formats", "quant.fake"],
    ["elastic", "inference"],
    ["slicing", "quant"],
    ["load", "info", "evaluate", "plan", "search", "inference.serve", "inference.text"],  # they load a checkpoint
    ["cli", "demo", "__init__"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _rank(mod: str) -> int:
    parts = mod.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return RANK[".".join(parts[:n])]
    raise AssertionError(f"nestlm.{mod} is in no layer of this test: add it to LAYERS")


def _imports(path: Path, mod: str, modules: set[str]) -> set[str]:
    """The nestlm modules that `mod` imports, anywhere in the file (`from nestlm.x import y` counts as
    nestlm.x.y when that is a module, else nestlm.x)."""
    out = set()
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*up, base]).strip(".")
                base = "nestlm." + base if base else "nestlm"
            # a submodule (from nestlm.model import layout) is that module; any other name: the package
            names = [f"{base}.{a.name}" if f"{base}.{a.name}".removeprefix("nestlm.") in modules else base
                     for a in node.names]
        else:
            continue
        for n in names:
            if n == "nestlm" or not n.startswith("nestlm."):
                continue
            target = n.removeprefix("nestlm.")
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != mod:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in SRC.rglob("*.py")}
    files.pop("__init__", None)  # the package root re-exports the public API: it sits on top
    modules = set(files)
    return {m: _imports(p, m, modules) for m, p in files.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join([*stack[stack.index(n):], n]))
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_imports_upwards():
    bad = [f"nestlm.{m} (layer {_rank(m)}) imports nestlm.{n} (layer {_rank(n)})"
           for m, deps in sorted(_graph().items()) for n in sorted(deps) if _rank(n) > _rank(m)]
    assert not bad, "\n".join(bad)


def test_the_graph_is_read():
    graph = _graph()
    assert "model.layout" in graph["model.layers"]  # a module-level import
    assert len(graph) > 20
