"""Which cut of a checkpoint folder: SubArchs from user input, their cost, and a width-grid search.

    sub = parse_sub("hidden=1792,moe_ffn=1024", cfg)         # or a dict, or a .yaml / .json file
    rows = search("nano_dir", params=12e9)                    # SubArchs on a width grid near 12B, ranked
    row = cut_info("nano_dir", sub)                           # params, active params, bytes, memory of one cut

Counts come from nestlm.arch (count_params, count_active_params, count_memory). Bytes are those the cut
would store in the folder's own formats: the sum over the tensors nestlm.slicing.plan (plain folders) or
nestlm.slicing.packed.packed_plan (ModelOpt FP8 / NVFP4 folders, mixed precision included) would write,
i.e. exactly the safetensors payload of `nestlm slice` (headers aside).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import yaml

from nestlm.arch import SubArch, count_active_params, count_memory, count_params, human_bytes
from nestlm.elastic.config import ElasticConfig
from nestlm.errors import ConfigError
from nestlm.model.config import ModelConfig

FIELDS = tuple(f.name for f in dataclasses.fields(SubArch))
# total head counts, as HF configs give them: turned into per-group widths (whole groups only)
ALIASES = ("attn_heads", "mamba_heads")


# ---------------------------------------------------------------------------------------------- parsing
def _load_spec(spec: str | Path | dict) -> dict:
    """A --sub value as a dict: "k=v,k=v", a .yaml/.yml/.json file, or a dict."""
    if isinstance(spec, dict):
        return dict(spec)
    s = str(spec).strip()
    if s.endswith((".yaml", ".yml", ".json")):
        p = Path(s)
        if not p.is_file():
            raise ConfigError(f"--sub {s}: no such file")
        try:
            d = json.loads(p.read_text()) if s.endswith(".json") else yaml.safe_load(p.read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"--sub {s}: not valid {'JSON' if s.endswith('.json') else 'YAML'} ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"--sub {s}: expected a mapping of SubArch fields, got {type(d).__name__}")
        return d
    out = {}
    for part in filter(None, (x.strip() for x in s.split(","))):
        key, eq, val = part.partition("=")
        if not eq:
            raise ConfigError(f"--sub {s!r}: {part!r} is not key=value (e.g. hidden=1792,moe_ffn=1024)")
        out[key.strip()] = val.strip()
    if not out:
        raise ConfigError("--sub is empty: give key=value pairs, e.g. hidden=1792,moe_ffn=1024")
    return out


def _int(key: str, v) -> int:
    try:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError
        return int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"--sub {key}={v!r}: not a whole number") from None


def parse_sub(spec: str | Path | dict, cfg: ModelConfig) -> SubArch:
    """A SubArch from SubArch field names (hidden, moe_ffn, ..., layers as a list) plus the total head counts
    attn_heads / mamba_heads, checked against `cfg`: an unknown key, a width outside the model, or a total
    that would split a KV group or a Mamba group raises ConfigError naming it. Fields not given stay None
    (full width)."""
    d = _load_spec(spec)
    unknown = sorted(set(d) - set(FIELDS) - set(ALIASES))
    if unknown:
        raise ConfigError(f"--sub: unknown key {unknown[0]!r}; valid keys are {', '.join(FIELDS + ALIASES)}")
    kw = {k: (None if v is None else tuple(_int(k, i) for i in v) if k == "layers" else _int(k, v))
          for k, v in d.items() if k in FIELDS}
    if "layers" in d and not isinstance(d["layers"], (list, tuple)):
        raise ConfigError("--sub layers: give a list of block indices (in a .yaml / .json --sub file)")
    for alias, field, groups, what in (
            ("attn_heads", "attn_heads_per_group", kw.get("attn_kv_heads") or cfg.num_kv_heads, "KV groups"),
            ("mamba_heads", "mamba_heads_per_group", cfg.mamba_groups, "Mamba groups")):
        if alias not in d:
            continue
        n = _int(alias, d[alias])
        if not getattr(SubArch.full(cfg), field):
            raise ConfigError(f"--sub {alias}={n}: the model has no {'attention' if alias == 'attn_heads' else 'Mamba'}"
                              " heads")
        if field in kw:
            raise ConfigError(f"--sub: give {alias} or {field}, not both")
        if not groups or n % groups:
            raise ConfigError(f"--sub {alias}={n} breaks the model's {groups} {what}: heads are kept per group, "
                              f"so give a multiple of {groups} (or {field})")
        kw[field] = n // groups
    sub = SubArch(**kw)
    sub.resolve(cfg)  # ConfigError naming the field if a width is outside the model
    return sub


# ---------------------------------------------------------------------------------------------- a folder
@dataclasses.dataclass
class Folder:
    """A checkpoint folder opened for counting: its config, tensors (headers only) and packed format."""

    path: Path
    cfg: ModelConfig
    src: object  # nestlm.io.safetensors.Source
    fmt: object | None  # nestlm.quant.formats.Format of a packed folder, else None
    kv_bytes: float  # bytes per KV-cache element: 1 with the ModelOpt FP8 KV cache, else 2

    @property
    def format_name(self) -> str:
        from nestlm.convert import FAMILIES

        emb = FAMILIES[self.cfg.family].hf_name("embeddings.weight", self.cfg)
        dtype = str(self.src.dtype(emb)).removeprefix("torch.")
        return f"{self.fmt.quant_algo} (+ {dtype})" if self.fmt is not None else dtype


def open_folder(path: str | Path) -> Folder:
    """A plain or packed HF folder (elastic or not), checked as nestlm.slicing / nestlm.quant check it."""
    from nestlm.convert import config_from_hf
    from nestlm.io.safetensors import QUANT_CONFIG, Source, read_config
    from nestlm.quant.packed import format_of
    from nestlm.slicing.plan import open_source

    path = Path(path)
    hf = read_config(path)
    if "quantization_config" not in hf:
        _, cfg, src, _ = open_source(path)
        return Folder(path, cfg, src, None, 2.0)
    fmt, _ = format_of(hf, path)
    hq = json.loads((path / QUANT_CONFIG).read_text()) if (path / QUANT_CONFIG).is_file() else {}
    kv = (hq.get("quantization") or {}).get("kv_cache_quant_algo") or hf["quantization_config"].get("kv_cache_quant_algo")
    return Folder(path, config_from_hf(hf), Source(path), fmt, 1.0 if str(kv).upper() == "FP8" else 2.0)


def cut_bytes(folder: Folder, sub: SubArch | None) -> int:
    """Bytes of the safetensors payload `nestlm slice` writes for `sub` (headers aside), in the folder's own
    formats: the sum over the tensors of the slicing plan (the packed plan for FP8 / NVFP4 folders)."""
    s = (sub or SubArch()).resolve(folder.cfg)
    if folder.fmt is None:
        from nestlm.slicing import plan

        tensors = plan(folder.src, folder.cfg, s)
    else:
        from nestlm.quant.fake import check_subarch
        from nestlm.slicing.packed import packed_plan

        check_subarch(folder.cfg, s, folder.fmt)
        tensors = packed_plan(folder.src, folder.cfg, s, folder.fmt)
    return sum(t.nbytes for t in tensors)


def figures(folder: Folder, sub: SubArch | None, seq_len: int = 4096, weight_bytes: int | None = None) -> dict:
    """Parameters, active parameters, bytes and inference memory (weights + KV cache + SSM state at seq_len,
    batch 1) of the cut `sub` of the folder. weight_bytes: the cut's bytes if already known."""
    cfg = folder.cfg
    s = (sub or SubArch()).resolve(cfg)
    params = count_params(cfg, s)
    nbytes = cut_bytes(folder, s) if weight_bytes is None else weight_bytes
    mem = count_memory(cfg, s, seq_len=seq_len, weight_bytes=nbytes / params, kv_bytes=folder.kv_bytes)
    full = SubArch.full(cfg)
    short = {k: v for k, v in s.to_dict().items() if k != "layers" and v != getattr(full, k)}
    if s.layers != full.layers:
        short["layers"] = list(s.layers)
    return {"sub": short, "params": params, "active_params": count_active_params(cfg, s), "bytes": nbytes,
            "memory": mem["total"], "memory_parts": mem, "seq_len": seq_len}


