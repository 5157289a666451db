"""Nemotron-H <-> nestlm on tiny random models (fp32): prefill and cached-decoding logits against plain
transformers with the same weights, batches, the exact on-disk round trip, and transformers 5's in-memory
layout (`model.` prefix, stacked experts).

Mamba dt: nestlm clamps softplus(dt + dt_bias) below at time_step_min in prefill AND decoding, transformers
only in prefill. `randomize_` draws dt_bias in [-1, 1] (and in_proj rows give dt ~ N(0, 1)), so dt stays far
above time_step_min = 1e-3 and the clamp never bites: keep it that way, or decoding comparisons with HF
would differ for reasons that are not bugs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_round_trip_exact,
    hf_cached,
    num_params,
    ours_cached,
    randomize_,
    tiny_nemotron_h_config,
)
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import nestlm

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"atol": 2e-5, "rtol": 1e-4}
VOCAB = 96

CASES = {
    # M E * - M E: GQA 4/2, Mamba 8 heads in 2 groups, 4 experts top-2 with a shared expert, chunk 4
    "default": {},
    # every optional bias on: MLP / shared expert (mlp_bias), Mamba in/out_proj (use_bias), conv1d
    "all-biases": {"mlp_bias": True, "use_bias": True, "use_conv_bias": True},
    # every optional bias off
    "no-biases": {"mlp_bias": False, "use_bias": False, "use_conv_bias": False},
    # group-limited routing: 8 experts in 4 groups, the best 2 groups compete for the top-3
    "grouped-routing": {"n_routed_experts": 8, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2},
    # chunk 5 against sequences of 13 / 11 tokens (never a multiple), one Mamba group, MHA, more Mamba
    "odd-chunk": {
        "chunk_size": 5,
        "n_groups": 1,
        "num_key_value_heads": 4,
        "layers_block_type": [
            "linear_attention",
            "linear_attention",
            "full_attention",
            "moe",
            "linear_attention",
            "mlp",
        ],
    },
}


def hf_model(seed=0, **over):
    from transformers import AutoModelForCausalLM

    cfg = tiny_nemotron_h_config(**over)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return randomize_(model, seed=seed).eval()


def hf_num_params(hf) -> int:
    return sum(p.numel() for p in hf.parameters()) + sum(
        b.numel() for n, b in hf.named_buffers() if "e_score_correction_bias" in n
    )


def ids_(batch=2, t=13, seed=1):
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(HF model, its save_pretrained folder, our model loaded from it)."""
    hf = hf_model(**CASES[request.param])
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return hf, d, nestlm.from_hf(d)


# ------------------------------------------------------------------------------------------ loading
def test_config_and_param_count(pair):
    hf, _, ours = pair
    c, h = ours.cfg, hf.config
    assert c.family == "nemotron_h"
    assert c.pattern == "".join(
        {"linear_attention": "M", "moe": "E", "full_attention": "*", "mlp": "-"}[t]
        for t in h.layers_block_type
    )
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (
        h.num_attention_heads,
        h.num_key_value_heads,
        h.head_dim,
    )
    assert (c.mamba_heads, c.mamba_head_dim, c.mamba_groups, c.ssm_state) == (
        h.mamba_num_heads,
        h.mamba_head_dim,
        h.n_groups,
        h.ssm_state_size,
    )
    assert (c.n_experts, c.top_k, c.n_expert_groups, c.topk_groups) == (
        h.n_routed_experts,
        h.num_experts_per_tok,
        h.n_group,
        h.topk_group,
    )
    assert (c.mlp_bias, c.mamba_bias, c.conv_bias) == (h.mlp_bias, h.use_bias, h.use_conv_bias)
    assert c.chunk_size == h.chunk_size and c.dt_min == h.time_step_min
    assert num_params(ours) == hf_num_params(hf)


def test_count_params_equals_transformers(pair):
    hf, _, ours = pair
    assert nestlm.count_params(ours.cfg) == hf_num_params(hf)


@pytest.mark.parametrize("batch", [1, 3])
def test_prefill_logits(pair, batch):
    hf, _, ours = pair
    ids = ids_(batch)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == (batch, ids.shape[1], VOCAB) and got.dtype == torch.float32
    assert_close(got, ref, **TOL)


def test_dt_clamp_never_bites(pair):
    """The precondition for comparing decoding with transformers (see the module docstring): with the dt
    floor removed our logits don't change at all."""
    _, _, ours = pair
    ids = ids_(2, 11, seed=2)
    mixers = [b.mixer for b in ours.layers if b.kind == "M"]
    assert mixers and all(m.dt_min == ours.cfg.dt_min > 0 for m in mixers)
    with torch.no_grad():
        ref = ours(ids)
        try:
            for m in mixers:
                m.dt_min = 0.0
            assert torch.equal(ours(ids), ref)
        finally:
            for m in mixers:
                m.dt_min = ours.cfg.dt_min


