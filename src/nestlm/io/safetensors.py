"""Reading and writing safetensors checkpoint folders (config.json + safetensors), with clear errors and
atomic writes. Never unpickles: only safetensors are read.

    hf = read_config(path)                   # config.json, or CheckpointError naming the file
    src = Source(path)                       # every tensor, memory-mapped: keys, shape, dtype, prefix reads
    write_checkpoint(out, hf, tensors, src_dir=path)   # atomic, sharded, tokenizer files copied
"""

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

from nestlm.data import portable_tokenizer_config
from nestlm.errors import CheckpointError, ConfigError
from nestlm.io.tokenizer import TOKENIZER_FILES

QUANT_CONFIG = "hf_quant_config.json"  # a ModelOpt packed checkpoint's quantization settings

__all__ = ["CHECKPOINT_FILES", "DTYPES", "ST_DTYPE", "SafetensorsDir", "Source", "atomic_dir", "check_output",
           "copy_files", "normal_permissions", "own_folder", "read_config", "split_shards", "write_checkpoint",
           "write_shards", "write_tensors"]

# safetensors' dtype names <-> torch dtypes (the one table: headers are read and written with it)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_DTYPE = {v: k for k, v in DTYPES.items()}


def read_config(path: str | Path) -> dict:
    path = Path(path)
    f = path / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder")
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
        self._headers: dict[str, tuple[int, dict]] = {}  # file -> (header length, header), read once
        for name in files:
            fp = path / name
            if not fp.is_file():
                raise CheckpointError(f"{fp}: listed in the index but missing")
            try:
                h, err = safe_open(str(fp), framework="pt"), None
            except Exception as e:  # safetensors raises its own error types for bad headers
                h, err = None, f"{fp}: not a readable safetensors file ({e})"
            if err is not None:
                err = self._truncated(fp) or err
                raise CheckpointError(err)
            self._headers[name] = self._check_size(fp, h)
            self._handles[name] = h
            for k in h.keys():
                self._where[k] = name
        if weight_map is not None:
            missing = sorted(k for k in weight_map if k not in self._where)
            if missing:
                raise CheckpointError(f"{path}: tensors listed in the index are missing from the shards: "
                                      f"{missing[:5]}")

    @staticmethod
    def _check_size(fp: Path, h) -> tuple[int, dict]:
        """A truncated file can still have a valid header: compare the data length the header promises.
        Returns (header length, header)."""
        with open(fp, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if fp.stat().st_size < 8 + n + end:
            raise CheckpointError(f"{fp}: truncated ({fp.stat().st_size} bytes, header promises {8 + n + end})")
        return n, header

    @classmethod
    def _truncated(cls, fp: Path) -> str | None:
        """For a file safetensors can't open: the "truncated" message when its header is whole but the data
        is cut, else None."""
        with open(fp, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        if 8 + n > fp.stat().st_size:
            return None
        try:
            cls._check_size(fp, None)
        except CheckpointError as e:
            return str(e)
        except (ValueError, OSError, AttributeError, TypeError):  # not JSON, not a header table
            return None
        return None

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



class Source(SafetensorsDir):
    """A checkpoint folder's tensors, memory-mapped: names, shapes and dtypes from the headers, and prefix
    reads that touch only the requested bytes, and each tensor's byte extent in its file (`extent`: for
    nestlm.slicing's writer, which copies spans of the files itself)."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._dir = Path(path)
        self._extent: dict[str, tuple[Path, int, int]] = {}  # name -> (file, first byte, end byte)
        for fname, (n, header) in self._headers.items():  # the headers SafetensorsDir read and checked
            for k, v in header.items():
                if k != "__metadata__":
                    self._extent[k] = (self._dir / fname, 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])

    def extent(self, name: str) -> tuple[Path, int, int]:
        """Where tensor `name`'s bytes lie: (file, first byte, end byte)."""
        return self._extent[name]

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._handles[self._where[name]].get_slice(name).get_dtype()]

    def files(self) -> list[str]:
        return list(self._handles)


# the files a nestlm checkpoint folder (HF weights, slice, packed, elastic) holds: --overwrite replaces a folder
# only when it is one (config.json) and holds nothing else, so a user's own files are never deleted
CHECKPOINT_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "nestlm_*.json", QUANT_CONFIG,
                    *TOKENIZER_FILES, "train")


