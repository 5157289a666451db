"""The slicing rule, once: which rows and columns of every tensor a nested submodel keeps, per block kind.

After importance sorting every elastic axis is a prefix of *units* (channels, heads, experts), taken per
group where the axis is grouped (query heads inside their KV group, Mamba heads inside their B/C group).
Each tensor dimension is declared here once, as the runs of units laid end to end along it:

    Mamba2 in_proj rows   [z: Mamba heads x P | x: Mamba heads x P | B, C: fixed 2GN | dt: Mamba heads x 1]
    Mamba2 conv1d rows    [x: Mamba heads x P | B, C: fixed 2GN]
    attention q rows      [query heads x head_dim, grouped by KV group]
    MoE up_proj           [experts] x [expert FFN channels] x [hidden]

and everything that cuts or permutes weights reads that declaration:

    forward      the mixers in nestlm.model.layers cut their weights with `take(w, cut)`
    extract      nestlm.model.extract.sliced_state_dict (every tensor of the Decoder, `model_cuts`)
    streamed     nestlm.slicing.plan (the same cuts, renamed to HF names by the family converter)
    packed       nestlm.quant: nestlm.slicing.plan's runs, halved for NVFP4 nibbles, / 16 for block scales
    sort         nestlm.elastic.sort: one permutation per axis, expanded along every segment that carries it (`perm`)
    transplant   nestlm.inference.two_phase: cache states are declared too (`cache_tensors`), moved between widths (`embed`)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nestlm.model.config import ModelConfig

Runs = tuple[tuple[int, int], ...]  # kept [start, stop) runs along one dim: increasing, adjacent runs merged
Cut = tuple[Runs | None, ...]  # one entry per dim (None: the dim is kept whole)


@dataclass(frozen=True)
class Seg:
    """`units` equal units of `axis` (each `width` channels wide) laid end to end along a tensor dim, in
    `groups` equal groups. axis None: a fixed run that is always kept whole and never permuted."""

    axis: str | None
    units: int
    width: int = 1
    groups: int = 1

    @property
    def size(self) -> int:
        return self.units * self.width


Dims = dict[int, tuple[Seg, ...]]  # dim -> its segments; dims not listed are kept whole

# the elastic axes and the SubArch fields that set them (query heads: two fields, groups kept and heads per group)
AXIS_FIELDS = {"hidden": "hidden", "kv": "attn_kv_heads", "q_heads": ("attn_kv_heads", "attn_heads_per_group"),
               "mamba": "mamba_heads_per_group", "ffn": "ffn", "moe_ffn": "moe_ffn", "shared_ffn": "shared_ffn",
               "experts": "experts"}
STACKED = ("up_proj", "gate_proj", "down_proj")  # the MoE mixer's stacked expert tensors ([E, ...], no .weight)


def axis_values(s) -> dict:
    """{axis: kept units} of a resolved SubArch (q_heads: (KV groups kept, heads kept per group))."""
    return {a: (tuple(getattr(s, f) for f in fs) if isinstance(fs, tuple) else getattr(s, fs))
            for a, fs in AXIS_FIELDS.items()}


# ---------------------------------------------------------------------------------------------- declarations
def _linear(rows: tuple[Seg, ...], cols: tuple[Seg, ...], bias: bool, name: str) -> dict[str, Dims]:
    d = {f"{name}.weight": {0: rows, 1: cols}}
    if bias:
        d[f"{name}.bias"] = {0: rows}
    return d


def mlp_tensors(d: int, f: int, gated: bool, bias: bool, axis: str = "ffn") -> dict[str, Dims]:
    """MLP (`-`, and the MoE shared expert with axis 'shared_ffn'): up/gate rows and down columns follow
    the `axis` channels, the other side the hidden channels."""
    h, c = (Seg("hidden", d),), (Seg(axis, f),)
    out = _linear(c, h, bias, "up_proj")
    if gated:
        out |= _linear(c, h, bias, "gate_proj")
    return out | _linear(h, c, bias, "down_proj")


def attention_tensors(cfg: ModelConfig) -> dict[str, Dims]:
    """q rows (and o columns) are [KV group][query head in group][head_dim]; k/v rows [KV group][head_dim]."""
    h = (Seg("hidden", cfg.hidden_size),)
    q = (Seg("q_heads", cfg.num_heads, cfg.head_dim, cfg.num_kv_heads),)
    kv = (Seg("kv", cfg.num_kv_heads, cfg.head_dim),)
    out = _linear(q, h, cfg.attn_bias, "q_proj") | _linear(kv, h, cfg.attn_bias, "k_proj") \
        | _linear(kv, h, cfg.attn_bias, "v_proj") | _linear(h, q, cfg.attn_bias, "o_proj")
    if cfg.qk_norm:
        out |= {"q_norm.weight": {}, "k_norm.weight": {}}
    return out


def mamba_tensors(cfg: ModelConfig) -> dict[str, Dims]:
    """in_proj rows [z | x | B C | dt], conv1d channels [x | B C]: z, x, dt, A, D, dt_bias, the gated norm
    and out_proj follow the heads (first m of each group); B and C belong to the groups and stay whole."""
    hd, p, g = cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_groups
    heads = lambda width: Seg("mamba", hd, width, g)
    bc = Seg(None, 2 * g * cfg.ssm_state)
    h = (Seg("hidden", cfg.hidden_size),)
    out = _linear((heads(p), heads(p), bc, heads(1)), h, cfg.mamba_bias, "in_proj")
    out["conv1d.weight"] = {0: (heads(p), bc)}
    if cfg.conv_bias:
        out["conv1d.bias"] = {0: (heads(p), bc)}
    out |= {n: {0: (heads(1),)} for n in ("dt_bias", "A_log", "D")}
    out["norm.weight"] = {0: (heads(p),)}
    return out | _linear(h, (heads(p),), cfg.mamba_bias, "out_proj")


def moe_tensors(cfg: ModelConfig) -> dict[str, Dims]:
    """The router's rows (and the sigmoid router's correction bias) follow the experts; each stacked expert
    tensor [E, out, in] is cut on experts, then on its channels; the shared expert is an MLP."""
    h, e, f = Seg("hidden", cfg.hidden_size), Seg("experts", cfg.n_experts), Seg("moe_ffn", cfg.moe_intermediate_size)
    out = {"gate.weight": {0: (e,), 1: (h,)}}
    if cfg.moe_router == "sigmoid":
        out["e_score_correction_bias"] = {0: (e,)}
    out["up_proj"] = {0: (e,), 1: (f,), 2: (h,)}
    if cfg.moe_act == "swiglu":
        out["gate_proj"] = {0: (e,), 1: (f,), 2: (h,)}
    out["down_proj"] = {0: (e,), 1: (h,), 2: (f,)}
    if cfg.shared_intermediate_size:
        shared = mlp_tensors(cfg.hidden_size, cfg.shared_intermediate_size, False, cfg.mlp_bias, "shared_ffn")
        out |= {"shared." + n: d for n, d in shared.items()}
    return out


def block_tensors(cfg: ModelConfig, kind: str) -> dict[str, Dims]:
    """Every tensor of a block's mixer (Decoder state-dict names below `layers.{i}.mixer.`), declared."""
    if kind == "*":
        return attention_tensors(cfg)
    if kind == "M":
        return mamba_tensors(cfg)
    if kind == "-":
        return mlp_tensors(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_act == "swiglu", cfg.mlp_bias)
    return moe_tensors(cfg)


