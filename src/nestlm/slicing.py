"""Zero-shot slicing: an elastic checkpoint + a budget -> a plain Hugging Face checkpoint, streamed.

    nestlm.slicing.slice("out/elastic", "77%", "out/77")        # a manifest budget, by name
    nestlm.slicing.slice("out/elastic", 0.6, "out/60")           # a fraction: trained, or interpolated
    nestlm.slicing.slice("path/hf", SubArch(hidden=448), "out")  # any folder, any explicit SubArch
    print(nestlm.slicing.format_info(nestlm.slicing.info("out/elastic")))

Nothing is loaded as a model. The slicer works on the HF-named tensors of the source folder (Nemotron-H:
`backbone.*` with one tensor pair per expert; Llama / Qwen3 / Qwen3-MoE / Mixtral: `model.*`, one tensor
per expert and projection) and reads only the prefixes the submodel keeps, straight from the memory-mapped
safetensors: `get_slice(name)[rows, cols]`, one read per contiguous run (the first heads of each attention
KV group / Mamba group are one read per group, then `torch.cat`). The index rules are those of
`nestlm.model.slice.sliced_state_dict` (the in-memory reference); a test pins the streamed tensors to it
bit for bit.

Output: shapes are known before any data is read, so every safetensors shard is written header first and
then tensor by tensor: at most one output tensor (and its pieces) is in memory at a time. The folder is
built under a temporary sibling name and moved into place with os.replace; on any error nothing is left.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nestlm.arch import SubArch, count_active_params, count_params, sliced_config
from nestlm.convert import FAMILIES, config_from_hf, moe, nemotron_h
from nestlm.elastic.artifact import (
    check_manifest,
    provenance,
    read_manifest,
    read_provenance,
    resolve_budget,
    write_provenance,
)
from nestlm.errors import CheckpointError, ConfigError, UnsupportedArchitecture
from nestlm.io.safetensors import (
    ST_DTYPE,
    Source,
    atomic_dir,
    copy_files,
    read_config,
    split_shards,
    write_shards,
)
from nestlm.io.tokenizer import TOKENIZER_FILES
from nestlm.model.config import ModelConfig
from nestlm.model.layout import Cut, is_stacked, model_cuts

__all__ = ["format_info", "info", "plan", "resolve_budget", "slice"]


# ---------------------------------------------------------------------------------------------- source
def _open(path: str | Path) -> tuple[Path, ModelConfig, Source, dict | None]:
    """(path, config, tensors, manifest or None), with config/weights/manifest checked against each other."""
    path = Path(path)
    hf = read_config(path)
    try:
        cfg = config_from_hf(hf)
    except ConfigError as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
    src = Source(path)
    if "quantization_config" not in hf:  # a packed folder's shapes are checked by nestlm.quant's loader
        cfg = _check_weights(path, cfg, src)
    manifest = read_manifest(path)
    if manifest is not None:
        check_manifest(path, cfg, manifest)
    return path, cfg, src, manifest


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for the on-disk layout that nestlm.to_hf writes for `cfg`."""
    from nestlm.model.decoder import Decoder

    with torch.device("meta"):
        sd = Decoder(cfg).state_dict()
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: tuple(v.shape) for k, v in FAMILIES[cfg.family].state_to_hf(sd, cfg).items()}


