"""Nemotron-H (transformers `nemotron_h`) <-> nestlm.

Files on disk use the original layout that `save_pretrained` writes and vLLM reads: `backbone.` prefix,
one tensor pair per expert (`experts.{e}.up_proj.weight`). transformers 5's in-memory layout (`model.`
prefix, stacked `experts.up_proj`) is read too.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from nestlm.convert.common import stack_experts
from nestlm.errors import UnsupportedArchitecture
from nestlm.io.safetensors import read_config
from nestlm.model.config import ModelConfig
from nestlm.model.layout import is_stacked

PATTERN_TO_TYPE = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
TYPE_TO_PATTERN = {v: k for k, v in PATTERN_TO_TYPE.items()} | {"mamba": "M", "attention": "*"}

# HF config keys we carry through untouched on export
PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "initializer_range",
               "rescale_prenorm_residual", "residual_in_fp32", "time_step_max", "time_step_floor",
               "num_logits_to_keep", "mamba_ssm_cache_dtype")


def _pattern(hf: dict) -> str:
    if hf.get("layers_block_type"):
        try:
            return "".join(TYPE_TO_PATTERN[t] for t in hf["layers_block_type"])
        except KeyError as e:
            raise UnsupportedArchitecture(f"nemotron_h: unknown layer type {e}") from None
    if hf.get("hybrid_override_pattern"):
        return hf["hybrid_override_pattern"]
    raise UnsupportedArchitecture("nemotron_h config has neither layers_block_type nor hybrid_override_pattern")


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("moe_latent_size"):
        raise UnsupportedArchitecture("nemotron_h with moe_latent_size (latent MoE projections) is not supported")
    act = hf.get("mlp_hidden_act", "relu2")
    if act != "relu2":
        raise UnsupportedArchitecture(f"nemotron_h with mlp_hidden_act={act!r} is not supported (relu2 only)")
    if hf.get("mamba_hidden_act", "silu") != "silu":
        raise UnsupportedArchitecture("nemotron_h with mamba_hidden_act other than silu is not supported")
    g = lambda *names, default=None: next((hf[n] for n in names if hf.get(n) is not None), default)
    pattern = _pattern(hf)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        pattern=pattern,
        norm_eps=g("layer_norm_epsilon", default=1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        family="nemotron_h",
        num_heads=g("num_attention_heads", default=0) if "*" in pattern else 0,
        num_kv_heads=g("num_key_value_heads", "num_attention_heads", default=0) if "*" in pattern else 0,
        head_dim=g("head_dim", default=0) if "*" in pattern else 0,
        rope_theta=None,
        attn_bias=False,  # transformers' NemotronHAttention has no projection bias
        intermediate_size=g("intermediate_size", default=0) if "-" in pattern else 0,
        mlp_act="relu2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        mamba_heads=g("mamba_num_heads", default=0) if "M" in pattern else 0,
        mamba_head_dim=g("mamba_head_dim", default=0) if "M" in pattern else 0,
        mamba_groups=g("n_groups", "mamba_n_groups", default=1),
        ssm_state=g("ssm_state_size", default=0) if "M" in pattern else 0,
        conv_kernel=g("conv_kernel", "mamba_d_conv", default=4),
        conv_bias=bool(g("use_conv_bias", "mamba_conv_bias", default=True)),
        mamba_bias=bool(hf.get("use_bias", False)),
        chunk_size=g("chunk_size", "mamba_chunk_size", default=128),
        dt_min=g("time_step_min", "mamba_dt_min", default=1e-3),
        n_experts=g("n_routed_experts", default=0) if "E" in pattern else 0,
        top_k=g("num_experts_per_tok", default=0) if "E" in pattern else 0,
        moe_intermediate_size=g("moe_intermediate_size", default=0) if "E" in pattern else 0,
        shared_intermediate_size=g("moe_shared_expert_intermediate_size", default=0) if "E" in pattern else 0,
        n_expert_groups=g("n_group", default=1),
        topk_groups=g("topk_group", default=1),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling=float(g("routed_scaling_factor", default=1.0)),
        hf_extra={k: hf[k] for k in PASSTHROUGH if k in hf},
    )


def llama_cpp_problem(pattern: str) -> str | None:
    """Why llama.cpp cannot load a nemotron_h of this block pattern, or None. Its converter and loader build
    every feed-forward block as MoE once the model has experts, so dense MLP '-' and MoE 'E' can't mix."""
    if "-" in pattern and "E" in pattern:
        return (f"pattern {pattern!r} mixes dense MLP ('-') and MoE ('E') blocks: llama.cpp cannot load it "
                "(transformers and vLLM can)")
    return None


def warn_llama_cpp(folder: str | Path) -> None:
    """One warning (`nestlm slice`) when the checkpoint folder is a nemotron_h that llama.cpp cannot load."""
    hf = read_config(folder)
    if hf.get("model_type") == "nemotron_h" and (problem := llama_cpp_problem(hf["hybrid_override_pattern"])):
        warnings.warn(f"{folder}: {problem}", stacklevel=2)


