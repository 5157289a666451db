"""SubArch: the widths of one nested submodel (a handful of integers, since after sorting every elastic axis
is a prefix), and the standalone ModelConfig it cuts out of its parent.

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

`None` on any field means "the full width". Widths are global (the same for every block of a kind). Which
rows and columns each width keeps in every tensor: nestlm.model.layout. What a submodel costs: nestlm.arch.
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
