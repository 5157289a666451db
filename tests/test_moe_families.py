"""Qwen3-MoE and Mixtral <-> nestlm on tiny random models built by transformers' own classes (fp32): logits
and cached decoding against transformers, exact round trip (both expert layouts read), sorting, nested
submodels exported / streamed and run by plain transformers, counting against the files and the cache,
and the errors (too few experts, sliding window, unpaired layers)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    assert_round_trip_exact,
    hf_cached,
    num_params,
    ours_cached,
    random_hf_model,
    saved_hf_pair,
)
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import nestlm
import nestlm.slicing
from nestlm import ConfigError, ModelConfig, SubArch, count_active_params, count_memory, count_params
from nestlm.convert import hf_tensors
from nestlm.elastic.importance import importance
from nestlm.elastic.sort import sort_

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"atol": 2e-5, "rtol": 1e-4}
VOCAB = 96


def tiny_qwen3_moe_config(**over):
    from transformers import Qwen3MoeConfig

    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
              mlp_only_layers=[1], rms_norm_eps=1e-6, max_position_embeddings=128,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False)
    kw.update(over)
    return Qwen3MoeConfig(**kw)


def tiny_mixtral_config(**over):
    from transformers import MixtralConfig

    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, num_local_experts=6, num_experts_per_tok=2, rms_norm_eps=1e-5,
              max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    kw.update(over)
    return MixtralConfig(**kw)


CASES = {
    # dense layer 1 (mlp_only_layers), top-k weights not renormalised, untied
    "qwen3_moe": (tiny_qwen3_moe_config, {}),
    # every other layer sparse (decoder_sparse_step=2), renormalised top-k, tied, attention bias
    "qwen3_moe-step2-norm-tied-bias": (tiny_qwen3_moe_config, {
        "num_hidden_layers": 4, "mlp_only_layers": None, "decoder_sparse_step": 2, "norm_topk_prob": True,
        "tie_word_embeddings": True, "attention_bias": True}),
    "mixtral": (tiny_mixtral_config, {}),
    # MHA, tied, top-3 of 6
    "mixtral-mha-tied-top3": (tiny_mixtral_config, {"num_key_value_heads": 4, "tie_word_embeddings": True,
                                                    "num_experts_per_tok": 3}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(HF model, its checkpoint folder, our model loaded from it)."""
    make, over = CASES[request.param]
    return saved_hf_pair(make, over, tmp_path_factory.mktemp(request.param))


def ids_(batch=2, t=11, seed=1):
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


def sub_for(cfg: ModelConfig) -> SubArch:
    """Every elastic axis cut: hidden, heads per KV group, experts, expert FFN, dense FFN, and HF layer 0."""
    return SubArch(hidden=24, attn_heads_per_group=max(1, cfg.num_heads // cfg.num_kv_heads // 2),
                   experts=4, moe_ffn=8, ffn=24 if "-" in cfg.pattern else None,
                   layers=tuple(range(2, cfg.n_blocks)))


def hf_numel(folder) -> int:
    return sum(t.numel() for f in sorted(folder.glob("model*.safetensors")) for t in load_file(f).values())


# ------------------------------------------------------------------------------------------ loading
def test_config(pair):
    hf, _, ours = pair
    c, h = ours.cfg, hf.config
    assert c.family == h.model_type
    kinds = ["E" if type(layer.mlp).__name__.endswith("SparseMoeBlock") else "-" for layer in hf.model.layers]
    assert c.pattern == "".join("*" + k for k in kinds) and "E" in kinds
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (h.num_attention_heads, h.num_key_value_heads, h.head_dim)
    assert (c.n_experts, c.top_k, c.moe_router, c.moe_act) == (h.num_local_experts, h.num_experts_per_tok,
                                                               "softmax", "swiglu")
    assert c.norm_topk_prob == (h.norm_topk_prob if h.model_type == "qwen3_moe" else True)
    assert c.qk_norm == (h.model_type == "qwen3_moe") and c.tie_embeddings == h.tie_word_embeddings
    assert num_params(ours) == sum(p.numel() for p in hf.parameters()) == count_params(c)
    moe = ours.layers[c.pattern.index("E")].mixer
    assert moe.e_score_correction_bias is None and moe.gate_proj.shape == moe.up_proj.shape


def test_old_configs_keep_the_nemotron_router():
    """ModelConfig dicts written before moe_router / moe_act existed load as Nemotron-H's MoE."""
    d = ModelConfig(vocab_size=8, hidden_size=8, pattern="E", n_experts=2, top_k=1, moe_intermediate_size=4,
                    shared_intermediate_size=4).to_dict()
    old = {k: v for k, v in d.items() if k not in ("moe_router", "moe_act")}
    cfg = ModelConfig.from_dict(old)
    assert (cfg.moe_router, cfg.moe_act) == ("sigmoid", "relu2")
    moe = nestlm.Decoder(cfg).layers[0].mixer
    assert moe.gate_proj is None and moe.e_score_correction_bias.shape == (2,)
    with pytest.raises(ConfigError, match="moe_router"):
        ModelConfig.from_dict(d | {"moe_router": "relu"})


@pytest.mark.parametrize("batch", [1, 3])
def test_prefill_logits(pair, batch):
    hf, _, ours = pair
    ids = ids_(batch)
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, **TOL)