def cut_info(path: str | Path, sub: str | dict | SubArch | None = None, seq_len: int = 4096) -> dict:
    """`nestlm info SRC [--sub ...]`: the folder's figures, and those of the cut `sub` if given."""
    folder = open_folder(path)
    if sub is not None and not isinstance(sub, SubArch):
        sub = parse_sub(sub, folder.cfg)
    rows = [{"name": "source", **figures(folder, None, seq_len)}]
    if sub is not None:
        rows.append({"name": "cut", **figures(folder, sub, seq_len)})
    return {"path": str(folder.path), "family": folder.cfg.family, "format": folder.format_name, "rows": rows}


# ---------------------------------------------------------------------------------------------- search
def _grid(cfg: ModelConfig, choices: str | Path | dict | None) -> dict[str, list[int]]:
    """{axis: widths} of the width grid: `choices` (a mapping axis -> list, or a YAML/JSON file holding one,
    or an ElasticConfig YAML with a `choices` key) resolved as ElasticConfig resolves them; default:
    ElasticConfig's default choices (fractions of each full width, rounded to whole widths)."""
    if choices is None:  # the default fractions, rounded to whole widths (experts: at least top_k)
        full, d = SubArch.full(cfg), {}
        for ax, fracs in ElasticConfig().choices.items():
            f = getattr(full, ax)
            if f:
                ws = sorted({max(1, round(x * f)) for x in fracs}, reverse=True)
                d[ax] = [w for w in ws if ax != "experts" or w >= cfg.top_k]
        ecfg = ElasticConfig(choices=d, align=1)
    else:
        if not isinstance(choices, dict) and not str(choices).endswith((".yaml", ".yml", ".json")):
            raise ConfigError(f"--choices {choices}: give a .yaml / .json file")
        d = choices if isinstance(choices, dict) else _load_spec(str(choices))
        d = d.get("choices", d)
        if "depth" in d:
            raise ConfigError("--choices: search covers widths; 'depth' needs an importance order (use elastify)")
        ecfg = ElasticConfig(choices=d, align=1)
    return ecfg.resolve_choices(cfg)


