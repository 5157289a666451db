"""Every dotted nestlm name in the docs (docs/*.md, README.md) and in the code (src, bench, recipes) resolves: a
module, or an attribute of one (`nestlm.inference.text.think_answer`), and every name a
`from nestlm.x import a, b` line in them imports exists. Moving or deleting a function then fails here
until the text that names it follows."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import nestlm

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(nestlm.__file__).parent
DOTTED = re.compile(r"(?<![\w./-])nestlm(?:\.[A-Za-z_]\w*)+(?!\w*:)")  # "nestlm.x:" is a label (an RNG seed string)
FROM_IMPORT = re.compile(r"^\s*from (nestlm(?:\.\w+)*) import \(?([\w, ]+)", re.M)


def resolves(dotted: str) -> bool:
    """Whether `dotted` names a module or an attribute chain of one (the longest importable prefix)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ModuleNotFoundError as e:
            if e.name is not None and not ".".join(parts[:n]).startswith(e.name):
                raise  # the module exists but imports something missing: not a stale name
            continue
        for p in parts[n:]:
            if not hasattr(obj, p):
                return False
            obj = getattr(obj, p)
        return True
    return False


def texts() -> dict[str, str]:
    """{where: text} of every doc file and every Python file of the package, bench/ and recipes/ (docstrings,
    messages such as bench_model's old "see nestlm.pretrained", and imports alike)."""
    docs = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
    code = [*sorted(SRC.rglob("*.py")), *sorted((ROOT / "bench").glob("*.py")), *sorted((ROOT / "recipes").rglob("*.py"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in [*docs, *code]}


def stale_names(found: dict[str, str]) -> list[str]:
    bad = []
    for where, text in found.items():
        names = {m.group(0) for m in DOTTED.finditer(text)}
        for mod, imported in FROM_IMPORT.findall(text):
            names |= {f"{mod}.{n.split()[0]}" for n in imported.split(",") if n.strip()}
        bad += [f"{where}: {n}" for n in sorted(names) if not resolves(n)]
    return bad


def test_every_dotted_name_in_the_docs_and_docstrings_resolves():
    found = texts()
    assert len(found) > 80  # the docs and the code were read
    bad = stale_names(found)
    assert not bad, "names of things that do not exist:\n" + "\n".join(bad)


def test_the_check_catches_a_stale_name():
    bad = stale_names({"a.md": "see `nestlm.inference.two_phase.think_answer` and nestlm.reasoning;\n"
                                "from nestlm.cli import think_answer\nfrom nestlm.inference.text import think_answer"})
    assert bad == ["a.md: nestlm.cli.think_answer", "a.md: nestlm.inference.two_phase.think_answer",
                   "a.md: nestlm.reasoning"]