def model_tensors(cfg: ModelConfig) -> dict[str, Dims]:
    """Every tensor of the Decoder's state dict, declared (blocks under `layers.{i}.`)."""
    h = (Seg("hidden", cfg.hidden_size),)
    out: dict[str, Dims] = {"embeddings.weight": {1: h}}
    for i, kind in enumerate(cfg.pattern):
        out[f"layers.{i}.norm.weight"] = {0: h}
        out |= {f"layers.{i}.mixer.{n}": d for n, d in block_tensors(cfg, kind).items()}
    out["norm_f.weight"] = {0: h}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = {1: h}
    return out


def cache_tensors(cfg: ModelConfig, kind: str) -> dict[str, Dims]:
    """A block's decoding state, declared like the weights: attention k, v [b, KV groups, t, head_dim];
    Mamba conv [b, x | B C channels, K-1] and ssm [b, heads, P, N]. MLP and MoE blocks hold none."""
    if kind == "*":
        kv = {1: (Seg("kv", cfg.num_kv_heads),)}
        return {"k": kv, "v": kv}
    if kind == "M":
        hd, p, g = cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_groups
        return {"conv": {1: (Seg("mamba", hd, p, g), Seg(None, 2 * g * cfg.ssm_state))},
                "ssm": {1: (Seg("mamba", hd, 1, g),)}}
    return {}


