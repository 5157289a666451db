"""Reading and writing Hugging Face checkpoint folders (config.json + safetensors), with clear errors and
atomic writes. Never unpickles: only safetensors are read."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

QUANT_CONFIG = "hf_quant_config.json"  # a ModelOpt packed checkpoint's quantization settings
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


class CheckpointError(RuntimeError):
    """A checkpoint folder that can't be read: missing, truncated or inconsistent files."""


class UnsupportedArchitecture(CheckpointError):
    """A checkpoint whose model_type / features nestlm does not convert."""


def stack_experts(per_expert: dict[str, dict[int, torch.Tensor]], n_experts: int,
                  family: str) -> dict[str, torch.Tensor]:
    """{our stacked name: {expert id: tensor}} (one tensor per expert, as files hold them) -> {name: [E, ...]}.
    Every expert 0..n_experts-1 must be there."""
    out = {}
    for name, experts in per_expert.items():
        if sorted(experts) != list(range(n_experts)):
            raise UnsupportedArchitecture(f"{family} {name}: experts {sorted(experts)} present, "
                                          f"expected 0..{n_experts - 1}")
        out[name] = torch.stack([experts[e] for e in range(n_experts)])
    return out


def read_config(path: str | Path) -> dict:
    path = Path(path)
    f = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint folder)")
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        hf = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    q = path / QUANT_CONFIG
    if isinstance(hf, dict) and "quantization_config" not in hf and q.is_file():
        # older ModelOpt exports describe the packing only in hf_quant_config.json: read it as config.json's
        try:
            quant = json.loads(q.read_text()).get("quantization")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{q}: not a ModelOpt quantization config ({e})") from None
        if isinstance(quant, dict) and quant.get("quant_algo"):
            hf["quantization_config"] = {"quant_method": "modelopt", **quant}
    return hf


class SafetensorsDir:
    """Lazy, memory-mapped access to every tensor of a checkpoint folder (single file or sharded)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            # model*.safetensors when present: other safetensors files (an elastic checkpoint's
            # router.safetensors, ...) live beside the weights and are not part of them
            files = sorted(p.name for p in path.glob("model*.safetensors")) or \
                sorted(p.name for p in path.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors weights (pickled .bin checkpoints are not loaded)")
        self._handles, self._where = {}, {}
        for name in files:
            fp = path / name
            if not fp.is_file():
                raise CheckpointError(f"{fp}: listed in the index but missing")
            try:
                h = safe_open(str(fp), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{fp}: not a readable safetensors file ({e})") from None
            self._check_size(fp, h)
            self._handles[name] = h
            for k in h.keys():
                self._where[k] = name
        if weight_map is not None:
            missing = sorted(k for k in weight_map if k not in self._where)
            if missing:
                raise CheckpointError(f"{path}: tensors listed in the index are missing from the shards: "
                                      f"{missing[:5]}")

    @staticmethod
    def _check_size(fp: Path, h) -> None:
        """A truncated file can still have a valid header: compare the data length the header promises."""
        with open(fp, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if fp.stat().st_size < 8 + n + end:
            raise CheckpointError(f"{fp}: truncated ({fp.stat().st_size} bytes, header promises {8 + n + end})")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, k: str) -> bool:
        return k in self._where

    def get(self, k: str) -> torch.Tensor:
        if k not in self._where:
            raise CheckpointError(f"tensor {k!r} missing from the checkpoint")
        return self._handles[self._where[k]].get_tensor(k)

    def shape(self, k: str) -> list[int]:
        return list(self._handles[self._where[k]].get_slice(k).get_shape())

    def read(self, k: str, idx: tuple) -> torch.Tensor:
        """A slice of tensor `k` (one slice per dim), reading only those bytes of the memory map."""
        return self._handles[self._where[k]].get_slice(k)[idx]

    def same(self, a: str, b: str, rows: int = 8192) -> bool:
        """torch.equal of two tensors, compared a block of rows at a time (bounded memory)."""
        if self.shape(a) != self.shape(b):
            return False
        return all(torch.equal(self.read(a, (slice(i, i + rows),)), self.read(b, (slice(i, i + rows),)))
                   for i in range(0, self.shape(a)[0], rows))


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary sibling folder to fill; on success it becomes `out` (an existing `out` is moved
    aside first and removed last, so a failure can't lose both), on any error it is removed."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose a new directory or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def split_shards(items: list, nbytes, max_shard_bytes: int) -> list[list]:
    """Consecutive items grouped into shards of at most `max_shard_bytes` (a larger item gets its own)."""
    shards, cur, size = [], [], 0
    for it in items:
        n = nbytes(it)
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    return shards + [cur]


def write_shards(folder: Path, shards: list[list], write_one, names_of, total_bytes: int) -> None:
    """Write each shard with `write_one(path, shard)`: one model.safetensors, or numbered shards plus the
    model.safetensors.index.json that maps every tensor name (`names_of(shard)`) to its file."""
    if len(shards) == 1:
        write_one(folder / "model.safetensors", shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_one(folder / name, shard)
        weight_map.update({k: name for k in names_of(shard)})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))


def copy_files(src_dir: str | Path | None, dst: Path, names) -> None:
    if src_dir is not None:
        for name in names:
            if (Path(src_dir) / name).is_file():
                shutil.copy2(Path(src_dir) / name, dst / name)


def write_checkpoint(out_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor],
                     src_dir: str | Path | None = None, max_shard_bytes: int = 4 << 30,
                     overwrite: bool = False) -> Path:
    """Write config.json + safetensors shards (+ tokenizer files copied from `src_dir`) atomically:
    everything goes to a temporary sibling folder that is renamed into place at the end."""
    out = Path(out_dir)
    with atomic_dir(out, overwrite) as tmp:
        items = [(k, v.detach().contiguous()) for k, v in tensors.items()]
        shards = split_shards(items, lambda kv: kv[1].numel() * kv[1].element_size(), max_shard_bytes)
        total = sum(v.numel() * v.element_size() for _, v in items)
        write_shards(tmp, shards, lambda fp, shard: save_file(dict(shard), str(fp), metadata={"format": "pt"}),
                     lambda shard: [k for k, _ in shard], total)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=_json_default))
        copy_files(src_dir, tmp, TOKENIZER_FILES)
    return out


def _json_default(o):
    if isinstance(o, float):
        return o
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
