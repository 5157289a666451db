"""SubArch: the widths of one nested submodel, and what it costs (parameters, active parameters, memory).

After importance sorting every elastic axis is a prefix, so a submodel is just a handful of integers:

    hidden                 embedding channels kept (all norms, projections' input/output sides)
    attn_kv_heads          KV groups kept (first g)
    attn_heads_per_group   query heads kept inside each KV group (first h of each group)
    mamba_heads_per_group  Mamba heads kept inside each Mamba group (first m of each group)
    ffn                    MLP ("-") intermediate channels
    moe_ffn                routed experts' intermediate channels
    shared_ffn             shared expert's intermediate channels
    experts                routed experts kept (router rows and correction bias sliced with them)
    layers                 indices of the blocks kept (depth); None keeps all

`None` on any field means "the full width". Widths are global (the same for every block of a kind).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nestlm.model.config import ConfigError, ModelConfig


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
        n += c.n_experts * d + c.n_experts  # router rows + correction bias
        n += n_used * 2 * d * c.moe_intermediate_size
        if c.shared_intermediate_size:
            n += 2 * d * c.shared_intermediate_size
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