# ---------------------------------------------------------------------------------------------- keeping
def _merge(runs) -> Runs:
    out: list[list[int]] = []
    for a, b in runs:
        if out and out[-1][1] == a:
            out[-1][1] = b
        elif b > a:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def kept_units(seg: Seg, value) -> Runs:
    """The units of `seg` kept at `value` (first `value` of each group; q_heads: (groups kept, per group))."""
    if seg.axis is None:
        return ((0, seg.units),)
    groups, keep = value if isinstance(value, tuple) else (seg.groups, value)
    per = seg.units // seg.groups
    return _merge((j * per, j * per + keep) for j in range(groups))


def dim_runs(segs: tuple[Seg, ...], values: dict) -> Runs:
    """The kept channel runs along a dim made of `segs`."""
    out, off = [], 0
    for seg in segs:
        out += [(off + a * seg.width, off + b * seg.width) for a, b in kept_units(seg, values.get(seg.axis))]
        off += seg.size
    return _merge(out)


def cut(dims: Dims, values: dict) -> Cut:
    """The kept runs of every declared dim of one tensor (None for the dims it keeps whole)."""
    n = max(dims, default=-1) + 1
    full = {d: sum(s.size for s in segs) for d, segs in dims.items()}
    out = []
    for d in range(n):
        r = dim_runs(dims[d], values) if d in dims else None
        out.append(None if r is None or r == ((0, full[d]),) else r)
    return tuple(out)


def model_cuts(cfg: ModelConfig, s) -> dict[str, tuple[str, Cut]]:
    """Every tensor of the standalone submodel s, block by block as in its state dict (within a block in
    declaration order): {its name (blocks renumbered): (source name, Cut)}."""
    v = axis_values(s)
    decl = model_tensors(cfg)
    out = {"embeddings.weight": ("embeddings.weight", cut(decl["embeddings.weight"], v))}
    for new_i, i in enumerate(s.layers):
        src = f"layers.{i}."
        for name, dims in decl.items():
            if name.startswith(src):
                out[f"layers.{new_i}." + name[len(src):]] = (name, cut(dims, v))
    for name in ("norm_f.weight", "lm_head.weight"):
        if name in decl:
            out[name] = (name, cut(decl[name], v))
    return out


def is_stacked(name: str) -> bool:
    """A MoE mixer's stacked expert tensor ([E, out, in]; files hold one tensor per expert)."""
    head, _, last = name.rpartition(".")
    return last in STACKED and head.endswith(".mixer")


# ---------------------------------------------------------------------------------------------- applying
_INDEX: dict[tuple, torch.Tensor] = {}


def index(runs: Runs, device) -> torch.Tensor:
    """The kept runs as one index tensor (built once per runs and device)."""
    key = (runs, str(device))
    if key not in _INDEX:
        with torch.inference_mode(False):  # an index made while generating must serve training too
            _INDEX[key] = torch.cat([torch.arange(a, b, device=device) for a, b in runs])
    return _INDEX[key]


