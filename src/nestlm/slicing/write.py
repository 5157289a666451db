"""The streamed writer: `slice_checkpoint` (nestlm.slicing.slice) executes a plan (nestlm.slicing.plan) into a
plain Hugging Face folder.

Nothing is loaded as a model, and no byte passes through a tensor: only the prefixes the submodel keeps are
copied from the source files, once, by the kernel. Shapes are known before any data is read, so every
safetensors shard is written header first and then tensor by tensor, in chunks of about CHUNK_BYTES of output
rows. A run of whole source rows (a cut along dim 0, one span per group of heads, a scalar, adjacent tensors)
is one contiguous span of a source file: os.copy_file_range, as cp does. Rows cut along another dim are
strided runs: a read-only memory map of just those rows, and one writev(2) per 1024 runs, pieces of several
groups interleaved within each row. Each map is closed once its chunk is written, so resident memory stays
about one chunk whatever the source size. The next chunk is read ahead (cold caches) and the kernel is asked
to start writing each 64 MB of output to disk as it comes. Tests pin the files to a plain reference (load,
index, concatenate) byte for byte, and the tensors to nestlm.model.extract.sliced_state_dict. The folder is
built under a temporary sibling name and moved into place with os.replace; on any error nothing is left. A
packed (FP8 / NVFP4) source is planned by nestlm.slicing.packed and written the same way.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import time
from pathlib import Path

import numpy as np
import torch

from nestlm.arch import SubArch, sliced_config
from nestlm.convert import FAMILIES, config_from_hf
from nestlm.elastic.artifact import (
    provenance,
    read_manifest,
    resolve_budget,
    write_provenance,
)
from nestlm.errors import CheckpointError, UnsupportedArchitecture
from nestlm.io.safetensors import (
    QUANT_CONFIG,
    ST_DTYPE,
    Source,
    atomic_dir,
    check_output,
    copy_files,
    read_config,
    split_shards,
    write_shards,
)
from nestlm.io.tokenizer import TOKENIZER_FILES
from nestlm.quant.fake import check_subarch
from nestlm.quant.packed import cut_quant_configs, format_of, quant_configs
from nestlm.slicing.packed import packed_plan
from nestlm.slicing.plan import OutTensor, Piece, open_source, plan

__all__ = ["slice_checkpoint"]


# ---------------------------------------------------------------------------------------------- writing
def _header(tensors: list[OutTensor]) -> bytes:
    h, off = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        h[t.name] = {"dtype": ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


CHUNK_BYTES = 16 << 20  # rows of an output tensor are gathered and written in chunks of about this size
READ_AHEAD_BYTES = 64 << 20  # the kernel is asked to read the source this far ahead of the chunk being written
WRITEBACK_BYTES = 64 << 20  # the kernel is asked to start writing the output to disk every this many bytes


def _chunks(t: OutTensor) -> list[tuple[int, int]]:
    """(start, stop) row ranges (dim 0) of the output tensor t, about CHUNK_BYTES each, in file order, as
    offsets into the concatenated pieces along dim 0 (t.dim == 0) or into every piece's rows (t.dim > 0)."""
    if not t.shape:
        return [(0, 1)]
    row = max(t.nbytes // max(t.shape[0], 1), 1)
    step = max(CHUNK_BYTES // row, 1)
    return [(a, min(a + step, t.shape[0])) for a in range(0, t.shape[0], step)]


def _chunk_rows(t: OutTensor, a: int, b: int) -> list[tuple[Piece, int, int]]:
    """The source rows behind rows a:b of the output tensor t: (piece, first row, end row) in the piece's
    source tensor. Along dim 0 the pieces follow each other; along another dim each piece gives rows a:b."""
    if not t.shape:
        return [(t.pieces[0], 0, 1)]
    out, off = [], 0
    for pc in t.pieces:
        r0 = pc.idx[0].start or 0
        if t.dim != 0:
            out.append((pc, r0 + a, r0 + b))
            continue
        n = pc.idx[0].stop - r0
        lo, hi = max(a, off), min(b, off + n)
        if lo < hi:
            out.append((pc, r0 + lo - off, r0 + hi - off))
        off += n
    return out


def _rest(pc: Piece, shape: list) -> tuple:
    """The piece's slices of every dim after the first (uncut dims it leaves out: whole)."""
    return tuple(pc.idx[1:]) + (slice(None),) * (len(shape) - max(len(pc.idx), 1))


def _span(src: Source, pc: Piece, r0: int, r1: int) -> tuple[Path, int, int, bool]:
    """Rows r0:r1 (dim 0) of the piece's source tensor as bytes of its file: (file, first byte, end byte,
    whole), whole when the piece keeps all of those bytes (every other dim uncut: one contiguous span)."""
    fp, a, b = src.extent(pc.src)
    shape = src.shape(pc.src)
    if not shape:
        return fp, a, b, True
    row = (b - a) // shape[0] if shape[0] else 0
    whole = all(s.indices(n)[:2] == (0, n) for s, n in zip(_rest(pc, shape), shape[1:], strict=True))
    return fp, a + r0 * row, a + r1 * row, whole


class _Out:
    """The shard being written, through its file descriptor: `writev` (runs of mapped bytes) and `copy`
    (a contiguous span of a source file, coalesced with the previous span when adjacent, then copied by the
    kernel with os.copy_file_range, as cp does: no pass through user memory). Every WRITEBACK_BYTES the kernel
    is asked to start writing the new bytes to disk, so the disk works while the next chunks are gathered."""

    def __init__(self, f):
        self.fd, self.pos, self.flushed, self.fds = f.fileno(), 0, 0, {}
        self.pending: list | None = None  # [file, first byte, end byte] not copied yet
        self.kernel_copy = hasattr(os, "copy_file_range")

    def src_fd(self, fp: Path) -> int:
        if fp not in self.fds:
            self.fds[fp] = os.open(fp, os.O_RDONLY)
        return self.fds[fp]

    def copy(self, fp: Path, a: int, b: int) -> None:
        if self.pending and self.pending[0] == fp and self.pending[2] == a:
            self.pending[2] = b
            return
        self.flush()
        self.pending = [fp, a, b]

    def flush(self) -> None:
        if not self.pending:
            return
        fp, a, b = self.pending
        self.pending = None
        fd = self.src_fd(fp)
        while a < b:
            n = 0
            if self.kernel_copy:
                try:
                    n = os.copy_file_range(fd, self.fd, min(b - a, 1 << 30), a)
                except OSError as e:  # across file systems on some kernels, or not supported: read + write
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self.kernel_copy = False
                    continue
            else:
                data = os.pread(fd, min(b - a, CHUNK_BYTES), a)
                self._write(memoryview(data))
                n = len(data)
            if n == 0:
                raise CheckpointError(f"{fp}: ended at byte {a}, the header promises {b}")
            a += n
            self._advance(n)

    def writev(self, runs: np.ndarray) -> None:
        """Write runs of bytes already in this process's memory ([n, 2] array of address, length): the kernel
        gathers them straight from the memory maps (writev), one copy, as a kernel copy of a span would."""
        self.flush()
        total = int(runs[:, 1].sum())
        i = 0
        while i < len(runs):
            batch = np.ascontiguousarray(runs[i:i + IOV_MAX])
            n = _writev(self.fd, batch)
            if n == 0 and batch[:, 1].any():
                raise OSError(errno.EIO, f"writev wrote nothing at byte {self.pos}")
            done = np.cumsum(batch[:, 1])
            k = int(np.searchsorted(done, n, side="right"))  # runs written whole
            i += k
            if k < len(batch) and n > (done[k - 1] if k else 0):  # a short write ended inside run i
                part = n - (int(done[k - 1]) if k else 0)
                runs[i, 0] += part
                runs[i, 1] -= part
        self._advance(total)

    def _write(self, data: memoryview) -> None:
        while len(data):
            data = data[os.write(self.fd, data):]

    def _advance(self, n: int) -> None:
        self.pos += n
        if self.pos - self.flushed >= WRITEBACK_BYTES:
            _start_writeback(self.fd, self.flushed, self.pos - self.flushed)
            self.flushed = self.pos

    def prefetch(self, fp: Path, a: int, b: int) -> None:
        """Ask the kernel to read a span ahead (POSIX_FADV_WILLNEED): cold caches."""
        if b > a and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.src_fd(fp), a, b - a, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


IOV_MAX = 1024  # runs per writev call (Linux's limit)
_LIBC: dict = {}  # libc's writev and sync_file_range, looked up once (None where there is none)


def _libc(name: str, *argtypes):
    if name not in _LIBC:
        import ctypes

        try:
            f = getattr(ctypes.CDLL(None, use_errno=True), name)
            f.argtypes, f.restype = list(argtypes), ctypes.c_ssize_t
        except (AttributeError, OSError, TypeError):
            f = None
        _LIBC[name] = f
    return _LIBC[name]


def _writev(fd: int, runs: np.ndarray) -> int:
    """One writev(2) of the runs (a C-contiguous [n, 2] int64 array: struct iovec's layout on 64-bit Linux)."""
    import ctypes

    f = _libc("writev", ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    if f is None or ctypes.sizeof(ctypes.c_void_p) != 8:  # no libc writev: one write per run
        done = 0
        for p, n in runs:
            w = os.write(fd, ctypes.string_at(int(p), int(n)))
            done += w
            if w < n:  # a short write: the caller goes on from here
                break
        return done
    n = f(fd, runs.ctypes.data, len(runs))
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return n


def _start_writeback(fd: int, offset: int, n: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): start writing these bytes to disk, without waiting for it."""
    import ctypes

    f = _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    if f is not None:
        f(fd, offset, n, 2)  # 2: SYNC_FILE_RANGE_WRITE; a hint: its result is not needed


def _runs(out: _Out, src: Source, pc: Piece, r0: int, r1: int, dim: int, maps: list) -> np.ndarray:
    """Rows r0:r1 of the piece as runs of bytes in a read-only memory map of just those rows (appended to
    maps, closed once the chunk is written: resident memory stays about one chunk): an [outer, runs, 2]
    array of (address, length), outer = the output rows before `dim` (1 for dim 0), so that pieces cut
    along `dim` interleave by concatenating their runs along axis 1."""
    fp, a, b, _ = _span(src, pc, r0, r1)
    shape = src.shape(pc.src) or [1]
    lims = [(0, r1 - r0)] + [s.indices(n)[:2] for s, n in zip(_rest(pc, shape), shape[1:], strict=True)]
    stride = [math.prod(shape[d + 1:]) * src.dtype(pc.src).itemsize for d in range(len(shape))]
    cut = [d for d in range(1, len(shape)) if lims[d] != (0, shape[d])]
    last = max(cut + [dim])  # the runs: dims after `last` whole, so each run is contiguous
    length = (lims[last][1] - lims[last][0]) * stride[last]
    addr = np.zeros((), np.int64) + lims[last][0] * stride[last]
    for d in range(last):  # every index of the dims before `last`, in C order
        addr = addr[..., None] + np.arange(*lims[d], dtype=np.int64) * stride[d]
    outer = math.prod(hi - lo for lo, hi in lims[:dim])
    if b > a and length:
        base = a - a % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(out.src_fd(fp), b - base, offset=base, prot=mmap.PROT_READ,
                       flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        maps.append(mm)
        view = np.frombuffer(mm, np.uint8)
        addr = addr + (view.ctypes.data + a - base)
        del view  # the address stays valid until the map is closed
    runs = np.empty(addr.shape + (2,), np.int64)
    runs[..., 0], runs[..., 1] = addr, length
    return runs.reshape(outer, -1, 2)


def _write_shard(fp: Path, src: Source, tensors: list[OutTensor], stats: dict) -> None:
    """Header, then every tensor's bytes, chunk by chunk (CHUNK_BYTES of output rows). A run of whole source
    rows (a cut along dim 0, a scalar, adjacent tensors) is one contiguous span: copied by the kernel. Rows
    cut along another dim are runs in a memory map of just those rows, written with writev (the pieces of
    a cut along dim > 0 interleaved within each row); the map is closed after each chunk. The next chunk's
    rows are read ahead (cold caches), and the written bytes are handed to the disk as they come."""
    jobs = [(t, a, b) for t in tensors for a, b in _chunks(t)]
    for t in tensors:
        for pc in t.pieces:
            if src.dtype(pc.src) != t.dtype:  # the plan and the header disagree: nothing written yet
                raise CheckpointError(f"reading {pc.src}: got {src.dtype(pc.src)}, expected {t.dtype}")
    with open(fp, "wb") as f:
        out = _Out(f)
        try:
            f.write(_header(tensors))
            f.flush()
            out.pos = out.flushed = f.tell()
            ahead, queued = 0, 0  # jobs whose source rows the kernel was asked to read, and their bytes not yet used
            for i, (t, a, b) in enumerate(jobs):
                rows = _chunk_rows(t, a, b)
                spans = [_span(src, pc, r0, r1) for pc, r0, r1 in rows]
                while ahead < len(jobs) and (ahead <= i + 1 or queued < READ_AHEAD_BYTES):  # cold caches
                    for pc, r0, r1 in _chunk_rows(*jobs[ahead]):
                        fa, a0, b0, _ = _span(src, pc, r0, r1)
                        out.prefetch(fa, a0, b0)
                        queued += b0 - a0
                    ahead += 1
                queued -= sum(s[2] - s[1] for s in spans)
                if t.dim == 0 or len(rows) == 1:  # pieces one after the other: each is a span or a gather
                    groups = [([r], [s]) for r, s in zip(rows, spans, strict=True)]
                else:  # along another dim the pieces interleave within every row: one gather
                    groups = [(rows, spans)]
                for grp, sp in groups:
                    if len(grp) == 1 and sp[0][3]:
                        out.copy(*sp[0][:3])
                        continue
                    stats["peak_bytes"] = max(stats["peak_bytes"], sum(s[2] - s[1] for s in sp))  # mapped
                    maps: list = []
                    runs = [_runs(out, src, pc, r0, r1, t.dim, maps) for pc, r0, r1 in grp]
                    out.writev(np.concatenate(runs, axis=1).reshape(-1, 2) if len(runs) > 1 else runs[0].reshape(-1, 2))
                    for mm in maps:
                        mm.close()
            out.flush()
            end = out.pos
        finally:
            out.close()
    want = len(_header(tensors)) + sum(t.nbytes for t in tensors)
    if end != want:
        raise CheckpointError(f"{fp}: wrote {end} bytes, the plan promises {want}")
    stats["bytes_written"] += sum(t.nbytes for t in tensors)


def slice_checkpoint(elastic_dir: str | Path, budget: str | float | SubArch, out_dir: str | Path, overwrite: bool = False,
                     max_shard_bytes: int = 4 << 30, stats: dict | None = None) -> Path:
    """Write the submodel `budget` of the checkpoint `elastic_dir` as a plain Hugging Face folder `out_dir`
    (config.json, safetensors shards, tokenizer files, and nestlm_slice.json recording where it came from).

    budget: a manifest name ('77%'), a fraction (trained, or between trained ones: the router interpolates),
    or an explicit SubArch (any checkpoint folder, elastic or not). A packed FP8 / NVFP4 source (ModelOpt
    layout, NVIDIA's release included) is cut as it is stored: codes and block scales by index ranges
    (nestlm.slicing.packed.packed_plan), scalar scales copied, nothing requantized; its quantization settings
    are kept with the exclude list renumbered. Streams: memory holds one output tensor (or a bounded chunk).
    stats: if a dict is given, it receives bytes_written, peak_bytes (the most source bytes mapped at once:
    about one chunk of rows), tensors, seconds.
    Raises FileExistsError (out_dir exists, overwrite=False), KeyError (unknown budget), CheckpointError
    (missing / truncated / inconsistent files), ConfigError (a SubArch that doesn't fit)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    check_output(out, elastic_dir, overwrite=overwrite)  # before reading anything
    extra: dict[str, dict] = {}
    if "quantization_config" in read_config(elastic_dir):  # packed FP8 / NVFP4: cut codes and scales as-is
        path, hf_src = Path(elastic_dir), read_config(elastic_dir)
        fmt, weight_only = format_of(hf_src, path)
        cfg = config_from_hf(hf_src)
        manifest = read_manifest(path)
        name, sub = resolve_budget(path, budget, cfg=cfg, manifest=manifest)
        s = sub.resolve(cfg)
        check_subarch(cfg, s, fmt)
        src = Source(path)
        tensors = packed_plan(src, cfg, s, fmt)  # every read planned (and checked) before anything is written
        hf = FAMILIES[cfg.family].config_to_hf(sliced_config(cfg, s))
        hf["dtype"] = hf_src.get("dtype") or hf_src.get("torch_dtype") or "float32"
        if (path / QUANT_CONFIG).is_file():  # the source's settings (NVIDIA's: FP8 KV cache, its exclude list)
            hq, qc = cut_quant_configs(json.loads((path / QUANT_CONFIG).read_text()), hf_src["quantization_config"],
                                       cfg, s)
        else:
            hq, qc = quant_configs(fmt, {t.name: None for t in tensors}, weight_only)
        hf["quantization_config"], extra[QUANT_CONFIG] = qc, hq
        prov = provenance(path, name, s, cfg, quant_format=fmt.name)
    else:
        path, cfg, src, manifest = open_source(elastic_dir)
        name, sub = resolve_budget(path, budget, cfg=cfg, manifest=manifest)
        s = sub.resolve(cfg)
        hf = FAMILIES[cfg.family].config_to_hf(sliced_config(cfg, s))  # UnsupportedArchitecture before writing
        _check_transformers_accepts(hf)
        tensors = plan(src, cfg, s)
        hf["dtype"] = str(src.dtype(FAMILIES[cfg.family].hf_name("embeddings.weight", cfg))).removeprefix("torch.")
        prov = provenance(path, name, s, cfg)
    shards = split_shards(tensors, lambda t: t.nbytes, max_shard_bytes)
    st = {"bytes_written": 0, "peak_bytes": 0, "tensors": len(tensors)}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory-bound copies: on a busy machine the thread pool's spinning costs ~5x
    try:
        with atomic_dir(out, overwrite, inputs=(path,)) as tmp:
            write_shards(tmp, shards, lambda fp, shard: _write_shard(fp, src, shard, st),
                         lambda shard: [t.name for t in shard], sum(t.nbytes for t in tensors))
            (tmp / "config.json").write_text(json.dumps(hf, indent=2))
            for fname, obj in extra.items():
                (tmp / fname).write_text(json.dumps(obj, indent=2))
            copy_files(path, tmp, TOKENIZER_FILES)
            write_provenance(tmp, prov)
    finally:
        torch.set_num_threads(threads)
    st["seconds"] = time.perf_counter() - t0
    if stats is not None:
        stats.update(st)
    return out


def _check_transformers_accepts(hf: dict) -> None:
    """transformers validates configs when loading (Llama: hidden_size % num_attention_heads == 0, ...):
    refuse a submodel it would not load, before writing anything."""
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(**hf)
    except Exception as e:  # huggingface_hub's StrictDataclassClassValidationError, ValueError, ...
        raise UnsupportedArchitecture(f"transformers would not load this submodel's config: "
                                      f"{str(e).strip().splitlines()[-1].strip()}") from None
