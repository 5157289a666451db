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
    packed       nestlm.slicing.packed: nestlm.slicing.plan's runs, halved for NVFP4 nibbles, / 16 for block scales
    sort         nestlm.elastic.sort: one permutation per axis, expanded along every segment that carries it (`perm`)
    transplant   nestlm.inference.two_phase: cache states are declared too (`cache_tensors`), moved between widths (`embed`)

The axes themselves are declared here too (AXES): each one's layout name, SubArch field (= router axis and
ElasticConfig choices key), importance score key, block kinds and unit. SubArch.full, the router's axes and
cost tables, ElasticConfig's choices, width search, importance and sort read them from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


Dims = dict[int, tuple[Seg, ...]]  # dim -> its segments, every dim of the tensor (Seg(None, n): n kept whole)

STACKED = ("up_proj", "gate_proj", "down_proj")  # the MoE mixer's stacked expert tensors ([E, ...], no .weight)


# ---------------------------------------------------------------------------------------------- the axes
@dataclass(frozen=True)
class Axis:
    """One elastic axis, named once for every part of nestlm: `name` is the layout's (Seg.axis), `field` the
    SubArch width that sets it (also the router axis and the ElasticConfig `choices` key), `score` the key of
    its importance scores ('hidden', or blocks.{i}.<score>: nestlm.elastic.importance / sort). `kinds`: the
    block kinds whose tensors carry it ("" = embeddings, final norm and head); `unit`: "channel" (rounded to
    a multiple of `align`), "head", "group" or "expert" (at least top_k); `within`: the axis whose units
    group this one (query heads are kept per KV group); `routed`: a router / ElasticConfig axis; `full`: the
    full width of a ModelConfig."""

    name: str
    field: str
    score: str
    kinds: tuple[str, ...]
    unit: str
    full: Callable[[ModelConfig], int]
    within: str | None = None
    routed: bool = True


def _per_group(n: int, groups: int) -> int:
    return n // groups if groups else 0


# in SubArch's field order
AXES = (
    Axis("hidden", "hidden", "hidden", ("", "*", "-", "M", "E"), "channel", lambda c: c.hidden_size),
    Axis("kv", "attn_kv_heads", "kv", ("*",), "group", lambda c: c.num_kv_heads, routed=False),
    Axis("q_heads", "attn_heads_per_group", "heads", ("*",), "head",
         lambda c: _per_group(c.num_heads, c.num_kv_heads), within="kv"),
    Axis("mamba", "mamba_heads_per_group", "mamba_heads", ("M",), "head",
         lambda c: _per_group(c.mamba_heads, c.mamba_groups)),
    Axis("ffn", "ffn", "ffn", ("-",), "channel", lambda c: c.intermediate_size),
    Axis("moe_ffn", "moe_ffn", "expert_ffn", ("E",), "channel", lambda c: c.moe_intermediate_size),
    Axis("shared_ffn", "shared_ffn", "shared_ffn", ("E",), "channel", lambda c: c.shared_intermediate_size),
    Axis("experts", "experts", "experts", ("E",), "expert", lambda c: c.n_experts),
)
AXIS = {a.name: a for a in AXES}  # by layout name
FIELD_AXIS = {a.field: a for a in AXES}  # by SubArch field (router axis, choices key)
UNIT_ORDER = ("channel", "head", "expert", "group")
# the router's axes, in its (and every elastic checkpoint's) order: channels, then heads, then experts
ROUTED = tuple(sorted((a for a in AXES if a.routed), key=lambda a: UNIT_ORDER.index(a.unit)))


def kind_axes(kind: str) -> tuple[str, ...]:
    """The routed SubArch fields one block of `kind` ("" = embeddings, final norm, head) depends on: hidden,
    then the block's counts, then its channels."""
    own = [a for a in AXES if a.routed and kind in a.kinds]
    return tuple(a.field for a in sorted(own, key=lambda a: (a.name != "hidden", a.unit == "channel")))