def test_cached_decoding(pair):
    hf, _, ours = pair
    ids, p = ids_(2, 12), 5
    with torch.no_grad():
        full = ours(ids)
    got, ref = ours_cached(ours, ids, p), hf_cached(hf, ids, p)
    assert_close(got, ref, **TOL)
    assert_close(got, full, **TOL)


# ------------------------------------------------------------------------------------------ export
def test_round_trip_exact(pair, tmp_path):
    hf, d, ours = pair
    assert_round_trip_exact(hf, d, ours, tmp_path / "rt", ids_())
    names = load_file(d / "model.safetensors").keys()
    moe = "block_sparse_moe" if hf.config.model_type == "mixtral" else "mlp"
    proj = "w1" if hf.config.model_type == "mixtral" else "gate_proj"
    assert f"model.layers.{ours.cfg.pattern.index('E') // 2}.{moe}.experts.5.{proj}.weight" in names


def test_fused_in_memory_layout_is_read(pair, tmp_path):
    """transformers 5 holds the experts fused (experts.gate_up_proj [E, 2F, D], experts.down_proj): a file
    written with those names (the model's own state_dict) loads to the same weights."""
    hf, d, ours = pair
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if "rotary" not in k}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    fused = nestlm.from_hf(tmp_path)
    assert fused.cfg == ours.cfg
    a, b = fused.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the streamed slicer reads only the on-disk layout, and says so
    with pytest.raises(nestlm.UnsupportedArchitecture, match="fused"):
        nestlm.slicing.slice(tmp_path, SubArch(experts=4), tmp_path.with_name(tmp_path.name + "_out"))  # not inside


def test_sub_export_runs_in_transformers_and_counts(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, _, ours = pair
    cfg, s = ours.cfg, sub_for(ours.cfg)
    out = nestlm.to_hf(ours, tmp_path / "sub", sub=s)
    small = AutoModelForCausalLM.from_pretrained(out).eval()
    c, r = small.config, s.resolve(cfg)
    assert type(small) is type(hf)
    assert (c.hidden_size, c.num_hidden_layers, c.num_local_experts) == (24, len(r.layers) // 2, 4)
    assert c.num_attention_heads == r.attn_kv_heads * r.attn_heads_per_group
    expert_ffn = c.intermediate_size if c.model_type == "mixtral" else c.moe_intermediate_size
    assert expert_ffn == 8
    kinds = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in small.model.layers]
    assert kinds == [cfg.pattern[i] == "E" for i in r.layers[1::2]]  # dense layers re-indexed
    ids = ids_(2, 9, seed=2)
    with torch.no_grad():
        ref = small(ids).logits
        assert_close(ours(ids, sub=s), ref, **TOL)
        cache = ours.new_cache()
        steps = [ours(ids[:, :4], sub=s, cache=cache)] + [
            ours(ids[:, t:t + 1], sub=s, cache=cache) for t in range(4, ids.shape[1])]
    assert_close(torch.cat(steps, 1), ref, **TOL)
    # parameters: the files; active: minus the experts a token doesn't use; memory: the KV cache transformers holds
    assert hf_numel(out) == count_params(cfg, s) == sum(p.numel() for p in small.parameters())
    inactive = sum((c.num_local_experts - c.num_experts_per_tok) * (layer.mlp.experts.gate_up_proj[0].numel()
                   + layer.mlp.experts.down_proj[0].numel()) for layer, sparse in zip(small.model.layers, kinds,
                                                                                      strict=True) if sparse)
    assert count_active_params(cfg, s) == hf_numel(out) - inactive
    with torch.no_grad():
        past = small(ids, use_cache=True).past_key_values
    kv = sum(t.numel() * t.element_size() for layer in past.layers for t in (layer.keys, layer.values))
    assert count_memory(cfg, s, seq_len=9, batch=2, kv_bytes=4)["kv_cache"] == kv


def test_streamed_slice_equals_to_hf(pair, tmp_path):
    _, d, ours = pair
    s = sub_for(ours.cfg)
    out = nestlm.slicing.slice(d, s, tmp_path / "streamed")
    want_cfg, want = hf_tensors(ours, s)
    got = {k: v for f in out.glob("model*.safetensors") for k, v in load_file(f).items()}
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(want_cfg))
    back = nestlm.from_hf(out)
    with torch.no_grad():
        assert_close(back(ids_()), ours(ids_(), sub=s), **TOL)


