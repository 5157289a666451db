"""Which cut of a checkpoint folder: its cost, and a width-grid search (SubArchs from user input:
nestlm.load.open_folder(path).budget(sub="hidden=1792,moe_ffn=1024")).

    rows = search("nano_dir", params=12e9)                    # SubArchs on a width grid near 12B, ranked
    row = cut_info("nano_dir", sub)                           # params, active params, bytes, memory of one cut

Counts come from nestlm.arch (count_params, count_active_params, count_memory). Bytes are those the cut
would store in the folder's own formats: the sum over the tensors nestlm.slicing.plan (plain folders) or
nestlm.slicing.packed.packed_plan (ModelOpt FP8 / NVFP4 folders, mixed precision included) would write,
i.e. exactly the safetensors payload of `nestlm slice` (headers aside).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from nestlm.arch import SubArch, count_active_params, count_memory, count_params, human_bytes
from nestlm.elastic.artifact import load_spec
from nestlm.elastic.config import ElasticConfig
from nestlm.errors import ConfigError
from nestlm.load import Folder, open_folder
from nestlm.model.config import ModelConfig


# ---------------------------------------------------------------------------------------------- a folder
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
        sub = folder.budget(sub=sub)[1]
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
        d = choices if isinstance(choices, dict) else load_spec(str(choices))
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
