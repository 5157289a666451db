"""ModelConfig: the full (parent) architecture of a hybrid decoder, one serializable dataclass.

A model is a stack of pre-norm residual blocks. The block kinds are read from `pattern`, one character
per block, as Nemotron-H writes them:

    M  Mamba2 mixer          *  attention (GQA; RoPE and q/k-norm optional)
    -  MLP (ReLU² or SwiGLU)  E  mixture of experts: Nemotron-H's (sigmoid router + correction bias, ReLU²
                               experts, shared expert) or Qwen3-MoE / Mixtral's (softmax router, SwiGLU experts)

A Llama/Qwen3 layer is two blocks, "*-" (attention then MLP, each with its own pre-norm); a Qwen3-MoE /
Mixtral layer is "*E" (Qwen3-MoE's dense layers: "*-").
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from nestlm.errors import ConfigError

BLOCK_KINDS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
# the Hugging Face families a model exports to, and the module of nestlm.convert that converts each
FAMILIES = {"nemotron_h": "nemotron_h", "llama": "llama", "qwen3": "llama", "qwen3_moe": "moe", "mixtral": "moe"}
MOE_ROUTERS = ("sigmoid", "softmax")
ACTS = ("relu2", "swiglu")
# a field's annotation -> the Python types its value may have (a bool is never a number here)
FIELD_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,)}
TYPE_WORDS = {(int,): "an integer", (int, float): "a number", (bool,): "true or false", (str,): "a string",
              (dict,): "a mapping"}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    pattern: str  # one char per block, see BLOCK_KINDS
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    family: str = "nemotron_h"  # the Hugging Face family this model exports to: one of FAMILIES
    # attention (*)
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    rope_theta: float | None = None  # None: no positional encoding (Nemotron-H attention has none)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    attn_bias: bool = False  # bias on q/k/v/o projections
    # MLP (-)
    intermediate_size: int = 0
    mlp_act: str = "relu2"  # relu2: down(relu(up x)^2) | swiglu: down(silu(gate x) * up x)
    mlp_bias: bool = False
    # Mamba2 (M)
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    mamba_groups: int = 1
    ssm_state: int = 0
    conv_kernel: int = 4
    conv_bias: bool = True
    mamba_bias: bool = False  # bias on in_proj / out_proj
    chunk_size: int = 128
    dt_min: float = 0.0  # softplus(dt + dt_bias) is clamped below at dt_min (prefill and decode alike)
    # mixture of experts (E)
    n_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0  # 0: no shared expert
    n_expert_groups: int = 1
    topk_groups: int = 1
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1 (Mixtral: always)
    routed_scaling: float = 1.0
    # router: "sigmoid" scores + correction bias (Nemotron-H) | "softmax" over the logits (Qwen3-MoE, Mixtral)
    moe_router: str = "sigmoid"
    moe_act: str = "relu2"  # routed experts: relu2 (up, down) | swiglu (gate, up, down)
    # keys copied verbatim into the exported HF config (token ids, max positions, ...)
    hf_extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def n_blocks(self) -> int:
        return len(self.pattern)

    @property
    def mamba_inner(self) -> int:  # H * P
        return self.mamba_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:  # channels through conv1d: [x | B | C]
        return self.mamba_inner + 2 * self.mamba_groups * self.ssm_state

    def kinds(self) -> list[str]:
        return [BLOCK_KINDS[c] for c in self.pattern]

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        for f in dataclasses.fields(self):  # types first: "hidden_size": "abc" in a config.json is one line
            v = getattr(self, f.name)
            ok = FIELD_TYPES[str(f.type).removesuffix(" | None")]
            need(isinstance(v, ok) and not (isinstance(v, bool) and bool not in ok) or
                 (v is None and str(f.type).endswith("| None")),
                 f"{f.name} must be {TYPE_WORDS[ok]}, got {v!r}")
        need(self.vocab_size > 0 and self.hidden_size > 0, "vocab_size and hidden_size must be positive")
        need(len(self.pattern) > 0, "pattern is empty: give one character per block from 'M*-E'")
        bad = sorted(set(self.pattern) - set(BLOCK_KINDS))
        need(not bad, f"pattern {self.pattern!r} has unknown block characters {bad}; use M, *, -, E")
        need(self.family in FAMILIES, f"unknown family {self.family!r}; one of {tuple(FAMILIES)}")
        if "*" in self.pattern:
            need(self.num_heads > 0 and self.num_kv_heads > 0 and self.head_dim > 0,
                 "attention blocks need num_heads, num_kv_heads and head_dim > 0")
            need(self.num_heads % self.num_kv_heads == 0,
                 f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}) for GQA")
            need(self.rope_theta is None or self.head_dim % 2 == 0, "RoPE needs an even head_dim")
        if "-" in self.pattern:
            need(self.intermediate_size > 0, "MLP blocks need intermediate_size > 0")
            need(self.mlp_act in ACTS, f"mlp_act must be relu2 or swiglu, got {self.mlp_act!r}")
        if "M" in self.pattern:
            need(self.mamba_heads > 0 and self.mamba_head_dim > 0 and self.ssm_state > 0,
                 "Mamba blocks need mamba_heads, mamba_head_dim and ssm_state > 0")
            need(self.mamba_groups > 0 and self.mamba_heads % self.mamba_groups == 0,
                 f"mamba_heads ({self.mamba_heads}) must be a multiple of mamba_groups ({self.mamba_groups})")
            need(self.conv_kernel >= 1 and self.chunk_size >= 1, "conv_kernel and chunk_size must be >= 1")
        if "E" in self.pattern:
            need(self.n_experts > 0 and self.moe_intermediate_size > 0, "MoE blocks need n_experts and "
                 "moe_intermediate_size > 0")
            need(0 < self.top_k <= self.n_experts, f"top_k ({self.top_k}) must be in 1..n_experts ({self.n_experts})")
            need(self.n_experts % self.n_expert_groups == 0,
                 f"n_experts ({self.n_experts}) must be a multiple of n_expert_groups ({self.n_expert_groups})")
            need(0 < self.topk_groups <= self.n_expert_groups, "topk_groups must be in 1..n_expert_groups")
            need(self.moe_router in MOE_ROUTERS, f"moe_router must be sigmoid or softmax, got {self.moe_router!r}")
            need(self.moe_act in ACTS, f"moe_act must be relu2 or swiglu, got {self.moe_act!r}")
            need(self.moe_router == "sigmoid" or self.n_expert_groups == 1,
                 "group-limited routing (n_expert_groups > 1) is implemented for the sigmoid router only")

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig keys {unknown}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