class _Prefix(torch.autograd.Function):
    """w[idx] whose backward builds the full-size gradient writing each element once: g into the prefix,
    zeros into the rest. (Chained slices, w[:a][:, :b], zero-fill one full-size tensor per sliced dim and
    then copy into it: a measurable share of an elastic training step.)"""

    @staticmethod
    def forward(ctx, w, idx):
        ctx.shape, ctx.idx = w.shape, idx
        return w[idx]

    @staticmethod
    def backward(ctx, g):
        gw = g.new_empty(ctx.shape)
        view = gw
        for d, (i, full) in enumerate(zip(ctx.idx, ctx.shape[: len(ctx.idx)], strict=True)):
            if i.stop is not None:  # a cut dim: zero its tail (inside the prefix of the dims before it)
                view.narrow(d, i.stop, full - i.stop).zero_()
                view = view.narrow(d, 0, i.stop)
        view.copy_(g)
        return gw, None


def prefix(w: torch.Tensor, *sizes: int | None) -> torch.Tensor:
    """w[:sizes[0], :sizes[1], ...] (None: that dim uncut). The weight itself when nothing is cut, so the
    full model's autograd graph has no slicing nodes at all."""
    idx = tuple(slice(None) if n is None or n >= full else slice(0, n)
                for n, full in zip(sizes, w.shape[: len(sizes)], strict=True))
    if all(i == slice(None) for i in idx):
        return w
    if w.requires_grad and torch.is_grad_enabled():
        return _Prefix.apply(w, idx)
    return w[idx]


def take(t: torch.Tensor, c: Cut) -> torch.Tensor:
    """t cut to `c`: prefix dims in one slice (a view, or one autograd node), other dims by one gather each.
    t itself when nothing is cut."""
    stops: list[int | None] = []
    gathers = []
    for d, r in enumerate(c):
        if r is not None and len(r) == 1 and r[0][0] == 0:
            stops.append(r[0][1])
        else:
            stops.append(None)
            if r is not None:
                gathers.append((d, r))
    if any(n is not None for n in stops):
        t = prefix(t, *stops)
    for d, r in gathers:
        t = t.index_select(d, index(r, t.device))
    return t


# ---------------------------------------------------------------------------------------------- permuting
def perm(segs: tuple[Seg, ...], perms: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The channel permutation along a dim made of `segs`, given one permutation of units per axis (axes
    without one, and fixed runs, stay in place). None when nothing moves."""
    parts, off, moved = [], 0, False
    for seg in segs:
        p = perms.get(seg.axis) if seg.axis is not None else None
        if p is None:
            parts.append(torch.arange(off, off + seg.size))
        else:
            moved = True
            parts.append(off + (p[:, None] * seg.width + torch.arange(seg.width)[None, :]).reshape(-1))
        off += seg.size
    return torch.cat(parts) if moved else None


# ---------------------------------------------------------------------------------------------- moving states
def embed(t: torch.Tensor, dim: int, segs: tuple[Seg, ...], src: dict, dst: dict) -> torch.Tensor:
    """A tensor laid out for the widths `src` (axis values) re-laid for `dst` along `dim`: the channels both
    keep move to their place, channels only `dst` keeps are zero. Always a new tensor."""
    have = index(dim_runs(segs, src), "cpu").tolist()
    want = index(dim_runs(segs, dst), "cpu").tolist()
    pos = {c: i for i, c in enumerate(have)}
    shape = list(t.shape)
    shape[dim] = len(want)
    out = t.new_zeros(shape)
    to = [j for j, c in enumerate(want) if c in pos]
    if to:
        frm = torch.tensor([pos[want[j]] for j in to], device=t.device)
        out.index_copy_(dim, torch.tensor(to, device=t.device), t.index_select(dim, frm))
    return out
