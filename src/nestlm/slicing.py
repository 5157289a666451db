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
then tensor by tensor, in chunks of rows: a reader thread copies ~16 MB chunks out of the memory map while
the main thread writes the previous ones, at most IN_FLIGHT_BYTES ahead, and the source is unmapped every
RELEASE_BYTES, so resident memory stays bounded whatever the checkpoint's size. The folder is
built under a temporary sibling name and moved into place with os.replace; on any error nothing is left.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from nestlm.arch import SubArch, count_active_params, count_params, sliced_config
from nestlm.config import MANIFEST, ROUTER_FILE
from nestlm.convert import FAMILIES, config_from_hf, moe, nemotron_h
from nestlm.convert.io import (
    TOKENIZER_FILES,
    CheckpointError,
    SafetensorsDir,
    UnsupportedArchitecture,
    atomic_dir,
    copy_files,
    read_config,
    split_shards,
    write_shards,
)
from nestlm.data import ByteTokenizer
from nestlm.model.config import ConfigError, ModelConfig

__all__ = ["format_info", "info", "plan", "resolve_budget", "slice"]

SLICE_FILE = "nestlm_slice.json"  # provenance written next to a sliced checkpoint (ignored by transformers)
EXTRA_FILES = (ByteTokenizer.FILE,)

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_DTYPE = {v: k for k, v in DTYPES.items()}


# ---------------------------------------------------------------------------------------------- source
class Source(SafetensorsDir):
    """A checkpoint folder's tensors, memory-mapped: names, shapes and dtypes from the headers, and prefix
    reads that touch only the requested bytes. `prefetch` asks the kernel to read rows ahead (cold caches);
    `release` unmaps what was read so far (the mapped pages stop counting in the process's memory)."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._dir = Path(path)
        self._extent: dict[str, tuple[Path, int, int]] = {}  # name -> (file, first byte, end byte)
        for fname in self._handles:
            with open(self._dir / fname, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    self._extent[k] = (self._dir / fname, 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])

    def prefetch(self, name: str, start: int, stop: int) -> None:
        """Start reading rows start:stop (dim 0) of tensor `name` into the page cache (POSIX_FADV_WILLNEED)."""
        fp, a, b = self._extent[name]
        rows = self.shape(name)[0] if self.shape(name) else 1
        row = (b - a) // max(rows, 1)
        fd = os.open(fp, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, a + start * row, (stop - start) * row, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Re-open the files, unmapping the old maps: every tensor read before must be dead (they are views)."""
        for fname in self._handles:
            self._handles[fname] = safe_open(str(self._dir / fname), framework="pt")

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._handles[self._where[name]].get_slice(name).get_dtype()]

    def files(self) -> list[str]:
        return list(self._handles)


def _manifest(path: Path) -> dict | None:
    f = path / MANIFEST
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("budgets"), dict):
        raise CheckpointError(f"{f}: no 'budgets' table (not an elastic manifest)")
    return m


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
    manifest = _manifest(path)
    if manifest is not None:
        _check_manifest(path, cfg, manifest)
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


def _check_manifest(path: Path, cfg: ModelConfig, manifest: dict) -> None:
    fam = manifest.get("family")
    if fam != cfg.family:
        raise CheckpointError(f"{path}/{MANIFEST} is for family {fam!r} but the weights are {cfg.family!r}")
    for name, b in manifest["budgets"].items():
        try:
            sub = SubArch.from_dict(b["sub"])
            sub.resolve(cfg)
        except (ConfigError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}/{MANIFEST}: budget {name!r} doesn't fit the weights' config: {e}") \
                from None
        if "params" in b and b["params"] != count_params(cfg, sub):
            raise CheckpointError(f"{path}/{MANIFEST}: budget {name!r} lists {b['params']} parameters but the "
                                  f"weights' config gives {count_params(cfg, sub)} (manifest from another model?)")


# ---------------------------------------------------------------------------------------------- budgets
def _budget_names(manifest: dict | None) -> list[str]:
    return list(manifest["budgets"]) if manifest else []


def _parse_fraction(s: str) -> float | None:
    s = s.strip()
    try:
        return float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        return None


