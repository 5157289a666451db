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
from nestlm.convert import FAMILIES
from nestlm.elastic.artifact import (
    provenance,
    resolve_budget,
    write_provenance,
)
from nestlm.errors import CheckpointError, UnsupportedArchitecture
from nestlm.io.safetensors import (
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
from nestlm.slicing.plan import OutTensor, open_source, plan

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


def _pieces(src: Source, t: OutTensor):
    """The output tensor's bytes in file order, as contiguous tensors: along dim 0 the pieces themselves
    (concatenating rows is writing them one after another: no torch.cat, and a piece that is a whole
    row range is written straight from the memory map); along another dim, one torch.cat."""
    if t.dim == 0 or len(t.pieces) == 1:
        for pc in t.pieces:
            yield src.read(pc.src, pc.idx).contiguous()
    else:
        yield torch.cat([src.read(pc.src, pc.idx) for pc in t.pieces], dim=t.dim).contiguous()


def _write_shard(fp: Path, src: Source, tensors: list[OutTensor], stats: dict) -> None:
    with open(fp, "wb") as f:
        f.write(_header(tensors))
        for t in tensors:
            n = 0
            for x in _pieces(src, t):
                if x.dtype != t.dtype:  # a header that lied about its data
                    raise CheckpointError(f"reading {t.pieces[0].src}: got {x.dtype}, expected {t.dtype}")
                held = x.nbytes * (2 if t.dim != 0 and len(t.pieces) > 1 else 1)  # cat: pieces + result
                stats["peak_bytes"] = max(stats["peak_bytes"], held)
                f.write(memoryview(x.reshape(-1).view(torch.uint8).numpy()))
                n += x.nbytes
                del x
            if n != t.nbytes:
                raise CheckpointError(f"reading {t.pieces[0].src}: got {n} bytes, expected {t.nbytes}")
            stats["bytes_written"] += n


def slice_checkpoint(elastic_dir: str | Path, budget: str | float | SubArch, out_dir: str | Path, overwrite: bool = False,
          max_shard_bytes: int = 4 << 30, stats: dict | None = None) -> Path:
    """Write the submodel `budget` of the checkpoint `elastic_dir` as a plain Hugging Face folder `out_dir`
    (config.json, safetensors shards, tokenizer files, and nestlm_slice.json recording where it came from).

    budget: a manifest name ('77%'), a fraction (trained, or between trained ones: the router interpolates),
    or an explicit SubArch (any checkpoint folder, elastic or not). Streams: memory holds one output tensor.
    stats: if a dict is given, it receives bytes_written, peak_bytes (largest tensor held), tensors, seconds.
    Raises FileExistsError (out_dir exists, overwrite=False), KeyError (unknown budget), CheckpointError
    (missing / truncated / inconsistent files), ConfigError (a SubArch that doesn't fit)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    check_output(out, elastic_dir, overwrite=overwrite)  # before reading anything
    if "quantization_config" in read_config(elastic_dir):  # packed FP8 / NVFP4: cut codes and scales as-is
        from nestlm.quant import slice_quantized

        dst = slice_quantized(elastic_dir, out, budget, overwrite=overwrite)
        if stats is not None:
            stats.update(bytes_written=sum(f.stat().st_size for f in dst.glob("*.safetensors")),
                         seconds=time.perf_counter() - t0)
        return dst
    path, cfg, src, manifest = open_source(elastic_dir)
    name, sub = resolve_budget(path, budget, cfg=cfg, manifest=manifest)
    s = sub.resolve(cfg)
    small = sliced_config(cfg, s)
    hf = FAMILIES[cfg.family].config_to_hf(small)  # UnsupportedArchitecture before anything is written
    _check_transformers_accepts(hf)
    tensors = plan(src, cfg, s)
    emb = FAMILIES[cfg.family].hf_name("embeddings.weight", cfg)
    hf["dtype"] = str(src.dtype(emb)).removeprefix("torch.")
    shards = split_shards(tensors, lambda t: t.nbytes, max_shard_bytes)
    st = {"bytes_written": 0, "peak_bytes": 0, "tensors": len(tensors)}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory-bound copies: on a busy machine the thread pool's spinning costs ~5x
    try:
        with atomic_dir(out, overwrite, inputs=(path,)) as tmp:
            write_shards(tmp, shards, lambda fp, shard: _write_shard(fp, src, shard, st),
                         lambda shard: [t.name for t in shard], sum(t.nbytes for t in tensors))
            (tmp / "config.json").write_text(json.dumps(hf, indent=2))
            copy_files(path, tmp, TOKENIZER_FILES)
            write_provenance(tmp, provenance(path, name, s, cfg))
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
