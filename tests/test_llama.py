"""Llama / Qwen3 <-> nestlm: logits, cached decoding, round trip and nested-submodel export against plain
transformers on tiny random models (fp32)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    assert_round_trip_exact,
    hf_cached,
    num_params,
    ours_cached,
    saved_hf_pair,
    tiny_llama_config,
    tiny_qwen3_config,
)
from torch.testing import assert_close

import nestlm
from nestlm import SubArch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread is faster on a shared CPU
TOL = {"atol": 2e-5, "rtol": 1e-4}

CASES = {
    # GQA 4/2, untied
    "llama-gqa": (tiny_llama_config, {}),
    # MHA, tied embeddings, biases on attention and MLP
    "llama-mha-tied-bias": (tiny_llama_config, {"num_key_value_heads": 4, "tie_word_embeddings": True,
                                                "attention_bias": True, "mlp_bias": True}),
    # GQA 4/1, untied, biases, 4 layers
    "llama-gqa-bias": (tiny_llama_config, {"num_key_value_heads": 1, "num_hidden_layers": 4,
                                           "attention_bias": True, "mlp_bias": True}),
    # q/k-norm, GQA 4/2, tied
    "qwen3-gqa-tied": (tiny_qwen3_config, {}),
    # MHA, untied, attention bias, head_dim * heads != hidden
    "qwen3-mha-wide-heads": (tiny_qwen3_config, {"num_key_value_heads": 4, "head_dim": 16,
                                                 "tie_word_embeddings": False, "attention_bias": True}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(HF model, its checkpoint folder, our model loaded from it)."""
    make, over = CASES[request.param]
    return saved_hf_pair(make, over, tmp_path_factory.mktemp(request.param))


def _ids(batch=2, t=11, vocab=96, seed=1):
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def _sub(ours) -> SubArch:
    c = ours.cfg
    n_layers = c.n_blocks // 2
    keep = [j for j in range(n_layers) if j != 1]  # drop HF layer 1 (our blocks 2 and 3)
    return SubArch(hidden=24, attn_kv_heads=max(1, c.num_kv_heads // 2),
                   attn_heads_per_group=max(1, c.num_heads // c.num_kv_heads // 2), ffn=32,
                   layers=tuple(i for j in keep for i in (2 * j, 2 * j + 1)))


# ------------------------------------------------------------------------------------------ loading
def test_config(pair):
    hf, _, ours = pair
    c, h = ours.cfg, hf.config
    assert c.family == h.model_type
    assert c.pattern == "*-" * h.num_hidden_layers
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (h.num_attention_heads, h.num_key_value_heads, h.head_dim)
    assert c.tie_embeddings == h.tie_word_embeddings
    assert c.attn_bias == h.attention_bias
    assert c.qk_norm == (h.model_type == "qwen3")
    assert c.rope_theta == h.rope_parameters["rope_theta"]
    assert num_params(ours) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("batch", [1, 3])
def test_prefill_logits(pair, batch):
    hf, _, ours = pair
    ids = _ids(batch)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.dtype == torch.float32
    assert_close(got, ref, **TOL)


def test_cached_decoding(pair):
    hf, _, ours = pair
    ids, p = _ids(2, 12), 5
    with torch.no_grad():
        full = ours(ids)
    got, ref = ours_cached(ours, ids, p), hf_cached(hf, ids, p)  # ours_cached checks the cache position
    assert_close(got, ref, **TOL)
    assert_close(got, full, **TOL)


def test_chunked_prefill_on_cache(pair):
    """A multi-token forward on top of a filled cache (causal mask with an offset)."""
    _, _, ours = pair
    ids = _ids(2, 12)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache()
        parts = [ours(ids[:, :4], cache=cache), ours(ids[:, 4:9], cache=cache), ours(ids[:, 9:10], cache=cache),
                 ours(ids[:, 10:], cache=cache)]
    assert_close(torch.cat(parts, 1), full, **TOL)


# ------------------------------------------------------------------------------------------ export
def test_round_trip_exact(pair, tmp_path):
    hf, d, ours = pair
    assert_round_trip_exact(hf, d, ours, tmp_path / "rt", _ids(2))


def test_sub_export_matches_sliced_forward(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    _, _, ours = pair
    s = _sub(ours)
    out = nestlm.to_hf(ours, tmp_path / "sub", sub=s)
    small = AutoModelForCausalLM.from_pretrained(out).eval()
    c = small.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (24, 32, len(s.layers) // 2)
    assert c.num_key_value_heads == s.attn_kv_heads
    assert c.num_attention_heads == s.attn_kv_heads * s.attn_heads_per_group
    assert sum(p.numel() for p in small.parameters()) == nestlm.count_params(ours.cfg, s)
    ids = _ids(2)
    with torch.no_grad():
        ref = small(ids).logits
        got = ours(ids, sub=s)
        assert_close(got, ref, **TOL)
        # cached decoding of the submodel matches too
        cache = ours.new_cache()
        steps = [ours(ids[:, :4], sub=s, cache=cache)] + [
            ours(ids[:, t:t + 1], sub=s, cache=cache) for t in range(4, ids.shape[1])]
    assert_close(torch.cat(steps, 1), ref, **TOL)


@pytest.mark.parametrize("layers", [(0, 1, 2), (1, 2), (0, 2, 3)])
def test_export_unpaired_blocks_raises(pair, tmp_path, layers):
    """An attention block kept without its MLP block (or the reverse) is not a Llama/Qwen3 layer."""
    _, _, ours = pair
    with pytest.raises(nestlm.UnsupportedArchitecture):
        nestlm.to_hf(ours, tmp_path / "bad", sub=SubArch(layers=layers))
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------ unsupported
@pytest.mark.parametrize("make", [tiny_llama_config, tiny_qwen3_config], ids=["llama", "qwen3"])
def test_unsupported_rope_type_raises(make, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = make(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"] == "linear"
    with pytest.raises(nestlm.UnsupportedArchitecture, match="linear"):
        nestlm.from_hf(tmp_path)