def resolve_budget(path: str | Path, budget: str | float | SubArch, *, cfg: ModelConfig | None = None,
                   manifest: dict | None = None) -> tuple[str, SubArch]:
    """(a display name, the SubArch) of `budget` for the checkpoint at `path`.

    budget: a manifest name ('full', '77%'); a fraction (a trained one -> its manifest entry; between two
    trained ones -> the router's interpolation; 1.0 -> the full model); or an explicit SubArch.
    Raises KeyError (listing the manifest's budgets) for a name or fraction the checkpoint doesn't have."""
    path = Path(path)
    if cfg is None:
        _, cfg, _, manifest = _open(path)
    if isinstance(budget, SubArch):
        budget.resolve(cfg)  # ConfigError, naming the axis, if it doesn't fit
        return "custom", budget
    if isinstance(budget, bool) or not isinstance(budget, (str, int, float)):
        raise TypeError(f"budget must be a name, a fraction or a SubArch, got {type(budget).__name__}")
    names = _budget_names(manifest)
    if isinstance(budget, str):
        if manifest and budget in manifest["budgets"]:
            return budget, SubArch.from_dict(manifest["budgets"][budget]["sub"])
        frac = _parse_fraction(budget)
        if frac is None:
            raise KeyError(f"no budget {budget!r} in {path} (budgets: {names or 'none: not an elastic checkpoint'})")
    else:
        frac = float(budget)
    if frac == 1.0:
        return "full", SubArch()
    if not manifest:
        raise KeyError(f"budget {budget!r}: {path} has no {MANIFEST} (not an elastic checkpoint); "
                       "pass an explicit SubArch")
    for name, b in manifest["budgets"].items():
        if math.isclose(b["fraction"], frac, rel_tol=1e-6):
            return name, SubArch.from_dict(b["sub"])
    fracs = [b["fraction"] for b in manifest["budgets"].values()]
    if not min(fracs) < frac < max(fracs):
        raise KeyError(f"budget {budget!r} is outside the trained range {min(fracs):g}..{max(fracs):g} of "
                       f"{path} (budgets: {names}); pick one of them or a fraction in between")
    from nestlm.config import budget_name

    router = _router(path, cfg, manifest)  # within the landing tolerance of frac, like the trained budgets
    return f"{budget_name(frac)} (interpolated)", router.interpolate(frac, router.ecfg.landing_tolerance)


def _router(path: Path, cfg: ModelConfig, manifest: dict):
    """The trained router alone (the weights are not loaded): for interpolating between budgets."""
    from safetensors.torch import load_file

    from nestlm.config import ElasticConfig
    from nestlm.router import Router

    f = path / ROUTER_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: no {ROUTER_FILE}; interpolating between budgets needs the router")
    router = Router(cfg, ElasticConfig.from_dict(manifest["elastic"]))
    try:
        router.load_state_dict(load_file(str(f)))
    except Exception as e:
        raise CheckpointError(f"{f}: doesn't match the manifest's elastic config ({e})") from None
    return router.eval()


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


def _group_ranges(total: int, groups: int, keep: int, offset: int = 0) -> list[tuple[int, int]]:
    """The first `keep` of each of `groups` equal groups of `total` (group_heads' rule), as index ranges."""
    per = total // groups
    return [(offset + g * per, offset + g * per + keep) for g in range(groups)]


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1][1] = b
        elif b > a:
            out.append([a, b])
    return [(a, b) for a, b in out]