def search(path: str | Path, params: float | None = None, active: float | None = None,
           memory: float | None = None, seq_len: int = 4096, choices: str | Path | dict | None = None,
           tol: float = 0.05, top: int = 10) -> dict:
    """SubArchs on a width grid whose parameters (or active parameters, or inference memory at seq_len)
    are within `tol` (relative) of the target, closest first, at most `top`, with their figures in the
    folder's own formats. Exactly one target. Cuts the folder's format can't store (NVFP4: widths that
    break a block of 16) are left out."""
    targets = {k: v for k, v in (("params", params), ("active_params", active), ("memory", memory)) if v is not None}
    if len(targets) != 1:
        raise ConfigError("search: give exactly one target (--params, --active or --memory)")
    (metric, target), = targets.items()
    if not 0 < target < float("inf") or not tol >= 0 or top < 1:  # nan fails every comparison
        raise ConfigError(f"search: the target must be > 0 and finite (got {metric} {target}), --tol >= 0 and "
                          "--top >= 1")
    folder = open_folder(path)
    cfg = folder.cfg
    grid = _grid(cfg, choices)
    axes = list(grid)
    n_cands = math.prod(len(v) for v in grid.values())
    if n_cands > 200_000:
        raise ConfigError(f"--choices: {n_cands} combinations; keep the grid under 200,000")
    if folder.fmt is not None:
        from nestlm.quant.fake import check_subarch
    full_bytes = cut_bytes(folder, None)
    per_param = full_bytes / count_params(cfg)
    scored = []
    for combo in itertools.product(*(grid[a] for a in axes)):
        sub = SubArch(**dict(zip(axes, combo, strict=True)))
        if folder.fmt is not None:
            try:
                check_subarch(cfg, sub, folder.fmt)
            except ConfigError:
                continue
        if metric == "memory":  # weights estimated at the folder's average bytes per parameter; exact below
            value = count_memory(cfg, sub, seq_len=seq_len, weight_bytes=per_param, kv_bytes=folder.kv_bytes)["total"]
        else:
            value = count_params(cfg, sub, active=metric == "active_params")
        scored.append((abs(value / target - 1), -count_params(cfg, sub), sub))
    scored.sort(key=lambda r: r[:2])
    slack = 2 * tol + 0.02 if metric == "memory" else tol  # the estimate's candidates, then exact figures
    rows = []
    for dev, _, sub in scored:
        if dev > slack or len(rows) >= top:
            break
        r = figures(folder, sub, seq_len)
        r["deviation"] = r[metric] / target - 1
        if abs(r["deviation"]) <= tol:
            rows.append(r)
    rows.sort(key=lambda r: (abs(r["deviation"]), -r["params"]))
    return {"path": str(folder.path), "family": cfg.family, "format": folder.format_name, "metric": metric,
            "target": target, "tol": tol, "seq_len": seq_len, "grid": grid, "candidates": len(scored),
            "rows": rows}


# ---------------------------------------------------------------------------------------------- printing
def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _sub_str(d: dict) -> str:
    return ", ".join(f"{k}={v}" if k != "layers" else f"layers={len(v)} kept" for k, v in d.items()) or "(full)"


def format_rows(d: dict, first: str = "cut") -> str:
    """A table of cut_info's or search's rows."""
    lines = [f"{d['path']}: {d['family']}, {d['format']}"]
    if "metric" in d:
        name = {"params": "parameters", "active_params": "active parameters", "memory": "memory"}[d["metric"]]
        tgt = human_bytes(d["target"]) if d["metric"] == "memory" else _count(d["target"])
        lines.append(f"{len(d['rows'])} of {d['candidates']} grid SubArchs within {d['tol']:.0%} of {tgt} {name}"
                     f" (closest first; grid: " + ", ".join(f"{a} {v}" for a, v in d["grid"].items()) + ")")
    seq = d["rows"][0]["seq_len"] if d["rows"] else 4096
    lines += ["", f"| {first:<6} | {'params':>8} | {'active':>8} | {'weights':>10} | {f'memory @ {seq}':>14} | "
                  f"{'dev':>6} | SubArch (axes not at full width) |",
              f"|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 16}|{'-' * 8}|{'-' * 34}|"]
    for i, r in enumerate(d["rows"]):
        dev = f"{r['deviation']:+.1%}" if "deviation" in r else ""
        lines.append(f"| {r.get('name', str(i + 1)):<6} | {_count(r['params']):>8} | {_count(r['active_params']):>8} | "
                     f"{human_bytes(r['bytes']):>10} | {human_bytes(r['memory']):>14} | {dev:>6} | {_sub_str(r['sub'])} |")
    lines.append("")
    lines.append("weights: the safetensors payload `nestlm slice` writes (exact, headers aside); memory: weights + "
                 "KV cache + SSM state, batch 1")
    return "\n".join(lines)
