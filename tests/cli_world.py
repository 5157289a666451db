"""The folders a careless user points the CLI at (issue 15): a tiny parent with the byte tokenizer, a text,
an elastic checkpoint trained by `nestlm elastify`, a slice of it and a packed (NVFP4) copy of the slice.
Also the tools the careless-user tests share: a snapshot of a tree (bytes of every file) and a CLI run that
returns (exit status, stdout, stderr)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from conftest import randomize_, tiny_hybrid_config

import nestlm
from nestlm.cli import main
from nestlm.data import ByteTokenizer

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.\n") * 12

ELASTIC_YAML = """\
budgets: [1.0, 0.75, 0.6]
choices:
  hidden: [1.0, 0.5]
  mamba_heads_per_group: [1.0, 0.5]
  attn_heads_per_group: [1.0, 0.5]
align: 16
steps: 6
batch: 2
seq_len: 16
lr_router: 0.03
router_hidden: 16
calib_batches: 1
checkpoint_every: 2
"""


def run(argv: list) -> tuple[int, str, str]:
    """`nestlm argv` in this process -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict:
    """Every path under root -> its bytes (None for a folder): equal snapshots mean nothing changed."""
    return {p.relative_to(root): (p.read_bytes() if p.is_file() else None) for p in sorted(Path(root).rglob("*"))}


def make_world(root: Path) -> dict[str, Path]:
    """root/{hf, text.txt, elastic.yaml, elastic, slice, packed}; shapes stay multiples of 16 (NVFP4)."""
    torch.manual_seed(0)
    hf = nestlm.to_hf(randomize_(nestlm.Decoder(tiny_hybrid_config(vocab_size=259, shared_intermediate_size=32)),
                                 seed=0), root / "hf")
    ByteTokenizer().save(hf)
    (root / "text.txt").write_text(TEXT)
    (root / "elastic.yaml").write_text(ELASTIC_YAML)
    w = {"root": root, "hf": hf, "text": root / "text.txt", "yaml": root / "elastic.yaml",
         "elastic": root / "elastic", "slice": root / "slice", "packed": root / "packed"}
    for argv in (["elastify", w["yaml"], "--model", hf, "--text", w["text"], "--out", w["elastic"]],
                 ["slice", w["elastic"], "--budget", "60%", "-o", w["slice"]],
                 ["quantize", w["slice"], "-o", w["packed"], "--calib-tokens", "0"]):
        code, out, err = run(argv)
        assert code == 0, (argv, err)
    return w
