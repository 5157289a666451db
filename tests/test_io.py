"""nestlm.io.tokenizer: the one tokenizer rule (byte file, HF files, byte-sized vocabulary, else an error),
the prefix tokenizer and the vocabulary check, against the UTF-8 bytes the byte tokenizer's ids are."""

from __future__ import annotations

import pytest
import torch

from nestlm.data import ByteTokenizer
from nestlm.errors import CheckpointError, ConfigError
from nestlm.io.tokenizer import TOKENIZER_FILES, check_ids, load_tokenizer, text_tokens

TEXT = "In the beginning God créated the heaven and the earth. "


def test_the_one_rule(tmp_path):
    ByteTokenizer().save(tmp_path / "byte")
    tok = load_tokenizer(tmp_path / "byte")
    assert tok.byte and (tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 259)
    assert tok.encode(TEXT) == list(TEXT.encode("utf-8")) and tok.decode(tok.encode(TEXT)) == TEXT

    ByteTokenizer().hf_tokenizer().save_pretrained(str(tmp_path / "hf"))  # HF files only: AutoTokenizer
    hf = load_tokenizer(tmp_path / "hf", vocab_size=64)
    assert not hf.byte and (hf.bos_id, hf.eos_id) == (256, 257)
    assert hf.encode(TEXT) == list(TEXT.encode("utf-8")) and hf.encode_tensor(TEXT).tolist() == hf.encode(TEXT)
    assert hf.decode(hf.encode(TEXT) + [257]) == TEXT  # special tokens dropped

    (tmp_path / "none").mkdir()
    assert load_tokenizer(tmp_path / "none", vocab_size=259).byte
    with pytest.raises(CheckpointError, match=r"no tokenizer files .* its vocabulary \(64\) is not the byte"):
        load_tokenizer(tmp_path / "none", vocab_size=64)
    with pytest.raises(CheckpointError, match="no such folder"):
        load_tokenizer(tmp_path / "missing", vocab_size=259)
    assert ByteTokenizer.FILE in TOKENIZER_FILES and "tokenizer.json" in TOKENIZER_FILES


def test_text_tokens_and_check_ids():
    tok = load_tokenizer_bytes()
    full = tok.encode_tensor(TEXT * 20)
    assert torch.equal(text_tokens(tok, TEXT * 20, need=37), full[:37])
    assert torch.equal(text_tokens(tok, TEXT * 20), full)
    check_ids(full, 256, "text")
    with pytest.raises(ConfigError, match=r"^text: token id 195 is outside the model's vocabulary \(vocab_size 150\)"):
        check_ids(full, 150, "text")
    with pytest.raises(ConfigError, match="token id -1 is outside"):
        check_ids(torch.tensor([[3, -1]]), 200, "batch")


def load_tokenizer_bytes():
    from nestlm.io.tokenizer import Tokenizer

    return Tokenizer(ByteTokenizer())