def score_key(block: int | None, axis: str) -> str:
    """The importance-score key of the layout axis `axis` ('hidden'; a block's: 'blocks.{i}.<score>')."""
    return AXIS[axis].score if block is None else f"blocks.{block}.{AXIS[axis].score}"


def axis_values(s) -> dict:
    """{axis: kept units} of a resolved SubArch (q_heads: (KV groups kept, heads kept per group))."""
    return {a.name: (getattr(s, AXIS[a.within].field), getattr(s, a.field)) if a.within else getattr(s, a.field)
            for a in AXES}


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
        norm = {0: (Seg(None, cfg.head_dim),)}  # one head's channels: kept whole
        out |= {"q_norm.weight": norm, "k_norm.weight": norm}
    return out


def mamba_tensors(cfg: ModelConfig) -> dict[str, Dims]:
    """in_proj rows [z | x | B C | dt], conv1d channels [x | B C]: z, x, dt, A, D, dt_bias, the gated norm
    and out_proj follow the heads (first m of each group); B and C belong to the groups and stay whole."""
    hd, p, g = cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_groups
    heads = lambda width: Seg("mamba", hd, width, g)
    bc = Seg(None, 2 * g * cfg.ssm_state)
    h = (Seg("hidden", cfg.hidden_size),)
    out = _linear((heads(p), heads(p), bc, heads(1)), h, cfg.mamba_bias, "in_proj")
    out["conv1d.weight"] = {0: (heads(p), bc), 1: (Seg(None, 1),), 2: (Seg(None, cfg.conv_kernel),)}  # depthwise
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


def layer_tensors(cfg: ModelConfig, kind: str) -> dict[str, Dims]:
    """Every tensor of one block of `kind` (names below `layers.{i}.`): its pre-norm and its mixer's."""
    return {"norm.weight": {0: (Seg("hidden", cfg.hidden_size),)}} | \
        {f"mixer.{n}": d for n, d in block_tensors(cfg, kind).items()}


def outer_tensors(cfg: ModelConfig) -> dict[str, Dims]:
    """The tensors outside the blocks: embeddings, final norm, and the head unless tied."""
    h, vocab = (Seg("hidden", cfg.hidden_size),), (Seg(None, cfg.vocab_size),)
    out: dict[str, Dims] = {"embeddings.weight": {0: vocab, 1: h}, "norm_f.weight": {0: h}}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = {0: vocab, 1: h}
    return out


def model_tensors(cfg: ModelConfig) -> dict[str, Dims]:
    """Every tensor of the Decoder's state dict, declared (blocks under `layers.{i}.`), in its order."""
    outer = outer_tensors(cfg)
    out = {"embeddings.weight": outer.pop("embeddings.weight")}
    for i, kind in enumerate(cfg.pattern):
        out |= {f"layers.{i}.{n}": d for n, d in layer_tensors(cfg, kind).items()}
    return out | outer


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


def _groups_keep(seg: Seg, value) -> tuple[int, int]:
    """(groups kept, units kept in each) of `seg` at `value`: the first `value` units of every group
    (q_heads: value = (KV groups kept, heads per group)); a fixed run: all of it."""
    if seg.axis is None:
        return 1, seg.units
    return value if isinstance(value, tuple) else (seg.groups, value)


def kept_units(seg: Seg, value) -> Runs:
    """The units of `seg` kept at `value` (first `value` of each group; q_heads: (groups kept, per group))."""
    groups, keep = _groups_keep(seg, value)
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


def kept_shape(dims: Dims, values: dict) -> tuple[int, ...]:
    """The shape a tensor declared by `dims` has at the axis values `values`: the kept channels of each dim
    (the length of its dim_runs)."""
    return tuple(sum(math.prod(_groups_keep(seg, values.get(seg.axis))) * seg.width for seg in dims[d])
                 for d in range(len(dims)))


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
    return last in STACKED and (head == "mixer" or head.endswith(".mixer"))


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
