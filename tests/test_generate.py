"""Cached generation (nestlm.generate) against an uncached argmax loop, transformers, and extracted submodels."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tiny_hybrid_config, tiny_nemotron_h_config

import nestlm
from nestlm.arch import SubArch
from nestlm.inference.generate import Sampling, decode_one_token, generate, prefill, sample
from nestlm.model.extract import extract

VOCAB = 64


def hybrid_model(seed: int = 0) -> nestlm.Decoder:
    cfg = tiny_hybrid_config(vocab_size=VOCAB, pattern="M*-EM*E-")
    return randomize_(nestlm.Decoder(cfg).init_weights(seed), seed).eval()


def llama_model(seed: int = 0) -> nestlm.Decoder:
    cfg = nestlm.ModelConfig(
        vocab_size=VOCAB, hidden_size=32, pattern="*-*-", family="llama", num_heads=4, num_kv_heads=2,
        head_dim=8, rope_theta=10000.0, intermediate_size=48, mlp_act="swiglu")
    return randomize_(nestlm.Decoder(cfg).init_weights(seed), seed).eval()


def prompt(b: int = 2, t: int = 7, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def uncached_greedy(model, ids, n, sub=None):
    for _ in range(n):
        nxt = model(ids, sub=sub)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("make", [hybrid_model, llama_model], ids=["hybrid", "llama"])
def test_greedy_matches_uncached_loop(make):
    model = make()
    ids = prompt(2, 9)  # 9 > chunk_size: the prefill scan crosses chunks
    out = generate(model, ids, 13)
    assert out.shape == (2, 9 + 13)
    assert torch.equal(out, uncached_greedy(model, ids, 13))


def test_prefill_and_decode_logits_match_full_forward():
    model = hybrid_model(1)
    ids = prompt(3, 10, seed=1)
    with torch.no_grad():
        full = model(ids)  # [b, t, v]
    cache = model.new_cache()
    logits = prefill(model, ids[:, :6], cache)
    assert logits.shape == (3, VOCAB) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, full[:, 5], atol=1e-4, rtol=1e-4)
    for i in range(6, 10):
        logits = decode_one_token(model, ids[:, i:i + 1], cache)
        torch.testing.assert_close(logits, full[:, i], atol=1e-4, rtol=1e-4)
    assert cache.pos == 10


def test_greedy_matches_transformers_nemotron_h(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = randomize_(transformers.NemotronHForCausalLM(tiny_nemotron_h_config()).eval(), 3)
    hf.save_pretrained(tmp_path)
    model = nestlm.from_hf(tmp_path)
    ids = prompt(2, 7, seed=3, vocab=96)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                          min_new_tokens=12, pad_token_id=0)
    assert torch.equal(generate(model, ids, 12), ref)


def test_stop_tokens_pad_finished_rows_and_stop_early():
    model = hybrid_model(2)
    ids = prompt(3, 5, seed=2)
    free = generate(model, ids, 10)[:, 5:]  # [3, 10]
    stop = int(free[0, 2])  # row 0 emits it at step 2 (maybe other rows do too, maybe earlier)
    out = generate(model, ids, 10, stop_tokens=[stop])
    gen = out[:, 5:]
    for r in range(3):
        hits = (free[r] == stop).nonzero()
        if len(hits):
            j = int(hits[0])
            assert torch.equal(gen[r, : j + 1], free[r, : j + 1])
            assert (gen[r, j:] == stop).all()  # keeps emitting the stop token as padding
        else:
            assert torch.equal(gen[r], free[r, : gen.shape[1]])
    firsts = [int((free[r] == stop).nonzero()[0]) if (free[r] == stop).any() else 10 for r in range(3)]
    assert gen.shape[1] == min(max(firsts) + 1, 10)  # ends as soon as every row stopped

    single = generate(model, ids[:1], 10, stop_tokens=stop)  # an int works too
    assert single.shape[1] == 5 + firsts[0] + 1 and int(single[0, -1]) == stop


def test_batch_rows_match_single_row_generation():
    model = llama_model(4)
    ids = prompt(3, 6, seed=4)
    out = generate(model, ids, 8)
    for r in range(3):
        assert torch.equal(out[r:r + 1], generate(model, ids[r:r + 1], 8))


def test_callback_streams_every_step():
    model = hybrid_model()
    ids = prompt(2, 4)
    seen = []
    out = generate(model, ids, 6, callback=lambda tok: seen.append(tok.clone()))
    assert len(seen) == 6 and all(s.shape == (2,) for s in seen)
    assert torch.equal(torch.stack(seen, 1), out[:, 4:])


def test_seeded_sampling_is_reproducible():
    model = hybrid_model()
    ids = prompt(2, 4)
    a = generate(model, ids, 16, sampling=Sampling(1.0, top_k=20, seed=123))
    b = generate(model, ids, 16, sampling=Sampling(1.0, top_k=20, seed=123))
    c = generate(model, ids, 16, sampling=Sampling(1.0, seed=7))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, generate(model, ids, 16))  # sampling != greedy (16 tokens of 64)


def test_sample_greedy_and_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.0]])
    assert sample(logits).tolist() == [[1], [0]]
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits, Sampling(5.0, top_k=2), g) for _ in range(200)], dim=1)
    assert set(draws[0].tolist()) == {1, 3} and set(draws[1].tolist()) == {0, 3}


@pytest.mark.parametrize("make, sub", [
    (hybrid_model, SubArch(hidden=24, attn_kv_heads=1, attn_heads_per_group=1, mamba_heads_per_group=2, ffn=32,
                           moe_ffn=8, shared_ffn=12, experts=3, layers=(0, 1, 2, 3, 5, 6))),
    (llama_model, SubArch(hidden=16, attn_kv_heads=1, ffn=20, layers=(0, 1, 3))),
], ids=["hybrid", "llama"])
def test_subarch_generation_matches_extracted_submodel(make, sub):
    model = make(5)
    ids = prompt(2, 6, seed=5)
    out = generate(model, ids, 10, sub=sub)
    assert torch.equal(out, generate(extract(model, sub), ids, 10))
    assert torch.equal(out, uncached_greedy(model, ids, 10, sub=sub))


@pytest.mark.parametrize("pattern, rope", [("M*-E", None), ("*-*E", 1e4)])
@pytest.mark.parametrize("standalone", [False, True])
def test_rows_step_equals_each_sequence_alone(pattern, rope, standalone):
    """nestlm.model.decoder.Rows (the server's batched step): sequences of different lengths, each with its
    own cache, joining (prefilled in the same forward as the others' decoding tokens) and leaving between
    steps, get the logits (and greedy tokens) of each one decoded alone."""
    from nestlm.inference.two_phase import Standalone
    from nestlm.model.decoder import Rows

    cfg = tiny_hybrid_config(pattern=pattern, rope_theta=rope)  # Mamba, attention (RoPE: a position per row), MoE
    model = randomize_(nestlm.Decoder(cfg).init_weights(2), 2).eval()
    model = Standalone(model) if standalone else model
    sub = model.resolve(None)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 64, (1, n), generator=gen) for n in (3, 9, 1, 6)]
    steps = 5
    alone = []
    for p in prompts:  # the reference: batch 1, prefill then one token per step
        cache = model.new_cache()
        logits, seq = prefill(model, p, cache, sub), []
        for _ in range(steps):
            seq.append(logits)
            logits = decode_one_token(model, logits.argmax(-1, keepdim=True), cache, sub)
        alone.append(seq)
    # batched: sequence r joins at step r // 2, its prompt packed into the same forward as the other rows'
    # decoding tokens (Rows with lengths), and runs `steps` steps
    caches, logits, got = {}, {}, {r: [] for r in range(len(prompts))}
    for step in range(steps + 2):
        feed = []  # (row, its new tokens)
        for r in list(caches):
            if len(got[r]) < steps:
                got[r].append(logits[r])
                if len(got[r]) < steps:
                    feed.append((r, [int(logits[r].argmax())]))
        for r, p in enumerate(prompts):
            if r // 2 == step:
                caches[r] = model.new_cache()
                feed.append((r, p[0].tolist()))
        if not feed:
            continue
        ids = torch.tensor([[t for _, toks in feed for t in toks]])  # [1, T]
        with torch.inference_mode():
            out = model(ids, sub=sub, cache=Rows([caches[r] for r, _ in feed], [len(t) for _, t in feed]))[0]
        at = 0
        for r, toks in feed:
            at += len(toks)
            logits[r] = out[at - 1:at]  # [1, v]: the row's last position
    for r in range(len(prompts)):
        for a, b in zip(alone[r], got[r], strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
            assert int(a.argmax()) == int(b.argmax())
