"""SubArch: the widths of one nested submodel, and what it costs (parameters, active parameters, memory).

After importance sorting every elastic axis is a prefix, so a submodel is just a handful of integers:

    hidden                 embedding channels kept (all norms, projections' input/output sides)
    attn_kv_heads          KV groups kept (first g)
    attn_heads_per_group   query heads kept inside each KV group (first h of each group)
    mamba_heads_per_group  Mamba heads kept inside each Mamba group (first m of each group)
    ffn                    MLP ("-") intermediate channels
    moe_ffn                routed experts' intermediate channels
    shared_ffn             shared expert's intermediate channels
    experts                routed experts kept (router rows and correction bias sliced with them; a softmax
                           router needs at least top_k of them)
    layers                 indices of the blocks kept (depth); None keeps all

`None` on any field means "the full width". Widths are global (the same for every block of a kind).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nestlm.errors import ConfigError
from nestlm.model.config import ModelConfig


@dataclass(frozen=True)
class SubArch:
    hidden: int | None = None
    attn_kv_heads: int | None = None
    attn_heads_per_group: int | None = None
    mamba_heads_per_group: int | None = None
    ffn: int | None = None
    moe_ffn: int | None = None
    shared_ffn: int | None = None
    experts: int | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.layers is not None and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    # ---------------------------------------------------------------- resolution / validation
    def resolve(self, cfg: ModelConfig) -> SubArch:
        """Fill every None with the full width and check the widths fit `cfg`. Returns a new SubArch."""
        full = SubArch.full(cfg)
        vals = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out = {k: (getattr(full, k) if v is None else v) for k, v in vals.items()}
        sub = SubArch(**out)
        sub._check(cfg, full)
        return sub

    @staticmethod
    def full(cfg: ModelConfig) -> SubArch:
        return SubArch(
            hidden=cfg.hidden_size,
            attn_kv_heads=cfg.num_kv_heads,
            attn_heads_per_group=(cfg.num_heads // cfg.num_kv_heads) if cfg.num_kv_heads else 0,
            mamba_heads_per_group=(cfg.mamba_heads // cfg.mamba_groups) if cfg.mamba_groups else 0,
            ffn=cfg.intermediate_size,
            moe_ffn=cfg.moe_intermediate_size,
            shared_ffn=cfg.shared_intermediate_size,
            experts=cfg.n_experts,
            layers=tuple(range(cfg.n_blocks)),
        )

    def _check(self, cfg: ModelConfig, full: SubArch) -> None:
        for name in ("hidden", "attn_kv_heads", "attn_heads_per_group", "mamba_heads_per_group", "ffn",
                     "moe_ffn", "shared_ffn", "experts"):
            v, hi = getattr(self, name), getattr(full, name)
            lo = 0 if hi == 0 else 1
            if not (lo <= v <= hi):
                raise ConfigError(f"SubArch.{name}={v} is outside 1..{hi} for this model")
        if cfg.shared_intermediate_size == 0 and self.shared_ffn:
            raise ConfigError("SubArch.shared_ffn is set but the model has no shared expert")
        if "E" in cfg.pattern and self.experts < cfg.n_experts and cfg.n_expert_groups > 1:
            raise ConfigError("slicing experts needs n_expert_groups == 1 (group-limited routing would break)")
        if "E" in cfg.pattern and cfg.moe_router == "softmax" and self.experts < cfg.top_k:
            raise ConfigError(f"SubArch.experts={self.experts} keeps fewer experts than top_k={cfg.top_k} "
                              f"(num_experts_per_tok): keep at least {cfg.top_k}")
        layers = self.layers
        if len(layers) == 0:
            raise ConfigError("SubArch.layers keeps no block")
        if list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= cfg.n_blocks:
            raise ConfigError(f"SubArch.layers must be increasing block indices in 0..{cfg.n_blocks - 1}")

    def is_full(self, cfg: ModelConfig) -> bool:
        return self.resolve(cfg) == SubArch.full(cfg)

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["layers"] is not None:
            d["layers"] = list(d["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SubArch:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown SubArch keys {unknown}")
        return cls(**d)


def sliced_config(cfg: ModelConfig, sub: SubArch | None) -> ModelConfig:
    """The ModelConfig of the standalone model that `sub` cuts out of `cfg`."""
    s = (sub or SubArch()).resolve(cfg)
    n_exp = s.experts if "E" in cfg.pattern else cfg.n_experts
    return dataclasses.replace(
        cfg,
        hidden_size=s.hidden,
        pattern="".join(cfg.pattern[i] for i in s.layers),
        num_heads=s.attn_kv_heads * s.attn_heads_per_group,
        num_kv_heads=s.attn_kv_heads,
        intermediate_size=s.ffn,
        mamba_heads=s.mamba_heads_per_group * cfg.mamba_groups,
        moe_intermediate_size=s.moe_ffn,
        shared_intermediate_size=s.shared_ffn,
        n_experts=n_exp,
        top_k=min(cfg.top_k, n_exp),
        hf_extra=dict(cfg.hf_extra),
    )


# -------------------------------------------------------------------- counting
def _block_params(c: ModelConfig, kind: str, active: bool) -> int:
    """Parameters of one block of `kind` in the (already sliced) config `c`, its pre-norm included."""
    d = c.hidden_size
    n = d  # pre-norm weight
    if kind == "*":
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        n += d * q + 2 * d * kv + q * d
        if c.attn_bias:
            n += q + 2 * kv + d
        if c.qk_norm:
            n += 2 * c.head_dim
    elif kind == "-":
        mats = 3 if c.mlp_act == "swiglu" else 2
        n += mats * d * c.intermediate_size
        if c.mlp_bias:
            n += (mats - 1) * c.intermediate_size + d
    elif kind == "M":
        h, g, s = c.mamba_heads, c.mamba_groups, c.ssm_state
        inner = c.mamba_inner
        proj = 2 * inner + 2 * g * s + h
        n += d * proj + (proj if c.mamba_bias else 0)  # in_proj
        n += c.mamba_conv_dim * c.conv_kernel + (c.mamba_conv_dim if c.conv_bias else 0)  # conv1d
        n += 3 * h + inner  # dt_bias, A_log, D, gated norm
        n += inner * d + (d if c.mamba_bias else 0)  # out_proj
    elif kind == "E":
        n_used = c.top_k if active else c.n_experts
        n += c.n_experts * d  # router rows
        if c.moe_router == "sigmoid":
            n += c.n_experts  # correction bias
        n += n_used * (3 if c.moe_act == "swiglu" else 2) * d * c.moe_intermediate_size
        if c.shared_intermediate_size:
            n += 2 * d * c.shared_intermediate_size
            if c.mlp_bias:
                n += c.shared_intermediate_size + d
    return n


def count_params(cfg: ModelConfig, sub: SubArch | None = None, active: bool = False) -> int:
    """Parameters of the submodel (all of them, or those one token touches when `active`), embeddings included."""
    c = sliced_config(cfg, sub)
    n = c.vocab_size * c.hidden_size  # embedding
    n += sum(_block_params(c, k, active) for k in c.pattern)
    n += c.hidden_size  # final norm
    if not c.tie_embeddings:
        n += c.vocab_size * c.hidden_size
    return n


def count_active_params(cfg: ModelConfig, sub: SubArch | None = None) -> int:
    return count_params(cfg, sub, active=True)


def count_memory(cfg: ModelConfig, sub: SubArch | None = None, *, seq_len: int = 4096, batch: int = 1,
                 weight_bytes: float = 2.0, kv_bytes: float = 2.0, state_bytes: float = 4.0) -> dict:
    """Bytes needed to run the submodel: weights + attention KV cache + Mamba conv and SSM state.

    Defaults: bf16 weights and KV cache, fp32 SSM state (as Nemotron-H keeps it).
    """
    c = sliced_config(cfg, sub)
    weights = count_params(cfg, sub) * weight_bytes
    n_attn, n_mamba = c.pattern.count("*"), c.pattern.count("M")
    kv = n_attn * 2 * batch * seq_len * c.num_kv_heads * c.head_dim * kv_bytes
    ssm = n_mamba * batch * c.mamba_heads * c.mamba_head_dim * c.ssm_state * state_bytes
    conv = n_mamba * batch * c.mamba_conv_dim * max(c.conv_kernel - 1, 0) * kv_bytes
    total = weights + kv + ssm + conv
    return {"weights": int(weights), "kv_cache": int(kv), "ssm_state": int(ssm + conv), "total": int(total)}


# -------------------------------------------------------------------- choosing a SubArch for a budget
WIDTH_AXES = ("hidden", "attn_heads_per_group", "mamba_heads_per_group", "ffn", "moe_ffn", "shared_ffn", "experts")


def _round_width(v: float, full: int, align: int, minimum: int = 1) -> int:
    if full <= align:
        return max(minimum, min(full, round(v)))
    return max(max(minimum, align), min(full, int(round(v / align)) * align))


def width_subarch(cfg: ModelConfig, frac: float, axes: tuple[str, ...] = WIDTH_AXES, align: int = 8,
                  metric: str = "params") -> SubArch:
    """Shrink the chosen width axes by one common factor so the submodel's parameter count (or active
    parameters, metric="active") is as close as possible to `frac` of the full model's, from below.

    Channel axes are rounded to multiples of `align`; head/expert counts stay >= 1 (experts >= top_k)."""
    if not 0 < frac <= 1:
        raise ConfigError(f"budget fraction must be in (0, 1], got {frac}")
    full = SubArch.full(cfg)
    count = count_active_params if metric == "active" else count_params
    target = frac * count(cfg)

    def at(alpha: float) -> SubArch:
        kw = {}
        for ax in axes:
            f = getattr(full, ax)
            if not f:
                continue
            if ax in ("hidden", "ffn", "moe_ffn", "shared_ffn"):
                kw[ax] = _round_width(alpha * f, f, align)
            elif ax == "experts":
                kw[ax] = max(min(cfg.top_k, f), min(f, round(alpha * f)))
            else:
                kw[ax] = max(1, min(f, round(alpha * f)))
        return SubArch(**kw)

    lo, hi = 0.0, 1.0
    best = at(1.0) if count(cfg, at(1.0)) <= target else None
    for _ in range(40):
        mid = (lo + hi) / 2
        s = at(mid)
        if count(cfg, s) <= target:
            lo, best = mid, s
        else:
            hi = mid
    return best if best is not None else at(0.0)


# families whose HF layer is two of our blocks (attention, then MLP or MoE): depth drops both
PAIRED_FAMILIES = ("llama", "qwen3", "qwen3_moe", "mixtral")


def depth_units(cfg: ModelConfig) -> list[list[int]]:
    """Blocks that are dropped together: single blocks for hybrids, (attention, MLP/MoE) pairs for
    Llama/Qwen3/Qwen3-MoE/Mixtral."""
    if cfg.family in PAIRED_FAMILIES:
        return [[2 * j, 2 * j + 1] for j in range(cfg.n_blocks // 2)]
    return [[i] for i in range(cfg.n_blocks)]


def unit_order(cfg: ModelConfig, layer_scores) -> list[int]:
    """Depth unit indices (see `depth_units`), least important first: the order depth pruning drops them.
    `layer_scores`: per-block importance (`importance(...)["layers"]`), higher = keep; a unit scores the sum
    of its blocks. Ties keep the unit order (a stable sort)."""
    units = depth_units(cfg)
    if len(layer_scores) != cfg.n_blocks:
        raise ConfigError(f"layer_scores has {len(layer_scores)} entries for {cfg.n_blocks} blocks")
    scores = [float(sum(layer_scores[i] for i in u)) for u in units]
    return sorted(range(len(units)), key=lambda j: scores[j])


def depth_subarch(cfg: ModelConfig, layer_scores, frac: float, metric: str = "params") -> SubArch:
    """Drop the least important depth units (blocks; paired families: attention+MLP pairs) until the parameter
    count is at most `frac` of the full model's. `layer_scores`: per-block importance, higher = keep."""
    if not 0 < frac <= 1:
        raise ConfigError(f"budget fraction must be in (0, 1], got {frac}")
    count = count_active_params if metric == "active" else count_params
    target = frac * count(cfg)
    units = depth_units(cfg)
    kept = set(range(cfg.n_blocks))
    for ui in unit_order(cfg, layer_scores):
        if count(cfg, SubArch(layers=tuple(sorted(kept)))) <= target:
            break
        if len(kept) <= len(units[ui]):
            break
        kept -= set(units[ui])
    return SubArch(layers=tuple(sorted(kept)))
