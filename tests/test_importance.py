"""Importance estimation and nested sorting: function is preserved, scores follow the permutation, and
planted unimportant components end up last (so prefixes keep what matters)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tiny_hybrid_config, tiny_llama_config, tiny_qwen3_config

import nestlm
from nestlm.elastic.importance import Scores, importance
from nestlm.elastic.sort import permute_scores, sort_
from nestlm.model.extract import extract


def is_sorted(scores) -> bool:
    """True when every width axis of `scores` is already in descending order (sort_ would change nothing)."""
    def desc(t):
        return bool((t[..., :-1] >= t[..., 1:]).all()) if t.shape[-1] > 1 else True

    for k, t in scores.tensors.items():
        if k == "layers" or k.endswith(".kv"):
            continue
        if k.endswith(".heads"):
            if not desc(t.sum(-1)) or not desc(t):
                return False
        elif not desc(t):
            return False
    return True


def hybrid(**over):
    return randomize_(nestlm.Decoder(tiny_hybrid_config(**{"pattern": "M*-EM*-E", **over})))


def batches(vocab, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(n)]


def hf_dense(tmp_path, make_cfg):
    from transformers import AutoModelForCausalLM

    hf = randomize_(AutoModelForCausalLM.from_config(make_cfg()))
    hf.save_pretrained(tmp_path / "hf")
    return nestlm.from_hf(tmp_path / "hf")


@pytest.mark.parametrize("kind", ["hybrid", "hybrid_bias", "llama", "qwen3"])
def test_sort_preserves_logits_and_cached_decoding(kind, tmp_path):
    if kind == "hybrid":
        model = hybrid()
    elif kind == "hybrid_bias":
        model = hybrid(mlp_bias=True, mamba_bias=True, conv_bias=True, mlp_act="swiglu")
    else:
        model = hf_dense(tmp_path, tiny_llama_config if kind == "llama" else tiny_qwen3_config)
    data = batches(model.cfg.vocab_size)
    ids = batches(model.cfg.vocab_size, n=1, seed=7)[0]
    with torch.no_grad():
        before = model(ids)
    scores = importance(model, data, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=0)  # scoring changes nothing
    perms = sort_(model, scores)
    assert any(not torch.equal(p.reshape(-1), torch.arange(p.numel())) for p in perms.values())
    with torch.no_grad():
        after = model(ids)
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
        cache = model.new_cache()
        steps = [model(ids[:, :9], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(9, 16)]
        torch.testing.assert_close(torch.cat(steps, 1), before, rtol=1e-4, atol=1e-4)


def test_scores_follow_the_permutation_and_second_sort_is_identity():
    model = hybrid()
    data = batches(64)
    scores = importance(model, data, progress=False)
    assert not is_sorted(scores)
    perms = sort_(model, scores)
    moved = permute_scores(scores, perms)
    assert is_sorted(moved)
    again = importance(model, data, progress=False)  # re-scoring the sorted model = the permuted scores
    for k in moved.tensors:
        torch.testing.assert_close(again[k], moved[k], rtol=1e-3, atol=1e-3 * float(moved[k].abs().max()))
    perms2 = sort_(model, again)
    for k, p in perms2.items():
        flat = p.reshape(p.shape[0], -1) if p.dim() == 2 else p[None]
        assert torch.equal(flat, torch.arange(flat.shape[-1]).expand_as(flat)), k


def test_scores_save_load_round_trip(tmp_path):
    model = hybrid()
    scores = importance(model, batches(64), progress=False)
    scores.save(tmp_path / "s.safetensors")
    back = Scores.load(tmp_path / "s.safetensors")
    assert back.meta == scores.meta and back.meta["tokens"] == 3 * 2 * 16
    assert set(back.tensors) == set(scores.tensors)
    for k in scores.tensors:
        assert torch.equal(back[k], scores[k].float())


def test_empty_calibration_data_is_an_error():
    with pytest.raises(ValueError, match="at least one calibration batch"):
        importance(hybrid(), [], progress=False)


@torch.no_grad()
def plant_dead_components(model):
    """Make the first part of every axis useless, so a correct sort moves it to the back."""
    cfg = model.cfg
    half = cfg.hidden_size // 2
    model.embeddings.weight[:, :half] *= 1e-3
    for block in model.layers:
        block.norm.weight[:half] *= 1e-3
        mx = block.mixer
        if block.kind == "-":
            mx.up_proj.weight[: cfg.intermediate_size // 2] = 0
        elif block.kind == "*":  # KV group 0 silent: its heads output ~0 whatever they attend to
            mx.v_proj.weight[: cfg.head_dim] = 0
        elif block.kind == "M":  # first half of the heads of each group get no input (x rows zero)
            hg, p = cfg.mamba_heads // cfg.mamba_groups, cfg.mamba_head_dim
            hp = cfg.mamba_heads * p
            for g in range(cfg.mamba_groups):
                dead = slice(g * hg * p, (g * hg + hg // 2) * p)
                mx.in_proj.weight[hp + dead.start: hp + dead.stop] = 0
                mx.conv1d.bias[dead] = 0  # so x = silu(conv(0)) = 0
        elif block.kind == "E":
            mx.down_proj[: cfg.n_experts // 2] *= 1e-3
            mx.up_proj[:, : cfg.moe_intermediate_size // 2] = 0
            mx.shared.up_proj.weight[: cfg.shared_intermediate_size // 2] = 0


def test_planted_dead_components_sort_last_and_prefixes_keep_the_function():
    model = hybrid()
    plant_dead_components(model)
    cfg = model.cfg
    ids = batches(64, n=1, seed=5)[0]
    # every axis whose dead half can be cut without changing the function. Hidden channels, Mamba heads
    # and experts can't: RMSNorm / grouped-norm statistics and routing depend on what is kept, so they
    # are checked by their order and by "sorted prunes better than unsorted"
    half = nestlm.SubArch(ffn=cfg.intermediate_size // 2, attn_kv_heads=cfg.num_kv_heads - 1,
                          moe_ffn=cfg.moe_intermediate_size // 2, shared_ffn=cfg.shared_intermediate_size // 2)
    narrow = nestlm.SubArch(hidden=cfg.hidden_size // 2,
                            mamba_heads_per_group=cfg.mamba_heads // cfg.mamba_groups // 2)
    with torch.no_grad():
        full = model(ids)
        unsorted_err = (model(ids, sub=half) - full).pow(2).mean()
        unsorted_narrow = (model(ids, sub=narrow) - full).pow(2).mean()
    scores = importance(model, batches(64), progress=False)
    k = cfg.hidden_size // 2
    assert scores["hidden"][:k].max() < scores["hidden"][k:].min()
    assert scores["blocks.2.ffn"][:24].max() < scores["blocks.2.ffn"][24:].min()
    assert scores["blocks.0.mamba_heads"][:, :2].max() < scores["blocks.0.mamba_heads"][:, 2:].min()
    assert scores["blocks.1.kv"][0] < scores["blocks.1.kv"][1]
    assert scores["blocks.3.experts"][:2].max() < scores["blocks.3.experts"][2:].min()
    assert scores["blocks.3.expert_ffn"][:, :8].max() < scores["blocks.3.expert_ffn"][:, 8:].min()
    assert scores["blocks.3.shared_ffn"][:12].max() < scores["blocks.3.shared_ffn"][12:].min()
    sort_(model, scores)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), full, rtol=1e-4, atol=1e-4)
        sorted_err = (model(ids, sub=half) - full).pow(2).mean()
        sorted_narrow = (model(ids, sub=narrow) - full).pow(2).mean()
        assert sorted_err < 1e-6 * unsorted_err
        assert sorted_narrow < unsorted_narrow
        # and the sliced checkpoint of the sorted model is the same function as the elastic forward
        torch.testing.assert_close(extract(model, half)(ids), model(ids, sub=half), rtol=1e-5, atol=1e-5)
    # experts: the dead ones (1e-3 output) are last, so the first two are the live ones
    mx = model.layers[3].mixer
    assert mx.down_proj[:2].abs().mean() > 100 * mx.down_proj[2:].abs().mean()


def test_layer_importance_finds_a_bypassed_block():
    model = hybrid()
    with torch.no_grad():
        model.layers[2].mixer.down_proj.weight.zero_()  # block 2 does nothing
    scores = importance(model, batches(64), progress=False)
    assert scores["layers"].shape == (model.cfg.n_blocks,)
    assert int(scores["layers"].argmin()) == 2 and float(scores["layers"][2]) == 0.0
    assert scores["layers"].argsort().tolist()[0] == 2  # the block depth pruning drops first
    sub = nestlm.arch.depth_subarch(model.cfg, scores["layers"], 0.95)
    assert 2 not in sub.layers


def test_llama_depth_unit_is_a_layer(tmp_path):
    model = hf_dense(tmp_path, tiny_llama_config)
    scores = importance(model, batches(96), progress=False)
    lay = scores["layers"]
    assert scores.meta["depth_unit"] == "layer"
    assert torch.equal(lay[0::2], lay[1::2])  # attention and MLP of one HF layer go together
    sub = nestlm.arch.depth_subarch(model.cfg, lay, 0.8)
    assert len(sub.layers) % 2 == 0 and all(sub.layers[i] + 1 == sub.layers[i + 1] for i in range(0, len(sub.layers), 2))


def test_width_subarch_hits_budget():
    model = hybrid(hidden_size=64, intermediate_size=128)
    cfg = model.cfg
    for frac in (0.85, 0.7, 0.5):
        s = nestlm.arch.width_subarch(cfg, frac)
        ratio = nestlm.count_params(cfg, s) / nestlm.count_params(cfg)
        assert ratio <= frac and ratio > frac - 0.2, (frac, ratio)
    with pytest.raises(nestlm.ConfigError, match="budget fraction"):
        nestlm.arch.width_subarch(cfg, 1.5)
