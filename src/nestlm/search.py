"""Which cut of a checkpoint folder: SubArchs from user input, their cost, and a width-grid search.

    sub = parse_sub("hidden=1792,moe_ffn=1024", cfg)         # or a dict, or a .yaml / .json file
    rows = search("nano_dir", params=12e9)                    # SubArchs on a width grid near 12B, ranked
    row = cut_info("nano_dir", sub)                           # params, active params, bytes, memory of one cut

Counts come from nestlm.arch (count_params, count_active_params, count_memory). Bytes are those the cut
would store in the folder's own formats: the sum over the tensors nestlm.slicing.plan (plain folders) or
nestlm.quant.packed.packed_plan (ModelOpt FP8 / NVFP4 folders, mixed precision included) would write,
i.e. exactly the safetensors payload of `nestlm slice` (headers aside).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from nestlm.arch import SubArch
from nestlm.model.config import ConfigError, ModelConfig

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
        if field in kw:
            raise ConfigError(f"--sub: give {alias} or {field}, not both")
        if not groups or n % groups:
            raise ConfigError(f"--sub {alias}={n} breaks the model's {groups} {what}: heads are kept per group, "
                              f"so give a multiple of {groups} (or {field})")
        kw[field] = n // groups
    sub = SubArch(**kw)
    sub.resolve(cfg)  # ConfigError naming the field if a width is outside the model
    return sub