def test_batch_rows_are_independent(pair):
    _, _, ours = pair
    ids = ids_(3, 11, seed=4)
    with torch.no_grad():
        batched = ours(ids)
        single = torch.cat([ours(ids[i : i + 1]) for i in range(3)])
    assert_close(batched, single, **TOL)


@pytest.mark.parametrize("p", [1, 6])
def test_cached_decoding(pair, p):
    hf, _, ours = pair
    ids = ids_(2, 11, seed=2)
    got = ours_cached(ours, ids, p)
    with torch.no_grad():
        full = ours(ids)
    assert_close(got, hf_cached(hf, ids, p), **TOL)
    assert_close(got, full, **TOL)


def test_multi_token_forwards_on_a_filled_cache(pair):
    """Prefill in pieces (Mamba scan from a carried state, attention with an offset causal mask)."""
    _, _, ours = pair
    ids = ids_(2, 13, seed=3)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache()
        parts = [ours(ids[:, a:b], cache=cache) for a, b in ((0, 3), (3, 9), (9, 10), (10, 13))]
    assert_close(torch.cat(parts, 1), full, **TOL)


def test_greedy_generate_matches_transformers(pair):
    hf, _, ours = pair
    ids = ids_(2, 5, seed=5)
    with torch.no_grad():
        out = hf.generate(
            ids,
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    seq = out.sequences
    ref = torch.stack(out.logits, 1)  # [b, 6, vocab]: the logits that chose each new token
    got = ours_cached(ours, seq, 5)[:, 4:-1]
    assert_close(got, ref, **TOL)
    assert torch.equal(got.argmax(-1), seq[:, 5:])


# ------------------------------------------------------------------------------------------ export
def test_round_trip_exact(pair, tmp_path):
    hf, d, ours = pair
    assert hf.config.model_type == "nemotron_h"
    assert_round_trip_exact(hf, d, ours, tmp_path / "rt", ids_(2))


def test_transformers5_in_memory_layout(pair, tmp_path):
    """`model.` prefix and stacked experts (hf.state_dict()), written by hand."""
    hf, _, ours = pair
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.") for k in sd)
    if "E" in ours.cfg.pattern:
        assert any(k.endswith("mixer.experts.up_proj") for k in sd)
    d = tmp_path / "mem"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    hf.config.to_json_file(str(d / "config.json"))
    loaded = nestlm.from_hf(d)
    assert loaded.cfg == ours.cfg
    ref = ours.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    ids = ids_(2)
    with torch.no_grad():
        assert_close(loaded(ids), hf(ids).logits, **TOL)


# ------------------------------------------------------------------------------------------ tied embeddings
@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tied checkpoint as it exists on disk: tie_word_embeddings=True and lm_head.weight == embeddings.
    (transformers 5.23's NemotronHForCausalLM never ties: it keeps and saves lm_head.weight separately.)"""
    hf = hf_model(tie_word_embeddings=True)
    with torch.no_grad():
        hf.lm_head.weight.copy_(hf.model.embeddings.weight)
    d = tmp_path_factory.mktemp("tied")
    hf.save_pretrained(d)
    return hf, d, nestlm.from_hf(d)


def test_tied_logits_and_decoding(tied):
    hf, _, ours = tied
    ids = ids_(2, 11)
    with torch.no_grad():
        ref = hf(ids).logits
        assert_close(ours(ids), ref, **TOL)
    assert_close(ours_cached(ours, ids, 4), hf_cached(hf, ids, 4), **TOL)


def test_tied_round_trip_loads_in_transformers(tied, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, d, ours = tied
    out = nestlm.to_hf(ours, tmp_path / "rt")
    a, b = load_file(d / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b)  # transformers' NemotronH needs lm_head.weight on disk even when "tied"
    for k in a:
        assert torch.equal(a[k], b[k]), k
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = ids_(2)
    with torch.no_grad():
        assert_close(back(ids).logits, hf(ids).logits, **TOL)


def test_tied_config_with_distinct_lm_head_follows_transformers(tmp_path):
    """tie_word_embeddings=True but lm_head.weight != embeddings in the file: transformers (which never ties
    Nemotron-H) uses lm_head.weight, so nestlm must too rather than silently dropping it."""
    hf = hf_model(seed=3, tie_word_embeddings=True)
    assert not torch.equal(hf.lm_head.weight, hf.model.embeddings.weight)
    hf.save_pretrained(tmp_path)
    ours = nestlm.from_hf(tmp_path)
    ids = ids_(1, 7)
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, **TOL)