class _Planner:
    def __init__(self, src: Source, cfg: ModelConfig, s: SubArch):
        self.src, self.cfg, self.s = src, cfg, s
        self.out: list[OutTensor] = []

    def add(self, name: str, src: str, stops: tuple, ranges: list[tuple[int, int]] | None = None, dim: int = 0):
        """Output `name` = source `src` cut to the prefix `stops` (one stop per dim, None: all), except along
        `dim` where `ranges` (if given) are kept and concatenated."""
        shape = self.src.shape(src)
        stops = tuple(stops) + (None,) * (len(shape) - len(stops))
        if ranges is None:
            ranges = [(0, shape[dim] if stops[dim] is None else stops[dim])]
        ranges = _merge(ranges)
        pieces = []
        for a, b in ranges:
            idx = tuple(builtins.slice(a, b) if d == dim else builtins.slice(0, stops[d]) for d in range(len(shape)))
            pieces.append(Piece(src, idx))
        out_shape = tuple(sum(b - a for a, b in ranges) if d == dim else (shape[d] if stops[d] is None else stops[d])
                          for d in range(len(shape)))
        self.out.append(OutTensor(name, pieces, dim, out_shape, self.src.dtype(src)))

    # -- per block kind: `i` source prefix, `o` output prefix (both end with ".")
    def attention(self, i: str, o: str):
        c, s, k = self.cfg, self.s, self.s.hidden
        hd, r = c.head_dim, c.num_heads // c.num_kv_heads
        q = _group_ranges(c.num_kv_heads * r * hd, c.num_kv_heads, s.attn_heads_per_group * hd)[:s.attn_kv_heads]
        kv = s.attn_kv_heads * hd
        self.add(o + "q_proj.weight", i + "q_proj.weight", (None, k), q)
        self.add(o + "k_proj.weight", i + "k_proj.weight", (kv, k))
        self.add(o + "v_proj.weight", i + "v_proj.weight", (kv, k))
        self.add(o + "o_proj.weight", i + "o_proj.weight", (k, None), q, dim=1)
        if c.attn_bias:
            self.add(o + "q_proj.bias", i + "q_proj.bias", (None,), q)
            self.add(o + "k_proj.bias", i + "k_proj.bias", (kv,))
            self.add(o + "v_proj.bias", i + "v_proj.bias", (kv,))
            self.add(o + "o_proj.bias", i + "o_proj.bias", (k,))
        if c.qk_norm:
            self.add(o + "q_norm.weight", i + "q_norm.weight", ())
            self.add(o + "k_norm.weight", i + "k_norm.weight", ())

    def mlp(self, i: str, o: str, f: int, bias: bool):
        k = self.s.hidden
        names = ("gate_proj", "up_proj") if self.cfg.mlp_act == "swiglu" and "shared_experts" not in i \
            else ("up_proj",)
        for n in names:
            self.add(o + n + ".weight", i + n + ".weight", (f, k))
            if bias:
                self.add(o + n + ".bias", i + n + ".bias", (f,))
        self.add(o + "down_proj.weight", i + "down_proj.weight", (k, f))
        if bias:
            self.add(o + "down_proj.bias", i + "down_proj.bias", (k,))

    def mamba(self, i: str, o: str):
        c, k, m = self.cfg, self.s.hidden, self.s.mamba_heads_per_group
        h, p, g, n = c.mamba_heads, c.mamba_head_dim, c.mamba_groups, c.ssm_state
        hp, gn = h * p, g * n
        heads = lambda width, off=0: _group_ranges(h * width, g, m * width, off)  # first m heads of each group
        in_rows = heads(p) + heads(p, hp) + [(2 * hp, 2 * hp + 2 * gn)] + heads(1, 2 * hp + 2 * gn)  # z|x|B C|dt
        conv_rows = heads(p) + [(hp, hp + 2 * gn)]  # x | B C
        self.add(o + "in_proj.weight", i + "in_proj.weight", (None, k), in_rows)
        if c.mamba_bias:
            self.add(o + "in_proj.bias", i + "in_proj.bias", (None,), in_rows)
        self.add(o + "conv1d.weight", i + "conv1d.weight", (), conv_rows)
        if c.conv_bias:
            self.add(o + "conv1d.bias", i + "conv1d.bias", (), conv_rows)
        for name in ("dt_bias", "A_log", "D"):
            self.add(o + name, i + name, (), heads(1))
        self.add(o + "norm.weight", i + "norm.weight", (), heads(p))
        self.add(o + "out_proj.weight", i + "out_proj.weight", (k, None), heads(p), dim=1)
        if c.mamba_bias:
            self.add(o + "out_proj.bias", i + "out_proj.bias", (k,))

    def moe(self, i: str, o: str):
        """The router's first e rows (and the sigmoid router's bias) with the first e experts, each cut to
        its first f channels; expert tensors are named per family (up/down; gate/up/down; w1/w3/w2)."""
        c, s, k = self.cfg, self.s, self.s.hidden
        e, f = s.experts, s.moe_ffn
        self.add(o + "gate.weight", i + "gate.weight", (e, k))
        if c.moe_router == "sigmoid":
            self.add(o + "gate.e_score_correction_bias", i + "gate.e_score_correction_bias", (e,))
        names = _expert_names(c)
        for j in range(e):
            for ours, theirs in names.items():
                stops = (k, f) if ours == "down_proj" else (f, k)
                self.add(f"{o}experts.{j}.{theirs}.weight", f"{i}experts.{j}.{theirs}.weight", stops)
        if c.shared_intermediate_size:
            self.mlp(i + "shared_experts.", o + "shared_experts.", s.shared_ffn, c.mlp_bias)


def _expert_names(cfg: ModelConfig) -> dict[str, str]:
    """Our stacked expert weights -> the HF per-expert projection names of cfg's family."""
    if cfg.family in moe.EXPERT_NAMES:
        return moe.EXPERT_NAMES[cfg.family]
    return {"up_proj": "up_proj", "down_proj": "down_proj"}  # Nemotron-H: ReLU² experts


