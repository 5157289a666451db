"""Llama and Qwen3 (dense) <-> nestlm. HF decoder layer j becomes our blocks 2j ("*", input_layernorm) and
2j+1 ("-", post_attention_layernorm)."""

from __future__ import annotations

import re

import torch

from nestlm.errors import UnsupportedArchitecture
from nestlm.model.config import ModelConfig

PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "initializer_range")


def _rope_theta(hf: dict) -> float:
    rp = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rtype = rp.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rtype not in ("default", None):
        raise UnsupportedArchitecture(f"{hf.get('model_type')}: rope_type {rtype!r} is not supported (default only)")
    theta = rp.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise UnsupportedArchitecture(f"{hf.get('model_type')}: config has no rope_theta")
    return float(theta)


def config_from_hf(hf: dict) -> ModelConfig:
    family = hf["model_type"]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitecture(f"{family}: hidden_act {act!r} is not supported (SwiGLU/silu only)")
    if hf.get("use_sliding_window") or (family == "llama" and hf.get("sliding_window")):
        raise UnsupportedArchitecture(f"{family}: sliding-window attention is not supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        pattern="*-" * hf["num_hidden_layers"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        family=family,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rope_theta=_rope_theta(hf),
        qk_norm=family == "qwen3",
        attn_bias=bool(hf.get("attention_bias", False)),
        intermediate_size=hf["intermediate_size"],
        mlp_act="swiglu",
        mlp_bias=bool(hf.get("mlp_bias", False)) if family == "llama" else False,
        hf_extra={k: hf[k] for k in PASSTHROUGH if k in hf},
    )


def decoder_hf_config(cfg: ModelConfig, arch: str, n_layers: int) -> dict:
    """The config.json entries every RoPE + GQA + SwiGLU decoder family shares (Llama, Qwen3 and their MoE
    relatives): architecture, sizes, attention, norm, RoPE, tying, dtype."""
    return {
        "architectures": [arch],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": n_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # what transformers 4 reads (it ignores rope_parameters: 10000 silently)
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": "float32",
    }


def config_to_hf(cfg: ModelConfig) -> dict:
    n = len(cfg.pattern) // 2
    if cfg.pattern != "*-" * n:
        raise UnsupportedArchitecture(f"{cfg.family} needs alternating attention/MLP blocks ('*-' * layers); "
                                      f"got pattern {cfg.pattern!r} (drop whole layers, not single blocks)")
    if cfg.rope_theta is None or cfg.mlp_act != "swiglu":
        raise UnsupportedArchitecture(f"{cfg.family} needs RoPE and SwiGLU")
    if cfg.qk_norm != (cfg.family == "qwen3"):
        raise UnsupportedArchitecture("q/k-norm is exported as qwen3 only")
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.family]
    hf = decoder_hf_config(cfg, arch, n)
    hf.update(intermediate_size=cfg.intermediate_size, attention_bias=cfg.attn_bias)
    if cfg.family == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    hf.update(cfg.hf_extra)
    return hf


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


def state_from_hf(ckpt, cfg: ModelConfig, keys=None) -> dict[str, torch.Tensor]:
    """ckpt: a SafetensorsDir-like object (keys(), get(k)); keys: only these of its tensors (default: all)."""
    sd: dict[str, torch.Tensor] = {}
    for k in ckpt.keys() if keys is None else keys:
        if k == "lm_head.weight":
            if not cfg.tie_embeddings:
                sd[k] = ckpt.get(k)
            continue
        if k == "model.embed_tokens.weight":
            sd["embeddings.weight"] = ckpt.get(k)
        elif k == "model.norm.weight":
            sd["norm_f.weight"] = ckpt.get(k)
        elif m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", k):
            j, rest = int(m[1]), m[2]
            if rest == "input_layernorm.weight":
                sd[f"layers.{2 * j}.norm.weight"] = ckpt.get(k)
            elif rest == "post_attention_layernorm.weight":
                sd[f"layers.{2 * j + 1}.norm.weight"] = ckpt.get(k)
            elif rest.startswith("self_attn."):
                sd[f"layers.{2 * j}.mixer.{rest[len('self_attn.'):]}"] = ckpt.get(k)
            elif rest.startswith("mlp."):
                sd[f"layers.{2 * j + 1}.mixer.{rest[len('mlp.'):]}"] = ckpt.get(k)
            elif "rotary_emb" in rest:
                continue
            else:
                raise UnsupportedArchitecture(f"{cfg.family}: unexpected tensor {k!r}")
        else:
            raise UnsupportedArchitecture(f"{cfg.family}: unexpected tensor {k!r}")
    return sd


def hf_name(name: str, cfg: ModelConfig, expert: int | None = None) -> str:
    """Our state-dict name -> the file's: our block i is half of HF layer i // 2 (attention, then MLP)."""
    if name == "embeddings.weight":
        return "model.embed_tokens.weight"
    if name == "norm_f.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return name
    if m := re.fullmatch(r"layers\.(\d+)\.(norm\.weight|mixer\.(.+))", name):
        i = int(m[1])
        j, is_attn = i // 2, i % 2 == 0
        if m[2] == "norm.weight":
            return f"model.layers.{j}.{'input_layernorm' if is_attn else 'post_attention_layernorm'}.weight"
        return f"model.layers.{j}.{'self_attn' if is_attn else 'mlp'}.{m[3]}"
    raise KeyError(name)


def state_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return {hf_name(name, cfg): t for name, t in sd.items()}