def _check_weights(path: Path, cfg: ModelConfig, src: Source) -> ModelConfig:
    have = {k for k in src.keys() if not k.startswith("mtp.") and "rotary_emb" not in k}
    if cfg.family == "nemotron_h" and any(k.startswith("model.") for k in have):
        raise UnsupportedArchitecture(f"{path}: nemotron_h tensors named model.* (transformers' in-memory "
                                      "layout); re-export with nestlm.to_hf(nestlm.from_hf(path), new_dir)")
    fused = ("experts.gate_up_proj", "experts.down_proj")
    if cfg.family in moe.EXPERT_NAMES and any(k.endswith(fused) for k in have):
        raise UnsupportedArchitecture(f"{path}: {cfg.family} experts stored fused (experts.gate_up_proj: "
                                      "transformers' in-memory layout); re-export with "
                                      "nestlm.to_hf(nestlm.from_hf(path), new_dir)")
    if cfg.family == "nemotron_h" and cfg.tie_embeddings and nemotron_h.runs_own_lm_head(src):
        cfg = dataclasses.replace(cfg, tie_embeddings=False)  # as load_hf_state: the file's own head runs
    want = _expected_shapes(cfg)
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = sorted(set(want) - have - optional)
    extra = sorted(have - set(want) - optional)
    if missing or extra:
        raise CheckpointError(f"{path}: weights don't match config.json: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                              f"{' ...' if len(extra) > 5 else ''}")
    bad = [(k, tuple(src.shape(k)), s) for k, s in want.items() if k in have and tuple(src.shape(k)) != s]
    if bad:
        k, got, exp = bad[0]
        raise CheckpointError(f"{path}: tensor {k} has shape {got} but config.json implies {exp} "
                              f"({len(bad)} mismatched tensors)")
    return cfg


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Piece:
    src: str  # source tensor name
    idx: tuple  # one slice per dim


@dataclass
class OutTensor:
    name: str
    pieces: list[Piece]
    dim: int  # the pieces are concatenated along this dim
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _out_tensor(src, name: str, src_name: str, c: Cut) -> OutTensor:
    """Output `name` = source `src_name` cut to `c`: prefix dims sliced, and at most one dim of several runs
    (the first heads of each group) read run by run and concatenated along it."""
    shape = list(src.shape(src_name))
    c = tuple(c) + (None,) * (len(shape) - len(c))
    runs = [r if r is not None else ((0, shape[d]),) for d, r in enumerate(c)]
    multi = [d for d, r in enumerate(runs) if len(r) > 1 or r[0][0] != 0]
    if len(multi) > 1:
        raise ValueError(f"{src_name}: cut along several dims at once ({multi})")
    dim = multi[0] if multi else 0
    pieces = [Piece(src_name, tuple(builtins.slice(a, b) if d == dim else builtins.slice(0, runs[d][0][1])
                                    for d in range(len(shape)))) for a, b in runs[dim]]
    out_shape = tuple(sum(b - a for a, b in r) for r in runs)
    return OutTensor(name, pieces, dim, out_shape, src.dtype(src_name))


def plan(src: Source, cfg: ModelConfig, sub: SubArch | None) -> list[OutTensor]:
    """Every output tensor of the submodel `sub`: its HF name, shape, dtype and the source reads behind it.
    The cuts are nestlm.model.layout's (the sliced forward's); the HF names are the family converter's."""
    s = (sub or SubArch()).resolve(cfg)
    small = sliced_config(cfg, s)
    fam = FAMILIES[cfg.family]
    out = []
    for name, (src_name, c) in model_cuts(cfg, s).items():
        if is_stacked(src_name):  # one tensor per expert on disk: the kept experts, each cut on (out, in)
            kept = range(cfg.n_experts) if c[0] is None else [j for a, b in c[0] for j in range(a, b)]
            out += [_out_tensor(src, fam.hf_name(name, small, new_j), fam.hf_name(src_name, cfg, j), c[1:])
                    for new_j, j in enumerate(kept)]
        else:
            out.append(_out_tensor(src, fam.hf_name(name, small), fam.hf_name(src_name, cfg), c))
    if getattr(fam, "WRITES_LM_HEAD", False) and not any(t.name == "lm_head.weight" for t in out):
        emb = fam.hf_name("embeddings.weight", cfg)  # a tied source: the head is the embedding matrix
        head = "lm_head.weight" if "lm_head.weight" in src else emb
        out.append(_out_tensor(src, "lm_head.weight", head, model_cuts(cfg, s)["embeddings.weight"][1]))
    return out


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


def slice(elastic_dir: str | Path, budget: str | float | SubArch, out_dir: str | Path, overwrite: bool = False,
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
    if out.exists() and not overwrite:  # before reading anything
        raise FileExistsError(f"{out} exists; choose a new directory or pass overwrite=True")
    if "quantization_config" in read_config(elastic_dir):  # packed FP8 / NVFP4: cut codes and scales as-is
        from nestlm.quant import slice_quantized

        dst = slice_quantized(elastic_dir, out, budget, overwrite=overwrite)
        if stats is not None:
            stats.update(bytes_written=sum(f.stat().st_size for f in dst.glob("*.safetensors")),
                         seconds=time.perf_counter() - t0)
        return dst
    path, cfg, src, manifest = _open(elastic_dir)
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
        with atomic_dir(out, overwrite) as tmp:
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


# ---------------------------------------------------------------------------------------------- info
def _stored_params(cfg: ModelConfig, sub: SubArch | None) -> int:
    """Parameters a sliced checkpoint stores: count_params, plus the lm_head Nemotron-H always writes."""
    n = count_params(cfg, sub)
    if cfg.family == "nemotron_h" and cfg.tie_embeddings:
        n += cfg.vocab_size * (sub or SubArch()).resolve(cfg).hidden
    return n


def _packed_bytes(path: Path, cfg: ModelConfig, nb: int):
    """(SubArch -> bytes of its packed weights, how they are computed) for a packed FP8 / NVFP4 folder:
    quantized parameters at the folder's measured bytes per quantized parameter (scales included), the
    others at `nb` bytes."""
    from nestlm.model.decoder import Decoder
    from nestlm.quant import quantized_bytes, quantized_weights

    bpq = quantized_bytes(path)["bytes_per_quantized_param"]

    def weight_bytes(sub: SubArch) -> float:
        with torch.device("meta"):
            n_q = sum(w.latent().numel() for w in quantized_weights(Decoder(sliced_config(cfg, sub))))
        return n_q * bpq + (_stored_params(cfg, sub) - n_q) * nb

    return weight_bytes, f"{bpq:.4f} B per quantized param (measured) and {nb} B per other param"


def _folder_bytes(path: Path) -> dict[str, int]:
    """Bytes on disk of the top-level files (train/ and other subfolders are training state, not shipped)."""
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file() and not p.name.startswith(".")}
    weights = sum(v for k, v in files.items() if k.endswith(".safetensors") or k == "model.safetensors.index.json")
    return {"weights": weights, "total": sum(files.values())}


def info(elastic_or_hf_dir: str | Path) -> dict:
    """Family, budgets (SubArch, params, active params) and storage of an elastic or plain HF folder.

    storage.elastic_bytes is measured (the folder's safetensors: weights + router); separate_bytes is
    computed, not measured: sum over budgets of stored parameters x dtype bytes (the weights that one
    standalone checkpoint per budget would hold; their small safetensors headers and configs excluded)."""
    path, cfg, src, manifest = _open(elastic_or_hf_dir)
    dtype = src.dtype(FAMILIES[cfg.family].hf_name("embeddings.weight", cfg))
    nb = dtype.itemsize
    weight_bytes = lambda r: _stored_params(cfg, r) * nb
    how = f"{nb} B ({str(dtype).removeprefix('torch.')})"
    packed = read_config(path).get("quantization_config")
    if packed:  # FP8 / NVFP4: quantized params at the folder's measured bytes each, the rest at the dtype's
        weight_bytes, how = _packed_bytes(path, cfg, nb)
        dtype_name = f"{packed.get('quant_algo', 'quantized')} (+ {str(dtype).removeprefix('torch.')})"
    full = SubArch.full(cfg)
    rows = []
    budgets = manifest["budgets"].items() if manifest else [("full", {"fraction": 1.0, "sub": {}})]
    for name, b in budgets:
        sub = SubArch.from_dict(b["sub"])
        r = sub.resolve(cfg)
        rows.append({"name": name, "fraction": b.get("fraction"),
                     "sub": {k: v for k, v in r.to_dict().items() if k != "layers" and v != getattr(full, k)}
                     | ({"layers": list(r.layers)} if r.layers != full.layers else {}),
                     "params": count_params(cfg, r), "active_params": count_active_params(cfg, r),
                     "bytes": weight_bytes(r)})
    on_disk = _folder_bytes(path)
    d = {"path": str(path), "family": cfg.family, "elastic": manifest is not None,
         "dtype": dtype_name if packed else str(dtype).removeprefix("torch."),
         "pattern": cfg.pattern, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
         "params": count_params(cfg), "active_params": count_active_params(cfg), "budgets": rows,
         "storage": {"elastic_bytes": on_disk["weights"], "folder_bytes": on_disk["total"],
                     "separate_bytes": sum(r["bytes"] for r in rows), "n_budgets": len(rows),
                     "how": "elastic_bytes: measured size of the folder's safetensors (weights + router); "
                            f"separate_bytes: computed as sum over budgets of stored params x {how}; "
                            "headers/configs excluded"}}
    sliced_from = read_provenance(path)
    if sliced_from is not None:
        d["sliced_from"] = sliced_from
    return d


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def format_info(d: dict) -> str:
    lines = [f"{d['path']}: {d['family']}{' elastic checkpoint' if d['elastic'] else ''}, {d['dtype']}, "
             f"{len(d['pattern'])} blocks {d['pattern']!r}, hidden {d['hidden_size']}, vocab {d['vocab_size']}"]
    if "sliced_from" in d:
        sf = d["sliced_from"]
        lines.append(f"sliced from {sf['source']} at budget {sf['budget']}")
    lines.append("")
    lines.append(f"| {'budget':<20} | {'params':>9} | {'active':>9} | {'weights':>10} | SubArch (axes not at full width) |")
    lines.append(f"|{'-' * 22}|{'-' * 11}|{'-' * 11}|{'-' * 12}|{'-' * 34}|")
    for r in d["budgets"]:
        sub = ", ".join(f"{k}={v}" if k != "layers" else f"layers={len(v)}: {_ranges_str(v)}"
                        for k, v in r["sub"].items()) or "(full)"
        lines.append(f"| {r['name']:<20} | {_count(r['params']):>9} | {_count(r['active_params']):>9} | "
                     f"{_human(r['bytes']):>10} | {sub} |")
    st = d["storage"]
    lines.append("")
    if d["elastic"]:
        ratio = st["separate_bytes"] / max(st["elastic_bytes"], 1)
        lines.append(f"storage: {_human(st['elastic_bytes'])} on disk for all {st['n_budgets']} budgets "
                     f"(measured) vs {_human(st['separate_bytes'])} as {st['n_budgets']} separate checkpoints "
                     f"(computed: {st['how'].split('computed as ')[-1].split(';')[0]}) -> {ratio:.2f}x")
    else:
        lines.append(f"storage: {_human(st['elastic_bytes'])} of safetensors on disk "
                     f"(folder {_human(st['folder_bytes'])})")
    return "\n".join(lines)


def _ranges_str(v: list[int]) -> str:
    out, i = [], 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[j + 1] == v[j] + 1:
            j += 1
        out.append(str(v[i]) if i == j else f"{v[i]}-{v[j]}")
        i = j + 1
    return ",".join(out)

