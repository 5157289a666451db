"""`nestlm info`: family, budgets (SubArch, parameters, active parameters, bytes) and storage of an elastic
or plain HF folder, packed ones included, and its table.

    print(nestlm.info.format_info(nestlm.info.info("out/elastic")))
"""
from __future__ import annotations

from pathlib import Path

import torch

from nestlm.arch import SubArch, count_active_params, count_params, human_bytes, sliced_config
from nestlm.elastic.artifact import MANIFEST, read_provenance
from nestlm.load import open_folder
from nestlm.model.config import ModelConfig
from nestlm.quant.packed import format_of, quantized_names

__all__ = ["config_info", "describe", "format_config_info", "format_info", "format_quantized", "info",
           "quantized_bytes"]


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
    from nestlm.quant import quantized_weights

    bpq = quantized_bytes(path)["bytes_per_quantized_param"]

    def weight_bytes(sub: SubArch) -> float:
        with torch.device("meta"):
            n_q = sum(w.latent().numel() for w in quantized_weights(Decoder(sliced_config(cfg, sub))))
        return n_q * bpq + (_stored_params(cfg, sub) - n_q) * nb

    return weight_bytes, f"{bpq:.4f} B per quantized param (measured) and {nb} B per other param"


def quantized_bytes(path: str | Path) -> dict:
    """Bytes on disk of a packed checkpoint: the quantized weights with their scales, per quantized parameter,
    and the whole safetensors payload of the weights."""
    folder = open_folder(path, check_weights=False)
    if folder.fmt is None:
        format_of(folder.hf, folder.path)  # CheckpointError: not a packed checkpoint
    src, fmt = folder.src, folder.fmt
    quantized = quantized_names(src.keys())
    nbytes = {k: torch.Size(src.shape(k)).numel() * src.dtype(k).itemsize for k in src.keys()}
    q_bytes = sum(n for k, n in nbytes.items() if k in quantized or (k.rsplit(".", 1)[0] + ".weight") in quantized)
    q_params = sum(torch.Size(src.shape(k)).numel() * (2 if fmt.name == "nvfp4" else 1) for k in quantized)
    return {"quantized_params": q_params, "quantized_bytes": q_bytes,
            "bytes_per_quantized_param": q_bytes / max(q_params, 1),
            "other_bytes": sum(nbytes.values()) - q_bytes,
            "file_bytes": sum((folder.path / f).stat().st_size for f in src.files())}


def format_quantized(path: str | Path) -> str:
    """One line of a packed checkpoint's quantized parameters and bytes (quantized_bytes), as quantize reports."""
    b = quantized_bytes(path)
    return (f"{b['quantized_params']:,} quantized parameters at {b['bytes_per_quantized_param']:.4f} bytes each "
            f"(scales included); {b['file_bytes'] / 1e6:.2f} MB of safetensors")


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
    folder = open_folder(elastic_or_hf_dir)
    path, cfg, manifest, dtype = folder.path, folder.cfg, folder.manifest, folder.dtype
    nb = dtype.itemsize
    weight_bytes = lambda r: _stored_params(cfg, r) * nb
    how = f"{nb} B ({str(dtype).removeprefix('torch.')})"
    packed = folder.hf.get("quantization_config")
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
                     f"{human_bytes(r['bytes']):>10} | {sub} |")
    st = d["storage"]
    lines.append("")
    if d["elastic"]:
        ratio = st["separate_bytes"] / max(st["elastic_bytes"], 1)
        lines.append(f"storage: {human_bytes(st['elastic_bytes'])} on disk for all {st['n_budgets']} budgets "
                     f"(measured) vs {human_bytes(st['separate_bytes'])} as {st['n_budgets']} separate checkpoints "
                     f"(computed: {st['how'].split('computed as ')[-1].split(';')[0]}) -> {ratio:.2f}x")
    else:
        lines.append(f"storage: {human_bytes(st['elastic_bytes'])} of safetensors on disk "
                     f"(folder {human_bytes(st['folder_bytes'])})")
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


def config_info(path: str | Path, seq_len: int = 4096) -> dict:
    """`nestlm info` of a plain (or packed) HF folder: family, ModelConfig, parameter counts and inference
    memory at `seq_len` tokens (a packed folder: its weights as stored, measured). Reads config.json and
    the safetensors headers only (missing or truncated weight files fail here, cheaply)."""
    from nestlm.search import figures

    folder = open_folder(path, check_weights=False)  # headers only: missing or truncated files fail here
    hf, cfg = folder.hf, folder.cfg
    fig = figures(folder, None, seq_len)  # the same figures as `nestlm info --sub` / `nestlm search`
    out = {"path": str(path), "family": cfg.family, "architectures": hf.get("architectures"),
           "config": cfg.to_dict(), "params": count_params(cfg), "active_params": count_active_params(cfg),
           "memory": fig["memory_parts"], "seq_len": seq_len, "format": folder.format_name}
    qc = hf.get("quantization_config")
    if qc:  # packed FP8 / NVFP4: the weights as stored
        out["quantization"] = {"quant_algo": qc.get("quant_algo", "quantized"), "bytes": fig["bytes"]}
    return out


def format_config_info(d: dict) -> str:
    """config_info's table: one row a setting that differs from ModelConfig's defaults, then the counts."""
    cfg = ModelConfig.from_dict(d["config"])
    kinds = ", ".join(f"{cfg.pattern.count(c)} {name}" for c, name in
                      (("M", "mamba"), ("*", "attention"), ("-", "mlp"), ("E", "moe")) if c in cfg.pattern)
    rows = [("family", f"{d['family']} ({', '.join(d['architectures'] or [])})"),
            ("pattern", f"{cfg.pattern}  ({cfg.n_blocks} blocks: {kinds})")]
    defaults = ModelConfig(vocab_size=1, hidden_size=1, pattern="-", intermediate_size=1).to_dict()
    always = ("vocab_size", "hidden_size")
    rows += [(k, str(v)) for k, v in d["config"].items()
             if k not in ("pattern", "family") and (v != defaults.get(k) or k in always)]
    rows += [("parameters", f"{d['params']:,}"), ("active parameters", f"{d['active_params']:,}")]
    q = d.get("quantization")
    if q:
        rows += [("quantization", f"{q['quant_algo']} packed (ModelOpt layout): nestlm and vLLM load it, plain "
                                  "transformers does not")]
    mem = d["memory"]
    memory = (f"{human_bytes(mem['total'])} = weights {human_bytes(mem['weights'])} ({d['format']}, as stored) + kv cache "
              f"{human_bytes(mem['kv_cache'])} + ssm state {human_bytes(mem['ssm_state'])}")
    rows += [(f"memory @ {d['seq_len']} tokens", memory)]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def describe(path: str | Path, seq_len: int = 4096, sub=None) -> tuple[dict, str]:
    """(figures, their table) of what `nestlm info` shows: an elastic checkpoint (with nestlm_elastic.json):
    its budgets and storage (`info`); a plain HF folder: family, ModelConfig, parameter counts and inference
    memory at `seq_len` (`config_info`); with `sub` (a SubArch spec, nestlm.elastic.artifact.parse_sub): parameters,
    active parameters, bytes (in the folder's own formats) and memory of the folder and of that cut
    (nestlm.search.cut_info)."""
    if sub is not None:
        from nestlm.search import cut_info, format_rows

        d = cut_info(path, sub, seq_len=seq_len)
        return d, format_rows(d, "name")
    if (Path(path) / MANIFEST).is_file():
        d = info(path)
        return d, format_info(d)
    d = config_info(path, seq_len)
    return d, format_config_info(d)
