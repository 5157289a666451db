"""Qwen3-MoE (`qwen3_moe`) and Mixtral (`mixtral`) <-> nestlm.

HF decoder layer j becomes our blocks 2j ("*", input_layernorm) and 2j+1 ("E", post_attention_layernorm);
Qwen3-MoE's dense layers (`mlp_only_layers`, `decoder_sparse_step`) become "-" blocks. Both families route
with a softmax over the router logits and run SwiGLU experts; Qwen3-MoE adds q/k-norm.

Files on disk hold one tensor per expert and projection, as `save_pretrained` writes them and
`from_pretrained` reads them (transformers fuses them in memory, through its conversion mapping):

    qwen3_moe  model.layers.{j}.mlp.gate.weight               [E, D]   router
               model.layers.{j}.mlp.experts.{e}.gate_proj.weight  [F, D] (up_proj the same, down_proj [D, F])
    mixtral    model.layers.{j}.block_sparse_moe.gate.weight
               model.layers.{j}.block_sparse_moe.experts.{e}.w1 / w3 / w2.weight   (gate / up / down)

transformers' in-memory layout (`mlp.experts.gate_up_proj` [E, 2F, D] = [gate | up], `mlp.experts.down_proj`
[E, D, F]) is read too. We write the per-expert layout.
"""

from __future__ import annotations

import re

import torch

from nestlm.convert import llama
from nestlm.convert.common import stack_experts
from nestlm.convert.llama import _rope_theta
from nestlm.errors import UnsupportedArchitecture
from nestlm.model.config import ModelConfig
from nestlm.model.layout import is_stacked

PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "initializer_range",
               "router_aux_loss_coef", "output_router_logits", "router_jitter_noise", "sliding_window",
               "use_sliding_window")
ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
MOE_MODULE = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe"}  # the MoE block's name on disk
# our stacked expert weight -> the per-expert HF projection name
EXPERT_NAMES = {"qwen3_moe": {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
                "mixtral": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}}


def _window(hf: dict) -> int | None:
    """The sliding window transformers applies, or None (Qwen3-MoE ignores it unless use_sliding_window)."""
    if hf["model_type"] == "qwen3_moe" and not hf.get("use_sliding_window", False):
        return None
    return hf.get("sliding_window")