def own_folder(out: str | Path, what: str, marks: tuple[str, ...], only: tuple[str, ...] | None = None) -> None:
    """The one rule for an existing output folder that nestlm writes into or replaces: it must be empty, or
    nestlm's own output of that kind, i.e. hold one of `marks` (paths inside it) and, when `only` is given
    (a folder replaced whole), nothing but names matching those patterns. Anything else (a user's notes, a
    file where a folder goes) raises FileExistsError with one line saying what the folder holds."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; {what} is a folder")
    held = sorted(p.name + "/" * p.is_dir() for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return

    def listing(names):
        return f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"

    if not any((out / m).exists() for m in marks):
        raise FileExistsError(f"{out} is not empty and is not {what} (it holds {listing(held)}); choose a new or "
                              "empty folder")
    foreign = [h for h in held if only is not None and not any(Path(h.rstrip("/")).match(o) for o in only)]
    if foreign:
        raise FileExistsError(f"{out} holds files nestlm did not write ({listing(foreign)}) beside {what}; "
                              "replacing it would delete them: move them, or choose a new or empty folder")


def check_output(out: str | Path, *inputs: str | Path | None, overwrite: bool = False,
                 kind: str = "folder") -> Path:
    """Refuse an output path before anything is read or written: one that equals, contains or lies inside
    one of `inputs` (whatever `overwrite` says: an input is never replaced), or that exists when not
    `overwrite`. With `overwrite`, an existing `out` must be of its `kind`: "folder", a checkpoint folder
    nestlm wrote (own_folder with CHECKPOINT_FILES); "file", a file, not a folder; "any": the caller
    applies its own rule (elastify's resume). Raises ConfigError / FileExistsError naming the paths;
    returns `out` as a Path."""
    out = Path(out)
    o = out.resolve()
    blocked = next((p for p in o.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise FileExistsError(f"{out} can't be written: {blocked} is a file")
    for inp in inputs:
        if inp is None:
            continue
        i = Path(inp).resolve()
        how = "is" if o == i else "lies inside" if i in o.parents else "contains" if o in i.parents else None
        if how:
            raise ConfigError(f"the output {out} {how} the input {inp}; write to a folder outside it (overwrite "
                              "never replaces an input)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose a new path or pass overwrite=True")
    if out.exists() and kind == "file" and out.is_dir():
        raise FileExistsError(f"{out} is a folder; this output is a file: choose a file path")
    if kind == "folder":
        own_folder(out, "a checkpoint folder", ("config.json",), CHECKPOINT_FILES)
    return out


def normal_permissions(path: Path) -> None:
    """Give a finished output (a file, or a folder and everything in it) the permissions the umask gives a
    new file or folder: mkdtemp makes folders 0700 and safetensors' save_file files 0600, which a serving
    container or a colleague could not read."""
    mask = os.umask(0)
    os.umask(mask)
    todo = [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]
    for p in todo:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False, inputs: tuple = ()):
    """Yield a temporary sibling folder to fill; on success it becomes `out` (an existing `out` is moved
    aside first and removed last, so a failure can't lose both), on any error it is removed. `out` must not
    overlap any of `inputs` (check_output); the result gets the umask's normal permissions."""
    check_output(out, *inputs, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        yield tmp
        normal_permissions(tmp)
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


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """One safetensors file of `tensors` (detached, contiguous, on the CPU): the one writer. Atomic (a
    temporary sibling renamed into place: a crash leaves the previous file or none), with the umask's normal
    permissions (safetensors' save_file alone writes 0600)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        normal_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
        portable_tokenizer_config(dst)


def write_checkpoint(out_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor],
                     src_dir: str | Path | None = None, max_shard_bytes: int = 4 << 30,
                     overwrite: bool = False) -> Path:
    """Write config.json + safetensors shards (+ tokenizer files copied from `src_dir`) atomically:
    everything goes to a temporary sibling folder that is renamed into place at the end."""
    out = Path(out_dir)
    with atomic_dir(out, overwrite, inputs=(src_dir,)) as tmp:
        items = [(k, v.detach().contiguous()) for k, v in tensors.items()]
        shards = split_shards(items, lambda kv: kv[1].numel() * kv[1].element_size(), max_shard_bytes)
        total = sum(v.numel() * v.element_size() for _, v in items)
        write_shards(tmp, shards, lambda fp, shard: write_tensors(fp, dict(shard), {"format": "pt"}),
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


def read_tensors(f: str | Path, what: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (a router, a scores file), with CheckpointError naming the file
    for a missing, unreadable or truncated one. `what` says what the file is, for the missing case."""
    f = Path(f)
    if not f.is_file():
        raise CheckpointError(f"{f}: missing{f' ({what})' if what else ''}")
    try:
        with safe_open(str(f), framework="pt") as h:
            SafetensorsDir._check_size(f, h)
            return {k: h.get_tensor(k) for k in h.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own error types for bad headers and data
        raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
