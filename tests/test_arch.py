"""SubArch accounting: parameter counts against the extracted model and the exported files, active parameters
against the experts' tensor shapes, memory against what the decoding Cache really holds; SubArch validation
and (de)serialisation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import num_params, randomize_
from safetensors.torch import load_file

import nestlm
from nestlm import ConfigError, ModelConfig, SubArch, count_active_params, count_memory, count_params
from nestlm.model.extract import extract

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
HYBRID = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "pattern": "M*-EM*E-",
    "num_heads": 8,
    "num_kv_heads": 2,
    "head_dim": 4,
    "intermediate_size": 48,
    "mamba_heads": 8,
    "mamba_head_dim": 4,
    "mamba_groups": 2,
    "ssm_state": 8,
    "chunk_size": 4,
    "n_experts": 6,
    "top_k": 2,
    "moe_intermediate_size": 16,
    "shared_intermediate_size": 24,
}

CONFIGS = {
    "hybrid-moe": HYBRID,
    "hybrid-moe-tied-biases": HYBRID | {"tie_embeddings": True, "mamba_bias": True, "conv_bias": False},
    "hybrid-moe-mlp-bias": HYBRID | {"mlp_bias": True},  # mlp_bias also puts biases on the shared expert
    "hybrid-no-moe": HYBRID
    | {
        "pattern": "M*-M-",
        "n_experts": 0,
        "top_k": 0,
        "moe_intermediate_size": 0,
        "shared_intermediate_size": 0,
        "mamba_groups": 1,
    },
    "llama-untied-bias": {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "pattern": "*-*-*-",
        "family": "llama",
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 8,
        "rope_theta": 1e4,
        "intermediate_size": 48,
        "mlp_act": "swiglu",
        "attn_bias": True,
        "mlp_bias": True,
    },
    "qwen3-tied": {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "pattern": "*-*-",
        "family": "qwen3",
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 8,
        "rope_theta": 1e6,
        "qk_norm": True,
        "intermediate_size": 48,
        "mlp_act": "swiglu",
        "tie_embeddings": True,
    },
}


def subs_for(cfg: ModelConfig) -> list[SubArch]:
    moe = "E" in cfg.pattern
    n = cfg.n_blocks
    if cfg.family == "nemotron_h":
        every_other, drop_first = tuple(range(0, n, 2)), tuple(range(1, n))
    else:  # Llama / Qwen3 depth units are whole (attention, MLP) layers
        every_other, drop_first = tuple(i for i in range(n) if i % 4 < 2), tuple(range(2, n))
    out = [
        None,
        SubArch(hidden=24),
        SubArch(layers=every_other),
        SubArch(attn_kv_heads=1, attn_heads_per_group=1, ffn=20),
    ]
    if "M" in cfg.pattern:
        out.append(SubArch(mamba_heads_per_group=1 if cfg.mamba_groups == 2 else 3))
    if moe:
        out += [SubArch(experts=3, moe_ffn=8, shared_ffn=12), SubArch(experts=1)]
    out.append(
        SubArch(
            hidden=20,
            attn_kv_heads=1,
            ffn=24,
            layers=drop_first,
            **({"experts": 4, "moe_ffn": 12} if moe else {}),
        )
    )
    return out


def model_for(name: str) -> nestlm.Decoder:
    return randomize_(nestlm.Decoder(ModelConfig(**CONFIGS[name])), seed=0).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_count_params_matches_extracted_model(name):
    model = model_for(name)
    assert count_params(model.cfg) == num_params(model)
    for s in subs_for(model.cfg):
        assert count_params(model.cfg, s) == num_params(extract(model, s)), s


# transformers' Nemotron-H never ties (it always writes lm_head.weight), so the file check uses untied
# Nemotron-H configs and Qwen3 for tied embeddings
@pytest.mark.parametrize(
    "name", ["hybrid-moe", "hybrid-moe-mlp-bias", "hybrid-no-moe", "llama-untied-bias", "qwen3-tied"]
)
def test_count_params_matches_exported_files(name, tmp_path):
    model = model_for(name)
    for i, s in enumerate(subs_for(model.cfg)):
        if s is not None and s.experts == 1:
            continue  # not exportable to transformers' Nemotron-H (its router takes top-2 per group)
        out = nestlm.to_hf(model, tmp_path / str(i), sub=s)
        files = load_file(out / "model.safetensors")
        assert sum(t.numel() for t in files.values()) == count_params(model.cfg, s), s


@pytest.mark.parametrize(
    "name", ["hybrid-moe", "hybrid-moe-tied-biases", "hybrid-no-moe", "llama-untied-bias"]
)
def test_count_active_params(name):
    model = model_for(name)
    for s in subs_for(model.cfg):
        small = extract(model, s)
        inactive = 0
        for block in small.layers:
            if block.kind == "E":
                mx = block.mixer
                n_exp, top_k = mx.up_proj.shape[0], small.cfg.top_k
                assert top_k == min(model.cfg.top_k, n_exp)
                inactive += (n_exp - top_k) * (mx.up_proj[0].numel() + mx.down_proj[0].numel())
        assert count_active_params(model.cfg, s) == num_params(small) - inactive, s
        if "E" not in small.cfg.pattern:
            assert count_active_params(model.cfg, s) == count_params(model.cfg, s)


def cache_bytes(cache: nestlm.Cache) -> tuple[int, int, int]:
    """(K/V bytes up to the filled length, SSM state bytes, conv state bytes) actually held by a cache."""
    kv = ssm = conv = 0
    for layer in cache.layers.values():
        if "k" in layer:
            n = layer["len"]
            kv += sum(layer[x][:, :, :n].numel() * layer[x].element_size() for x in ("k", "v"))
        if "ssm" in layer:
            ssm += layer["ssm"].numel() * layer["ssm"].element_size()
        if "conv" in layer:
            conv += layer["conv"].numel() * layer["conv"].element_size()
    return kv, ssm, conv


@pytest.mark.parametrize("name", ["hybrid-moe", "hybrid-no-moe", "qwen3-tied"])
def test_count_memory_matches_cache(name):
    model = model_for(name)
    cfg = model.cfg
    for s in subs_for(cfg):
        for batch, n in ((1, 7), (3, 10)):
            cache = model.new_cache()
            ids = torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                model(ids, sub=s, cache=cache)
            kv, ssm, conv = cache_bytes(cache)
            if "*" in cfg.pattern and (
                s is None or s.layers is None or any(cfg.pattern[i] == "*" for i in s.layers)
            ):
                assert kv > 0
            # fp32 model: weights, K/V and conv state in 4-byte floats, SSM state fp32
            mem = count_memory(cfg, s, seq_len=n, batch=batch, weight_bytes=4, kv_bytes=4, state_bytes=4)
            assert mem["kv_cache"] == kv, s
            assert mem["ssm_state"] == ssm + conv, s
            assert mem["weights"] == 4 * count_params(cfg, s)
            assert mem["total"] == mem["weights"] + mem["kv_cache"] + mem["ssm_state"]
            # the SSM state alone (conv state priced at 0 bytes)
            assert count_memory(cfg, s, seq_len=n, batch=batch, kv_bytes=0, state_bytes=4)["ssm_state"] == ssm


def test_count_memory_defaults_scale():
    cfg = ModelConfig(**HYBRID)
    a = count_memory(cfg, seq_len=100)
    b = count_memory(cfg, seq_len=200, batch=2)
    assert b["kv_cache"] == 4 * a["kv_cache"] and b["ssm_state"] == 2 * a["ssm_state"]
    assert a["weights"] == 2 * count_params(cfg)  # bf16 by default


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("sub", "field"),
    [
        (SubArch(hidden=0), "hidden"),
        (SubArch(hidden=33), "hidden"),
        (SubArch(attn_kv_heads=0), "attn_kv_heads"),
        (SubArch(attn_kv_heads=3), "attn_kv_heads"),
        (SubArch(attn_heads_per_group=5), "attn_heads_per_group"),
        (SubArch(mamba_heads_per_group=0), "mamba_heads_per_group"),
        (SubArch(mamba_heads_per_group=5), "mamba_heads_per_group"),
        (SubArch(ffn=49), "ffn"),
        (SubArch(moe_ffn=0), "moe_ffn"),
        (SubArch(shared_ffn=25), "shared_ffn"),
        (SubArch(experts=7), "experts"),
        (SubArch(layers=(2, 1)), "layers"),
        (SubArch(layers=(1, 1, 2)), "layers"),
        (SubArch(layers=()), "layers"),
        (SubArch(layers=[]), "layers"),
        (SubArch(layers=(0, 8)), "layers"),
        (SubArch(layers=(-1, 0)), "layers"),
    ],
)
def test_resolve_errors_name_the_field(sub, field):
    cfg = ModelConfig(**HYBRID)
    with pytest.raises(ConfigError, match=f"SubArch.{field}"):
        sub.resolve(cfg)
    with pytest.raises(ConfigError, match=f"SubArch.{field}"):
        count_params(cfg, sub)


def test_resolve_errors_without_moe_and_with_expert_groups():
    no_moe = ModelConfig(**CONFIGS["hybrid-no-moe"])
    assert SubArch(moe_ffn=0, experts=0).resolve(no_moe).experts == 0
    with pytest.raises(ConfigError, match="shared_ffn"):
        SubArch(shared_ffn=4).resolve(no_moe)
    grouped = ModelConfig(**HYBRID | {"n_expert_groups": 2, "topk_groups": 1})
    with pytest.raises(ConfigError, match="n_expert_groups"):
        SubArch(experts=4).resolve(grouped)
    assert SubArch(moe_ffn=8).resolve(grouped).moe_ffn == 8


def test_resolve_fills_and_is_full():
    cfg = ModelConfig(**HYBRID)
    r = SubArch(hidden=16, layers=[0, 3]).resolve(cfg)
    assert r == SubArch(
        hidden=16,
        attn_kv_heads=2,
        attn_heads_per_group=4,
        mamba_heads_per_group=4,
        ffn=48,
        moe_ffn=16,
        shared_ffn=24,
        experts=6,
        layers=(0, 3),
    )
    assert r.resolve(cfg) == r
    assert SubArch().resolve(cfg) == SubArch.full(cfg) and r.resolve(cfg) != SubArch.full(cfg)


# ------------------------------------------------------------------------------------------ (de)serialisation
@pytest.mark.parametrize(
    "sub",
    [
        SubArch(),
        SubArch(hidden=16, layers=(0, 2, 5)),
        SubArch(
            hidden=8,
            attn_kv_heads=1,
            attn_heads_per_group=2,
            mamba_heads_per_group=1,
            ffn=4,
            moe_ffn=4,
            shared_ffn=4,
            experts=2,
            layers=[1],
        ),
    ],
)
def test_subarch_dict_round_trip(sub):
    d = sub.to_dict()
    again = SubArch.from_dict(json.loads(json.dumps(d)))
    assert again == sub
    assert again.to_dict() == d
    assert hash(again) == hash(sub)


def test_subarch_from_dict_unknown_key():
    with pytest.raises(ConfigError, match="widht"):
        SubArch.from_dict({"widht": 3})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_config_round_trip(name, tmp_path):
    cfg = ModelConfig(**CONFIGS[name] | {"hf_extra": {"bos_token_id": 1, "eos_token_id": [2, 3]}})
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save(tmp_path / "cfg.json")
    assert ModelConfig.load(tmp_path / "cfg.json") == cfg
    with pytest.raises(ConfigError, match="num_layers"):
        ModelConfig.from_dict(cfg.to_dict() | {"num_layers": 3})