def _layer_kinds(hf: dict, n_experts: int) -> str:
    """The MLP kind of every HF layer: 'E' (sparse MoE) or '-' (dense), as transformers decides it."""
    n = hf["num_hidden_layers"]
    if hf["model_type"] == "mixtral":
        return "E" * n
    dense = set(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step", 1) or 1
    return "".join("E" if j not in dense and n_experts > 0 and (j + 1) % step == 0 else "-" for j in range(n))


def config_from_hf(hf: dict) -> ModelConfig:
    family = hf["model_type"]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitecture(f"{family}: hidden_act {act!r} is not supported (SwiGLU/silu only)")
    window, max_pos = _window(hf), hf.get("max_position_embeddings")
    if window is not None and (max_pos is None or window < max_pos):
        raise UnsupportedArchitecture(
            f"{family}: sliding_window={window} is smaller than max_position_embeddings={max_pos}; "
            "sliding-window attention is not supported (nestlm attends to every earlier position)")
    heads = hf["num_attention_heads"]
    if family == "mixtral":
        n_experts, expert_ffn, dense_ffn = hf["num_local_experts"], hf["intermediate_size"], 0
    else:
        n_experts = hf["num_experts"] if hf.get("num_experts") is not None else hf["num_local_experts"]
        expert_ffn, dense_ffn = hf["moe_intermediate_size"], hf["intermediate_size"]
    kinds = _layer_kinds(hf, n_experts)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        pattern="".join("*" + k for k in kinds),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        family=family,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=_rope_theta(hf),
        qk_norm=family == "qwen3_moe",
        attn_bias=bool(hf.get("attention_bias", False)) if family == "qwen3_moe" else False,
        intermediate_size=dense_ffn,
        mlp_act="swiglu",
        n_experts=n_experts,
        top_k=hf["num_experts_per_tok"],
        moe_intermediate_size=expert_ffn,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if family == "qwen3_moe" else True,
        moe_router="softmax",
        moe_act="swiglu",
        hf_extra={k: hf[k] for k in PASSTHROUGH if k in hf},
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    family, n = cfg.family, len(cfg.pattern) // 2
    kinds = cfg.pattern[1::2]
    allowed = "E-" if family == "qwen3_moe" else "E"
    if len(cfg.pattern) % 2 or cfg.pattern[::2] != "*" * n or any(k not in allowed for k in kinds):
        want = "'*E' or '*-'" if family == "qwen3_moe" else "'*E'"
        raise UnsupportedArchitecture(f"{family} needs layers of attention then MLP blocks ({want} per layer); got "
                                      f"pattern {cfg.pattern!r} (drop whole layers, not single blocks)")
    if cfg.rope_theta is None or cfg.mlp_act != "swiglu":
        raise UnsupportedArchitecture(f"{family} needs RoPE and SwiGLU")
    if cfg.qk_norm != (family == "qwen3_moe"):
        raise UnsupportedArchitecture(f"{family}: q/k-norm is {'required' if family == 'qwen3_moe' else 'absent'}")
    if family == "mixtral" and cfg.attn_bias:
        raise UnsupportedArchitecture("mixtral attention has no bias")
    if cfg.moe_router != "softmax" or cfg.moe_act != "swiglu" or cfg.shared_intermediate_size \
            or cfg.n_expert_groups != 1 or cfg.routed_scaling != 1.0:
        raise UnsupportedArchitecture(f"{family} MoE blocks are softmax-routed SwiGLU experts, without shared "
                                      "expert, expert groups or routed scaling")
    if family == "mixtral" and not cfg.norm_topk_prob:
        raise UnsupportedArchitecture("mixtral always renormalises the top-k router weights (norm_topk_prob)")
    hf = llama.decoder_hf_config(cfg, ARCHITECTURES[family], n) | {"num_experts_per_tok": cfg.top_k}
    if family == "mixtral":
        hf.update(num_local_experts=cfg.n_experts, intermediate_size=cfg.moe_intermediate_size)
    else:
        hf.update(num_experts=cfg.n_experts, moe_intermediate_size=cfg.moe_intermediate_size,
                  intermediate_size=cfg.intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                  attention_bias=cfg.attn_bias, decoder_sparse_step=1,
                  mlp_only_layers=[j for j, k in enumerate(kinds) if k == "-"])
    hf.update(cfg.hf_extra)
    return hf


# ---------------------------------------------------------------------------------------------- weights
def state_from_hf(ckpt, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """ckpt: a SafetensorsDir-like object (keys(), get(k)). Returns our Decoder's state dict. The MoE blocks'
    router and experts are read here; everything else (embeddings, norms, attention, dense MLP layers) is a
    Llama layer and read by nestlm.convert.llama."""
    family = cfg.family
    moe = f"(?:{MOE_MODULE[family]}|mlp)" if family == "mixtral" else "mlp"  # in memory, Mixtral's is `mlp` too
    hf_to_ours = {v: k for k, v in EXPERT_NAMES[family].items()}
    sd: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, torch.Tensor]] = {}  # our stacked name -> {expert: tensor}
    dense: list[str] = []
    for k in ckpt.keys():
        m = re.fullmatch(rf"model\.layers\.(\d+)\.({moe}\..+)", k)
        if m is None or cfg.pattern[2 * int(m[1]) + 1:2 * int(m[1]) + 2] != "E":
            dense.append(k)
            continue
        mixer, rest = f"layers.{2 * int(m[1]) + 1}.mixer.", m[2]
        if e := re.fullmatch(rf"{moe}\.experts\.(\d+)\.(\w+)\.weight", rest):
            if e[2] not in hf_to_ours:
                raise UnsupportedArchitecture(f"{family}: unexpected expert tensor {k!r}")
            per_expert.setdefault(mixer + hf_to_ours[e[2]], {})[int(e[1])] = ckpt.get(k)
        elif re.fullmatch(rf"{moe}\.experts\.gate_up_proj", rest):  # fused in memory: [E, 2F, D] = [gate | up]
            sd[mixer + "gate_proj"], sd[mixer + "up_proj"] = ckpt.get(k).chunk(2, dim=1)
        elif re.fullmatch(rf"{moe}\.experts\.down_proj", rest):
            sd[mixer + "down_proj"] = ckpt.get(k)
        elif re.fullmatch(rf"{moe}\.gate\.weight", rest):
            sd[mixer + "gate.weight"] = ckpt.get(k)
        else:
            raise UnsupportedArchitecture(f"{family}: unexpected tensor {k!r}")
    sd.update(llama.state_from_hf(ckpt, cfg, keys=dense))
    sd.update(stack_experts(per_expert, cfg.n_experts, family))
    return sd


def hf_name(name: str, cfg: ModelConfig, expert: int | None = None) -> str:
    """Our state-dict name -> the file's: a MoE block's router and experts (one tensor per expert and
    projection) are named here, everything else as a Llama layer (nestlm.convert.llama)."""
    m = re.fullmatch(r"layers\.(\d+)\.mixer\.(.+)", name)
    if m is None or cfg.pattern[int(m[1])] != "E":
        return llama.hf_name(name, cfg)
    module = f"model.layers.{int(m[1]) // 2}.{MOE_MODULE[cfg.family]}"
    if expert is not None:  # a stacked expert tensor
        return f"{module}.experts.{expert}.{EXPERT_NAMES[cfg.family][m[2]]}.weight"
    return f"{module}.{m[2]}"  # gate.weight: the router


def state_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the on-disk layout (model.*, one tensor per expert and projection)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if is_stacked(name):
            out |= {hf_name(name, cfg, e): t[e] for e in range(t.shape[0])}
        else:
            out[hf_name(name, cfg)] = t
    return out
