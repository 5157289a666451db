"""The one tokenizer loader, the file names a tokenizer lives in, and the vocabulary check.

    tok = load_tokenizer("out/elastic", vocab_size)   # the folder's tokenizer (one rule, below)
    ids = tok.encode("text"); t = tok.encode_tensor(long_text); tok.decode(ids); tok.bos_id, tok.eos_id
    ids = text_tokens(tok, text, need=4097)            # a long text: only a prefix long enough for `need`
    check_ids(ids, vocab_size, "calibration batch 0")  # ConfigError for an id outside the vocabulary

The rule: nestlm_tokenizer.json -> the byte tokenizer (nestlm.data.ByteTokenizer); Hugging Face tokenizer
files -> AutoTokenizer; no tokenizer files and a byte-sized vocabulary (256 or 259) -> the byte tokenizer;
else a CheckpointError that says what to copy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nestlm.data import ByteTokenizer, portable_tokenizer_config
from nestlm.errors import CheckpointError, ConfigError

__all__ = ["HF_TOKENIZER_FILES", "TOKENIZER_FILES", "Tokenizer", "check_ids", "check_utf8", "copy_tokenizer",
           "folder_tokens", "load_tokenizer", "text_tokens"]

# what AutoTokenizer reads (any one of the first four means the folder has a Hugging Face tokenizer)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                      "special_tokens_map.json")
# every file that travels with the weights when a folder is converted, sliced or quantized
TOKENIZER_FILES = (ByteTokenizer.FILE, *HF_TOKENIZER_FILES, "generation_config.json", "chat_template.jinja")
BYTE_VOCABS = (256, ByteTokenizer().vocab_size)  # the byte tokenizer's ids, without and with its specials


def check_utf8(text: str, what: str = "the text") -> str:
    """`text`, or ConfigError when it holds characters no UTF-8 encoding has: the lone surrogates Python
    makes of a command line's invalid UTF-8 bytes (`--prompt $'\\xff'`), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{what} is not valid UTF-8 text (character {e.start}: {text[e.start]!r}); give UTF-8 "
                          "text (check the terminal's encoding)") from None
    return text


class Tokenizer:
    """A folder's tokenizer behind one interface: encode (text -> ids), encode_tensor (-> LongTensor [n]),
    decode (ids -> text, special tokens dropped), bos_id / eos_id (None when it has none), vocab_size."""

    def __init__(self, tok):
        self.tok = tok  # a ByteTokenizer or a transformers tokenizer
        self.byte = isinstance(tok, ByteTokenizer)
        self.bos_id, self.eos_id = tok.bos_id if self.byte else tok.bos_token_id, \
            tok.eos_id if self.byte else tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; add_special_tokens: the HF tokenizer's own template (BOS for Llama...);
        the byte tokenizer has none, like the tokenizer.json it saves."""
        check_utf8(text)
        if self.byte:
            return self.tok.encode(text)
        return self.tok(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]

    def encode_tensor(self, text: str) -> torch.Tensor:
        """LongTensor [n] of `text`'s ids (a long text: the byte tokenizer goes without a Python list)."""
        if self.byte:
            return self.tok.encode_tensor(text)
        return torch.tensor(self.encode(text), dtype=torch.long)

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tok.decode(ids) if self.byte else self.tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of the folder `path` (see the module doc for the rule). vocab_size: the model's, for
    the byte tokenizer fallback when the folder has no tokenizer files."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder")
    if (path / ByteTokenizer.FILE).is_file():
        return Tokenizer(ByteTokenizer.load(path))
    if any((path / f).is_file() for f in HF_TOKENIZER_FILES[:4]):
        from transformers import AutoTokenizer

        try:
            return Tokenizer(AutoTokenizer.from_pretrained(str(path)))
        except Exception as e:  # transformers' and tokenizers' own error types
            raise CheckpointError(f"{path}: its tokenizer files don't load ({str(e).strip().splitlines()[0]})") \
                from None
    if vocab_size in BYTE_VOCABS:
        return Tokenizer(ByteTokenizer())
    raise CheckpointError(f"{path}: no tokenizer files ({', '.join(HF_TOKENIZER_FILES[:2])}, or "
                          f"{ByteTokenizer.FILE}) and its vocabulary ({vocab_size}) is not the byte tokenizer's "
                          f"({BYTE_VOCABS[1]}); copy the tokenizer files into the folder")


def text_tokens(tok: Tokenizer, text: str, need: int | None = None) -> torch.Tensor:
    """Token ids [n] of `text`, or of a prefix of it long enough for `need` tokens (tokenizing ~1 MB is slow)."""
    if need is None:
        return tok.encode_tensor(text)
    chars = need * 2
    while True:
        ids = tok.encode_tensor(text[:chars])
        if len(ids) >= need + 1 or chars >= len(text):  # +1: the last token may be cut mid-word
            return ids[:need]
        chars *= 4


def folder_tokens(path: str | Path, vocab_size: int, text: str | Path | None = None, kjv: bool = False,
                  need: int | None = None) -> torch.Tensor:
    """Token ids [n] of the text file `text` (.txt, or .jsonl with a "text" field per line), or of the King
    James Bible (kjv=True), by the tokenizer of the folder `path`; only a prefix long enough for `need`.
    ConfigError for a missing or unusable text and for ids outside the model's vocabulary."""
    from nestlm.data import kjv_text, load_text

    if (text is None) == (not kjv):
        raise ConfigError("give the text: a file (text=...) or the King James Bible (kjv=True), one of them")
    tok = load_tokenizer(path, vocab_size)
    try:
        raw = kjv_text() if kjv else load_text(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ids = text_tokens(tok, raw, need)
    check_ids(ids, vocab_size, f"{path}'s tokenizer")
    return ids


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """The tokenizer files of the folder `src` into `dst` (those `dst` lacks), so that a checkpoint written
    from `src`'s model (and every slice of it) carries them."""
    import shutil

    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file() and not (Path(dst) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
    portable_tokenizer_config(dst)  # a tokenizer class transformers 4 and 5 both load


def check_ids(ids: torch.Tensor, vocab_size: int, where: str) -> None:
    """ConfigError when a token id lies outside 0..vocab_size-1 (text tokenized for another model)."""
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ConfigError(f"{where}: token id {hi if hi >= vocab_size else lo} is outside the model's vocabulary "
                          f"(vocab_size {vocab_size}); was it tokenized for another model?")
