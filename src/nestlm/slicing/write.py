"""The streamed writer: `slice_checkpoint` (nestlm.slicing.slice) executes a plan (nestlm.slicing.plan) into a
plain Hugging Face folder.

Nothing is loaded as a model: only the prefixes the submodel keeps are read, straight from the memory-mapped
safetensors, one read per contiguous run (the first heads of each attention KV group / Mamba group: one read
per group, then `torch.cat`). A test pins the streamed tensors to nestlm.model.extract.sliced_state_dict
(the in-memory reference) bit for bit. Shapes are known before any data is read, so every safetensors shard
is written header first and then tensor by tensor: at most one output tensor (and its pieces) is in memory
at a time. The folder is built under a temporary sibling name and moved into place with os.replace; on any
error nothing is left. A packed (FP8 / NVFP4) source goes to nestlm.quant.export.slice_quantized.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

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


CHUNK_BYTES = 16 << 20  # rows of an output tensor are read and written in chunks of about this size
IN_FLIGHT_BYTES = 2 * CHUNK_BYTES  # read-ahead: chunks read but not yet written (one thread reads, one writes)
RELEASE_BYTES = 256 << 20  # unmap the source after about this much was read (bounds the mapped pages)


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


def _read_chunk(src: Source, t: OutTensor, a: int, b: int) -> torch.Tensor:
    """Rows a:b of the output tensor t as one contiguous tensor (pieces concatenated along t.dim)."""
    if not t.shape:
        return src.read(t.pieces[0].src, t.pieces[0].idx).contiguous()
    parts = [src.read(pc.src, (slice(r0, r1),) + pc.idx[1:]) for pc, r0, r1 in _chunk_rows(t, a, b)]
    return (torch.cat(parts, dim=t.dim) if len(parts) > 1 else parts[0]).contiguous()


def _write_shard(fp: Path, src: Source, tensors: list[OutTensor], stats: dict) -> None:
    """Header, then every tensor's bytes. A reader thread reads chunks of rows (the copy out of the memory
    map) while this thread writes the previous ones (the copy into the file): both copies release the GIL,
    so they overlap. At most IN_FLIGHT_BYTES (or the largest output tensor, if smaller) are read ahead."""
    import queue
    import threading

    budget = min(IN_FLIGHT_BYTES, max((t.nbytes for t in tensors), default=1))
    jobs = [(t, a, b) for t in tensors for a, b in _chunks(t)]
    done: queue.Queue = queue.Queue()
    cond, state = threading.Condition(), {"in_flight": 0, "stop": False}

    def reader():
        since_release = 0
        try:
            for i, (t, a, b) in enumerate(jobs):
                if i + 1 < len(jobs) and hasattr(src, "prefetch") and jobs[i + 1][0].shape:
                    for pc, r0, r1 in _chunk_rows(*jobs[i + 1]):  # the next chunk's rows, read ahead by the kernel
                        src.prefetch(pc.src, r0, r1)
                n = t.nbytes * (b - a) // max(t.shape[0], 1) if t.shape else t.nbytes
                since_release += n
                if since_release > RELEASE_BYTES and hasattr(src, "release"):
                    with cond:  # tensors read from the maps die with them: wait until every chunk is written
                        cond.wait_for(lambda: state["stop"] or state["in_flight"] == 0)
                    src.release()
                    since_release = 0
                with cond:  # wait for room (a chunk larger than the budget goes alone)
                    cond.wait_for(lambda n=n: state["stop"] or state["in_flight"] == 0
                                  or state["in_flight"] + n <= budget)
                    if state["stop"]:
                        return
                    state["in_flight"] += n
                    held = state["in_flight"] + (n if t.dim != 0 and len(t.pieces) > 1 else 0)  # cat: pieces too
                    stats["peak_bytes"] = max(stats["peak_bytes"], held)
                done.put((t, n, _read_chunk(src, t, a, b)))
        except BaseException as e:  # handed to the writer, which raises it
            done.put((None, 0, e))

    th = threading.Thread(target=reader, name="nestlm-slice-reader", daemon=True)
    th.start()
    try:
        with open(fp, "wb") as f:
            f.write(_header(tensors))
            written: dict[str, int] = {}
            for _ in jobs:
                t, n, x = done.get()
                if t is None:
                    raise x
                if x.dtype != t.dtype:  # a header that lied about its data
                    raise CheckpointError(f"reading {t.pieces[0].src}: got {x.dtype}, expected {t.dtype}")
                f.write(memoryview(x.reshape(-1).view(torch.uint8).numpy()))
                written[t.name] = written.get(t.name, 0) + x.nbytes
                stats["bytes_written"] += x.nbytes
                del x
                with cond:
                    state["in_flight"] -= n
                    cond.notify()
            for t in tensors:
                if written.get(t.name, 0) != t.nbytes:
                    raise CheckpointError(f"reading {t.pieces[0].src}: got {written.get(t.name, 0)} bytes, "
                                          f"expected {t.nbytes}")
    finally:
        with cond:
            state["stop"] = True
            cond.notify()
        th.join()


def slice_checkpoint(elastic_dir: str | Path, budget: str | float | SubArch, out_dir: str | Path, overwrite: bool = False,
                     max_shard_bytes: int = 4 << 30, stats: dict | None = None) -> Path:
    """Write the submodel `budget` of the checkpoint `elastic_dir` as a plain Hugging Face folder `out_dir`
    (config.json, safetensors shards, tokenizer files, and nestlm_slice.json recording where it came from).

    budget: a manifest name ('77%'), a fraction (trained, or between trained ones: the router interpolates),
    or an explicit SubArch (any checkpoint folder, elastic or not). A packed FP8 / NVFP4 source (ModelOpt
    layout, NVIDIA's release included) is cut as it is stored: codes and block scales by index ranges
    (nestlm.quant.packed.packed_plan), scalar scales copied, nothing requantized; its quantization settings
    are kept with the exclude list renumbered. Streams: memory holds one output tensor (or a bounded chunk).
    stats: if a dict is given, it receives bytes_written, peak_bytes (largest tensor held), tensors, seconds.
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
