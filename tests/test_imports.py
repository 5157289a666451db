"""The package's import graph, parsed (module-level imports and those deferred inside functions), against the
order DESIGN.md states ("Direction of imports"): errors/model/arch/io at the bottom, with the quantization
primitives (formats, fake, and the packed layout they define) beside them; then convert, elastic, load (the
one folder opener: it sits under slicing, which opens its source with it), slicing (plain and packed cuts,
one plan, and both writers), quant export, inference, then info / evaluate / serve, then cli / demo. Nothing
imports upwards or in a circle, between modules or between subpackages."""

from __future__ import annotations

import ast
from pathlib import Path

import nestlm

SRC = Path(nestlm.__file__).parent

# DESIGN.md's order, lowest first. A module may import its own layer or any below it (a module's layer: its
# longest prefix here). The bottom is split only where its modules import each other (errors imports
# nothing; model.config and io sit under the model; the quantization primitives wrap the model's layers).
LAYERS = [
    ["errors", "device"],  # bottom: imports nothing (device: the one --device / --dtype rule)
    ["model.config", "io", "data"],  # bottom: the config dataclass, checkpoint files, offline text
    ["model", "arch"],  # bottom: the model and its counting
    ["quant"],  # beside the bottom: quantization primitives (formats, fake, packed layout)
    ["convert"],
    ["elastic"],
    ["load"],  # the one folder opener (plain, packed, elastic) and loader: the slicer opens its source with it
    ["slicing"],  # plain and packed cuts, one plan; the plain and the packed writer
    ["quantize"],  # quant export (`nestlm quantize`)
    ["inference"],
    ["info", "evaluate", "plan", "search", "inference.serve", "inference.text"],  # entry points: they load a checkpoint
    ["cli", "demo", "__init__"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

# The same order between subpackages (a top-level module counts as its own): a subpackage may import only
# those of a lower (or its own) rank, so no two import each other. The server, an entry point, lives in
# inference/ beside what it serves; it imports `load`, below inference here.
PACKAGES = [
    ["errors", "device"],
    ["model", "io", "data", "arch"],
    ["quant"],
    ["convert"],
    ["elastic"],
    ["load"],
    ["slicing"],
    ["quantize"],
    ["inference"],
    ["info", "evaluate", "plan", "search"],
    ["cli", "demo"],
]
PACKAGE_RANK = {name: i for i, names in enumerate(PACKAGES) for name in names}


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


def _package(mod: str) -> str:
    return mod.split(".")[0]


def _package_graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m, deps in _graph().items():
        out.setdefault(_package(m), set()).update(_package(n) for n in deps if _package(n) != _package(m))
    return out


def test_no_module_imports_upwards():
    bad = [f"nestlm.{m} (layer {_rank(m)}) imports nestlm.{n} (layer {_rank(n)})"
           for m, deps in sorted(_graph().items()) for n in sorted(deps) if _rank(n) > _rank(m)]
    assert not bad, "\n".join(bad)


def test_no_subpackage_imports_upwards_or_in_a_circle():
    graph = _package_graph()
    unknown = sorted(set(graph) - set(PACKAGE_RANK))
    assert not unknown, f"subpackages in no entry of PACKAGES: {unknown}"
    bad = [f"nestlm.{p} (rank {PACKAGE_RANK[p]}) imports nestlm.{q} (rank {PACKAGE_RANK[q]})"
           for p, deps in sorted(graph.items()) for q in sorted(deps) if PACKAGE_RANK[q] > PACKAGE_RANK[p]]
    assert not bad, "\n".join(bad)
    mutual = sorted(f"{p} <-> {q}" for p, deps in graph.items() for q in deps if p < q and p in graph.get(q, ()))
    assert not mutual, f"subpackages importing each other: {mutual}"


def test_the_layers_are_design_md_order():
    """The order above is DESIGN.md's: the quantization primitives under elastic and slicing, the packed
    writer in slicing, quant export above slicing, inference above them, the entry points on top (one
    change: the folder opener, load, sits under slicing)."""
    r = _rank
    assert r("quant.formats") < r("elastic.train") < r("slicing.write") < r("quantize") < r("inference.generate")
    assert r("quant.fake") < r("convert") < r("elastic.artifact") < r("load") < r("slicing.plan") < r("info") < r("cli")
    assert _rank("slicing.packed") == RANK["slicing"] and _rank("quant.packed") == RANK["quant"]


def test_the_graph_is_read():
    graph = _graph()
    assert "model.layout" in graph["model.layers"]  # a module-level import
    assert len(graph) > 20
    assert "elastic" in _package_graph()["slicing"]  # the package graph holds cross-package edges