def _names(family: str):
    """Family-specific HF names: (embedding, final norm, block -> (norm, mixer prefix))."""
    if family == "nemotron_h":
        return ("backbone.embeddings.weight", "backbone.norm_f.weight",
                lambda i, kind: (f"backbone.layers.{i}.norm.weight", f"backbone.layers.{i}.mixer."))
    moe_module = moe.MOE_MODULE.get(family, "mlp")

    def block(i, kind):  # our block i is half of HF layer i // 2
        j = i // 2
        if kind == "*":
            return f"model.layers.{j}.input_layernorm.weight", f"model.layers.{j}.self_attn."
        mixer = moe_module if kind == "E" else "mlp"
        return f"model.layers.{j}.post_attention_layernorm.weight", f"model.layers.{j}.{mixer}."

    return "model.embed_tokens.weight", "model.norm.weight", block


def plan(src: Source, cfg: ModelConfig, sub: SubArch | None) -> list[OutTensor]:
    """Every output tensor of the submodel `sub`: its HF name, shape, dtype and the source reads behind it."""
    s = (sub or SubArch()).resolve(cfg)
    small = sliced_config(cfg, s)
    p = _Planner(src, cfg, s)
    k = s.hidden
    emb, norm_f, block = _names(cfg.family)
    p.add(emb, emb, (None, k))
    for new_i, i in enumerate(s.layers):
        kind = cfg.pattern[i]
        src_norm, src_mixer = block(i, kind)
        out_norm, out_mixer = block(new_i, kind)
        p.add(out_norm, src_norm, (k,))
        if kind == "*":
            p.attention(src_mixer, out_mixer)
        elif kind == "-":
            p.mlp(src_mixer, out_mixer, s.ffn, cfg.mlp_bias)
        elif kind == "M":
            p.mamba(src_mixer, out_mixer)
        else:
            p.moe(src_mixer, out_mixer)
    p.add(norm_f, norm_f, (k,))
    if cfg.family == "nemotron_h":  # transformers' Nemotron-H always runs its own lm_head (see state_to_hf)
        p.add("lm_head.weight", "lm_head.weight" if "lm_head.weight" in src else emb, (None, k))
    elif not small.tie_embeddings:
        p.add("lm_head.weight", "lm_head.weight", (None, k))
    return p.out


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
    parts = [src.read(pc.src, (builtins.slice(r0, r1),) + pc.idx[1:]) for pc, r0, r1 in _chunk_rows(t, a, b)]
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


def slice(elastic_dir: str | Path, budget: str | float | SubArch, out_dir: str | Path, overwrite: bool = False,
          max_shard_bytes: int = 4 << 30, stats: dict | None = None) -> Path:
    """Write the submodel `budget` of the checkpoint `elastic_dir` as a plain Hugging Face folder `out_dir`
    (config.json, safetensors shards, tokenizer files, and nestlm_slice.json recording where it came from).

    budget: a manifest name ('77%'), a fraction (trained, or between trained ones: the router interpolates),
    or an explicit SubArch (any checkpoint folder, elastic or not). Streams: memory holds a few chunks.
    stats: if a dict is given, it receives bytes_written, peak_bytes (most bytes read but not yet written),
    tensors, seconds.
    Raises FileExistsError (out_dir exists, overwrite=False), KeyError (unknown budget), CheckpointError
    (missing / truncated / inconsistent files), ConfigError (a SubArch that doesn't fit)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not overwrite:  # before reading anything
        raise FileExistsError(f"{out} exists; choose a new directory or pass overwrite=True")
    if "quantization_config" in read_config(elastic_dir):  # packed FP8 / NVFP4: cut codes and scales as-is
        from nestlm.quant import slice_quantized

        st: dict = {}
        dst = slice_quantized(elastic_dir, out, budget, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                              stats=st)
        if stats is not None:
            stats.update(st, seconds=time.perf_counter() - t0)
        return dst
    path, cfg, src, manifest = _open(elastic_dir)
    name, sub = resolve_budget(path, budget, cfg=cfg, manifest=manifest)
    s = sub.resolve(cfg)
    small = sliced_config(cfg, s)
    hf = FAMILIES[cfg.family].config_to_hf(small)  # UnsupportedArchitecture before anything is written
    _check_transformers_accepts(hf)
    tensors = plan(src, cfg, s)
    emb = _names(cfg.family)[0]
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
            copy_files(path, tmp, TOKENIZER_FILES + EXTRA_FILES)
            (tmp / SLICE_FILE).write_text(json.dumps({
                "source": str(path.resolve()), "budget": name, "sub": s.to_dict(), "family": cfg.family,
                "params": count_params(cfg, s), "active_params": count_active_params(cfg, s)}, indent=2))
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
    dtype = src.dtype(_names(cfg.family)[0])
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
    if (path / SLICE_FILE).is_file():
        d["sliced_from"] = json.loads((path / SLICE_FILE).read_text())
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