def config_to_hf(cfg: ModelConfig) -> dict:
    if cfg.rope_theta is not None or cfg.qk_norm or cfg.attn_bias:
        raise UnsupportedArchitecture("nemotron_h attention has no RoPE, q/k-norm or bias")
    if cfg.mlp_act != "relu2":
        raise UnsupportedArchitecture("nemotron_h MLPs are relu2")
    if "E" in cfg.pattern and cfg.shared_intermediate_size == 0:
        raise UnsupportedArchitecture("nemotron_h MoE blocks always have a shared expert")
    if "E" in cfg.pattern and cfg.n_experts // cfg.n_expert_groups < 2:
        raise UnsupportedArchitecture(
            f"nemotron_h routing scores each expert group by its top 2 experts: {cfg.n_experts} experts in "
            f"{cfg.n_expert_groups} group(s) can't be loaded by transformers; keep >= 2 experts per group")
    hf = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        # both spellings: transformers 5 reads the list (and writes it), transformers 4's remote code and
        # llama.cpp's converter the string (the converter finds dense '-' MLP blocks only in the string)
        "layers_block_type": [PATTERN_TO_TYPE[c] for c in cfg.pattern],
        "hybrid_override_pattern": cfg.pattern,
        "num_hidden_layers": len(cfg.pattern),
        "tie_word_embeddings": cfg.tie_embeddings,
        "layer_norm_epsilon": cfg.norm_eps,
        "num_attention_heads": cfg.num_heads or 1,
        "num_key_value_heads": cfg.num_kv_heads or 1,
        "head_dim": cfg.head_dim or 1,
        "attention_bias": False,
        "intermediate_size": cfg.intermediate_size or 1,
        "mlp_hidden_act": "relu2",
        "mlp_bias": cfg.mlp_bias,
        "mamba_num_heads": cfg.mamba_heads or 1,
        "mamba_head_dim": cfg.mamba_head_dim or 1,
        "n_groups": cfg.mamba_groups,
        "ssm_state_size": cfg.ssm_state or 1,
        "conv_kernel": cfg.conv_kernel,
        "use_conv_bias": cfg.conv_bias,
        "use_bias": cfg.mamba_bias,
        "chunk_size": cfg.chunk_size,
        "time_step_min": cfg.dt_min,
        "mamba_hidden_act": "silu",
        "dtype": "float32",
    }
    if "E" in cfg.pattern:  # MoE keys only with MoE blocks: llama.cpp takes `num_experts_per_tok` to mean MoE
        hf |= {
            "n_routed_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.top_k,
            "n_shared_experts": 1,  # nestlm's nemotron_h MoE block: always one shared expert
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "moe_shared_expert_intermediate_size": cfg.shared_intermediate_size,
            "n_group": cfg.n_expert_groups,
            "topk_group": cfg.topk_groups,
            "norm_topk_prob": cfg.norm_topk_prob,
            "routed_scaling_factor": cfg.routed_scaling,
        }
    hf.update(cfg.hf_extra)
    return hf


def runs_own_lm_head(ckpt) -> bool:
    """transformers' NemotronHForCausalLM never ties embeddings: it runs the file's own lm_head. True when
    the file (a SafetensorsDir) has one that is not the embedding matrix itself."""
    if "lm_head.weight" not in ckpt:
        return False
    emb = "backbone.embeddings.weight" if "backbone.embeddings.weight" in ckpt else "model.embeddings.weight"
    return not ckpt.same("lm_head.weight", emb)


def state_from_hf(ckpt, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """ckpt: a SafetensorsDir-like object (keys(), get(k)). Returns our Decoder's state dict."""
    keys = [k for k in ckpt.keys() if not k.startswith("mtp.")]
    prefix = "backbone." if any(k.startswith("backbone.") for k in keys) else "model."
    sd: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, torch.Tensor]] = {}  # our stacked name -> {expert: tensor}
    for k in keys:
        if k == "lm_head.weight":
            if not cfg.tie_embeddings:
                sd[k] = ckpt.get(k)
            continue
        if not k.startswith(prefix):
            raise UnsupportedArchitecture(f"nemotron_h: unexpected tensor {k!r}")
        name = k[len(prefix):]
        if m := re.fullmatch(r"layers\.(\d+)\.mixer\.experts\.(\d+)\.(up_proj|down_proj)\.weight", name):
            per_expert.setdefault(f"layers.{m[1]}.mixer.{m[3]}", {})[int(m[2])] = ckpt.get(k)
            continue
        name = name.replace("mixer.gate.e_score_correction_bias", "mixer.e_score_correction_bias")
        name = name.replace("mixer.experts.", "mixer.").replace("mixer.shared_experts.", "mixer.shared.")
        sd[name] = ckpt.get(k)
    sd.update(stack_experts(per_expert, cfg.n_experts, "nemotron_h"))
    return sd


def hf_name(name: str, cfg: ModelConfig, expert: int | None = None) -> str:
    """Our state-dict name -> the file's (backbone.*; a stacked expert tensor: one name per `expert`)."""
    if name == "lm_head.weight":
        return name
    if expert is not None:  # layers.{i}.mixer.{up_proj|down_proj}: ReLU² experts
        head, _, proj = name.rpartition(".")
        return f"backbone.{head}.experts.{expert}.{proj}.weight"
    name = name.replace("mixer.e_score_correction_bias", "mixer.gate.e_score_correction_bias")
    return "backbone." + name.replace("mixer.shared.", "mixer.shared_experts.")


WRITES_LM_HEAD = True  # transformers' Nemotron-H never ties: a file always carries its own lm_head


def state_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the on-disk nemotron_h layout (backbone., one tensor pair per expert)."""
    out: dict[str, torch.Tensor] = {}
    if "lm_head.weight" not in sd:  # transformers' Nemotron-H never ties: it needs its own lm_head
        out["lm_head.weight"] = sd["embeddings.weight"].clone()
    for name, t in sd.items():
        if is_stacked(name):
            out |= {hf_name(name, cfg, e): t[e] for e in range(t.shape[0])}
        else:
            out[hf_name(name, cfg)] = t
    return out
