"""The docs can't drift (issue 27): every command block of README.md and docs/*.md marked

    <!-- tested: runs in seconds on the demo's outputs (tests/test_docs.py) -->

(an HTML comment on the line before the fence, invisible on GitHub) runs, line by line, on the outputs of a
small demo built once per session, and every line must exit 0. Marked blocks hold plain `nestlm ...` lines
only (comments allowed); they run in this process through nestlm.cli.main, in a private folder that holds
the demo as `nestlm-demo/`, with the docs' `/tmp/` redirected into that folder so runs never collide."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from cli_world import run

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- tested: runs in seconds on the demo's outputs (tests/test_docs.py) -->"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def marked_blocks() -> list[tuple[str, int, list[str]]]:
    """(file, line number, command lines) of every marked fenced block."""
    blocks = []
    for f in DOCS:
        lines = f.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != MARK:
                continue
            assert lines[i + 1].startswith("```"), f"{f.name}:{i + 1}: the mark must sit right above a fence"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            cmds = [ln for ln in lines[i + 2:end] if ln.strip() and not ln.lstrip().startswith("#")]
            blocks.append((f.relative_to(ROOT).as_posix(), i + 1, cmds))
    return blocks


BLOCKS = marked_blocks()


def test_the_marked_blocks_are_found():
    files = {f for f, _, _ in BLOCKS}
    assert "README.md" in files and "docs/guide.md" in files and "docs/quant.md" in files
    assert sum(len(c) for _, _, c in BLOCKS) >= 15  # a lost mark shows here
    for f, n, cmds in BLOCKS:
        assert cmds and all(c.startswith("nestlm ") for c in cmds), (f, n, cmds)


@pytest.fixture(scope="session")
def demo_outputs(tmp_path_factory):
    """A small demo (the quick sizes, 8 pretraining and 6 elastify steps): the folders the docs name under
    nestlm-demo/ (elastic/, budget_100/, budget_75/, budget_50/), in seconds."""
    import torch

    from nestlm.demo import demo

    out = tmp_path_factory.mktemp("docs") / "nestlm-demo"
    n = torch.get_num_threads()
    try:
        demo(out, steps=8, quick=True, elastify_steps=6, threads=1)
    finally:
        torch.set_num_threads(n)
    return out


@pytest.mark.parametrize("where, cmds", [(f"{f}:{n}", c) for f, n, c in BLOCKS], ids=[f"{f}:{n}" for f, n, _ in BLOCKS])
def test_a_marked_docs_block_runs(demo_outputs, tmp_path, monkeypatch, where, cmds):
    import torch

    (tmp_path / "nestlm-demo").symlink_to(demo_outputs)
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path)
    n = torch.get_num_threads()
    try:
        for cmd in cmds:
            argv = shlex.split(re.sub(r"(?<![\w.])/tmp/", f"{tmp_path}/tmp/", cmd), comments=True)
            code, out, err = run(argv[1:])
            assert code == 0, f"{where}: `{cmd}` exited {code}: {err.strip()[-500:]}"
    finally:
        torch.set_num_threads(n)