def test_sort_preserves_logits(pair):
    _, d, _ = pair
    model = nestlm.from_hf(d)  # a copy: sorting is in place
    ids = ids_(2, 16, seed=7)
    with torch.no_grad():
        before = model(ids)
    scores = importance(model, [ids_(2, 16, seed=i) for i in range(3)], progress=False)
    e = model.cfg.pattern.index("E")
    assert scores[f"blocks.{e}.experts"].shape == (6,) and scores[f"blocks.{e}.expert_ffn"].shape == (6, 16)
    perms = sort_(model, scores)
    assert not torch.equal(perms[f"blocks.{e}.experts"], torch.arange(6))
    with torch.no_grad():
        assert_close(model(ids), before, rtol=1e-4, atol=1e-4)
        cache = model.new_cache()
        steps = [model(ids[:, :9], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(9, 16)]
    assert_close(torch.cat(steps, 1), before, rtol=1e-4, atol=1e-4)


def test_soft_masks_equal_slicing(pair):
    """0/1 prefix masks over experts and expert channels (elastic training's soft widths) = the slice."""
    _, _, ours = pair
    s = SubArch(experts=4, moe_ffn=8)
    masks = {"experts": (torch.arange(6) < 4).float(), "moe_ffn": (torch.arange(16) < 8).float()}
    with torch.no_grad():
        assert_close(ours(ids_(), masks=masks), ours(ids_(), sub=s), **TOL)


# ------------------------------------------------------------------------------------------ errors
def test_fewer_experts_than_top_k_is_refused(pair, tmp_path):
    _, d, ours = pair
    s = SubArch(experts=ours.cfg.top_k - 1)
    with pytest.raises(ConfigError, match=f"experts={ours.cfg.top_k - 1} .*top_k={ours.cfg.top_k}"):
        ours(ids_(), sub=s)
    with pytest.raises(ConfigError, match="top_k"):
        nestlm.to_hf(ours, tmp_path / "a", sub=s)
    with pytest.raises(ConfigError, match="top_k"):
        nestlm.slicing.slice(d, s, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unpaired_blocks_are_refused(pair, tmp_path):
    _, _, ours = pair
    with pytest.raises(nestlm.UnsupportedArchitecture, match="drop whole layers"):
        nestlm.to_hf(ours, tmp_path / "bad", sub=SubArch(layers=(0, 1, 2)))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("make", "over"), [
    (tiny_mixtral_config, {"sliding_window": 16}),
    (tiny_qwen3_moe_config, {"use_sliding_window": True, "sliding_window": 16}),
], ids=["mixtral", "qwen3_moe"])
def test_sliding_window_is_refused(make, over, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(make(**over)).save_pretrained(tmp_path)
    with pytest.raises(nestlm.UnsupportedArchitecture, match="sliding_window=16 is smaller"):
        nestlm.from_hf(tmp_path)


def test_window_that_never_bites_is_accepted(tmp_path):
    hf = random_hf_model(tiny_mixtral_config, {"sliding_window": 128})
    hf.save_pretrained(tmp_path / "hf")
    ours = nestlm.from_hf(tmp_path / "hf")
    with torch.no_grad():
        assert_close(ours(ids_()), hf(ids_()).logits, **TOL)
    rt = nestlm.to_hf(ours, tmp_path / "rt")  # beside its source: an output never lies inside an input
    assert json.loads((rt / "config.json").read_text())["sliding_window"] == 128


# ------------------------------------------------------------------------------------------ importance
def test_sorting_puts_dead_experts_last(tmp_path):
    """Half of the experts and half of every expert's channels planted dead: importance ranks them last, the
    sorted model keeps the live experts first, and its half-channel prefix is the full model's function.
    (Cutting experts is never exact under softmax routing: tokens that went to a dead expert are routed to
    a live one instead; see the report's figures.)"""
    random_hf_model(tiny_mixtral_config, {}).save_pretrained(tmp_path)
    model = nestlm.from_hf(tmp_path)
    with torch.no_grad():
        for block in model.layers:
            if block.kind == "E":
                block.mixer.down_proj[:3] *= 1e-3  # experts 0..2 contribute ~nothing
                block.mixer.up_proj[:, :8] = 0  # channels 0..7 of every expert are silent
    ids = ids_(2, 16, seed=5)
    half = SubArch(moe_ffn=8)
    with torch.no_grad():
        full = model(ids)
        before = (model(ids, sub=half) - full).pow(2).mean()
    scores = importance(model, [ids_(2, 16, seed=i) for i in range(3)], progress=False)
    for i in (1, 3, 5):
        assert scores[f"blocks.{i}.experts"][:3].max() < scores[f"blocks.{i}.experts"][3:].min()
        assert scores[f"blocks.{i}.expert_ffn"][:, :8].max() < scores[f"blocks.{i}.expert_ffn"][:, 8:].min()
    sort_(model, scores)
    with torch.no_grad():
        assert_close(model(ids), full, rtol=1e-4, atol=1e-4)
        after = (model(ids, sub=half) - full).pow(2).mean()
    assert after < 1e-8 * before
    for i in (1, 3, 5):
        mx = model.layers[i].mixer
        assert mx.down_proj[:3].abs().mean() > 100 * mx.down_proj[3:].abs().mean()
