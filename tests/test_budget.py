"""Budget control (nestlm.inference.two_phase): two-phase generation against hand-run phases, cache transplant against
the target submodel's own prefill, and the synthetic reasoning task (nestlm.data.reasoning) against Python's eval."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tiny_hybrid_config

import nestlm
from nestlm.arch import SubArch
from nestlm.data import ByteTokenizer
from nestlm.data.reasoning import (
    Problem,
    TaskConfig,
    encode_examples,
    format_example,
    format_prompt,
    format_trace,
    parse_answer,
    sample_problems,
    score,
)
from nestlm.inference.generate import Sampling, decode, generate, prefill
from nestlm.inference.text import think_answer
from nestlm.inference.two_phase import Standalone, generate_two_phase, transplant_cache
from nestlm.model.config import ConfigError

VOCAB = 64
# S: narrower everywhere (hidden, query heads, KV groups, Mamba heads, FFN, experts); same blocks
S = SubArch(hidden=24, attn_kv_heads=1, attn_heads_per_group=1, mamba_heads_per_group=2, ffn=32, moe_ffn=8,
            shared_ffn=12, experts=3)


def hybrid(pattern: str = "M*-EM*E-", seed: int = 0, vocab: int = VOCAB) -> nestlm.Decoder:
    cfg = tiny_hybrid_config(vocab_size=vocab, pattern=pattern)
    return randomize_(nestlm.Decoder(cfg).init_weights(seed), seed).eval()


def prompt(t: int = 6, seed: int = 0, b: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def first_end(tokens: list[int], tag: list[int]) -> int | None:
    """Length of the shortest prefix of `tokens` that ends with `tag` (slow reference), None if none."""
    for n in range(len(tag), len(tokens) + 1):
        if tokens[n - len(tag):n] == tag:
            return n
    return None


@torch.no_grad()
def uncached(model, ids, n, sub=None):
    for _ in range(n):
        ids = torch.cat([ids, model(ids, sub=sub)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


# ---------------------------------------------------------------------------------------------- decode
def test_decode_with_stop_sequence_matches_uncached_rows():
    model = hybrid(seed=1)
    ids = prompt(7, seed=1, b=3)
    free = uncached(model, ids, 12, sub=S)[:, 7:]  # [3, 12], the uncached reference
    tag = free[1, 3:5].tolist()  # row 1 writes it by step 5 at the latest
    cache = model.new_cache()
    new = decode(model, prefill(model, ids, cache, S), cache, 12, S, stop_sequences=[tag])
    ends = [first_end(free[r].tolist(), tag) or 12 for r in range(3)]
    assert new.shape[1] == max(ends)  # stops once every row ended
    for r in range(3):
        assert torch.equal(new[r, : ends[r]], free[r, : ends[r]])
        assert (new[r, ends[r]:] == free[r, ends[r] - 1]).all()  # a finished row repeats its last token
    assert cache.pos == 7 + new.shape[1] - 1  # every token but the last is in the cache


# ---------------------------------------------------------------------------------------------- two phases
def test_switch_at_the_tag_and_s_to_l_equals_phases_by_hand():
    model = hybrid(seed=2)
    ids = prompt(6, seed=2)
    free = uncached(model, ids, 16, sub=S)[0, 6:].tolist()
    tag = free[6:9]
    n = first_end(free, tag)  # <= 9 (maybe earlier if the tag also appears before)
    stop = next(t for t in range(VOCAB) if t not in free[:n])  # a stop token, not met while thinking
    res = generate_two_phase(model, ids, S, None, 16, 10, tag, stop_tokens=[stop])
    assert res.ended_by == "tag" and res.think_len == n and res.forced_len == 0
    assert res.think_ids.tolist() == free[:n]
    alt = generate_two_phase(model, ids, S, None, 16, 10, [[VOCAB - 1], torch.tensor(tag).tolist()], stop_tokens=stop)
    assert torch.equal(alt.tokens, res.tokens)  # alternative tokenizations of the tag: the one written ends it
    # by hand: S thinks (stopping at the tag), then the full model re-reads prompt + trace and answers
    think = generate(model, ids, 16, sub=S, stop_sequences=[tag])
    assert torch.equal(think[0, 6:], torch.tensor(free[:n]))
    answer = generate(model, think, 10, stop_tokens=[stop])
    assert torch.equal(res.tokens, answer)
    assert res.answer_len == answer.shape[1] - think.shape[1] and res.switch == "reprefill"
    assert torch.equal(res.answer_ids, answer[0, think.shape[1]:])


def test_a_tag_the_budget_cuts_midway_is_completed_not_repeated():
    """Thinking that runs out while writing the tag ends with the tag's first tokens: the budget appends only
    the rest (rest_of_tag), so the answer model reads one whole tag."""
    from nestlm.inference.two_phase import rest_of_tag

    model = hybrid(seed=3)
    ids = prompt(5, seed=3)
    free = uncached(model, ids, 12, sub=S)[0, 5:].tolist()
    x = next(t for t in range(VOCAB) if t not in free)
    tag = [free[3], x]  # S writes the tag's first token as its 4th, and never the whole tag
    res = generate_two_phase(model, ids, S, None, 4, 6, tag)
    assert res.ended_by == "budget" and res.think_len == 4 and res.forced_len == 1
    assert res.think_ids.tolist() == free[:4] + [x]  # not free[:4] + tag: no half tag before a whole one
    assert torch.equal(res.tokens, generate(model, torch.cat([ids, torch.tensor([free[:4] + [x]])], dim=1), 6))
    assert rest_of_tag("4</th", "</think>") == "ink>" and rest_of_tag("4<", "</think>") == "/think>"
    assert rest_of_tag("a<b", "</think>") == "</think>" and rest_of_tag("", "</think>") == "</think>"
    assert rest_of_tag([1, 2, 7], [7, 8, 9]) == [8, 9]


def test_switch_at_the_budget_appends_the_tag():
    model = hybrid(seed=3)
    ids = prompt(5, seed=3)
    free = uncached(model, ids, 12, sub=S)[0, 5:].tolist()
    tag = [t for t in range(VOCAB) if t not in free][:2]  # never written: thinking runs to the budget
    res = generate_two_phase(model, ids, S, None, 4, 6, tag)
    assert res.ended_by == "budget" and res.think_len == 4 and res.forced_len == 2
    assert res.think_ids.tolist() == free[:4] + tag
    expect = generate(model, torch.cat([ids, torch.tensor([free[:4] + tag])], dim=1), 6)
    assert torch.equal(res.tokens, expect)
    # budget 0: no thinking at all, the full model answers after prompt + tag
    zero = generate_two_phase(model, ids, S, None, 0, 6, tag)
    assert zero.think_len == 0 and zero.switch == "prefill"
    assert torch.equal(zero.tokens, generate(model, torch.cat([ids, torch.tensor([tag])], dim=1), 6))


def test_stop_token_while_thinking_ends_generation():
    model = hybrid(seed=4)
    ids = prompt(5, seed=4)
    free = uncached(model, ids, 10, sub=S)[0, 5:].tolist()
    res = generate_two_phase(model, ids, S, None, 10, 5, [VOCAB - 1] * 4, stop_tokens=[free[2]])
    k = free.index(free[2]) + 1
    assert res.ended_by == "stop" and res.think_len == k and res.answer_len == 0
    assert res.tokens[0, 5:].tolist() == free[:k]


def test_same_submodel_continues_and_matches_one_generate():
    model = hybrid(seed=5)
    ids = prompt(6, seed=5)
    tag = [VOCAB - 1, VOCAB - 2, VOCAB - 3]
    for sw in ("reprefill", "transplant"):
        res = generate_two_phase(model, ids, S, S, 7, 5, tag, switch=sw)
        assert res.switch == "continue"
        free = uncached(model, ids, 7, sub=S)
        if res.ended_by == "budget":
            free = torch.cat([free, torch.tensor([tag])], dim=1)
        torch.testing.assert_close(res.tokens, uncached(model, free, 5, sub=S))


def test_seeded_sampling_is_reproducible_and_callback_streams_phases():
    model = hybrid(seed=6)
    ids = prompt(4, seed=6)
    seen = []
    a = generate_two_phase(model, ids, S, None, 6, 4, [1, 2, 3], sampling=Sampling(1.0, seed=7),
                           callback=lambda tok, phase: seen.append((int(tok[0]), phase)))
    b = generate_two_phase(model, ids, S, None, 6, 4, [1, 2, 3], sampling=Sampling(1.0, seed=7))
    assert torch.equal(a.tokens, b.tokens)
    assert [t for t, _ in seen] == a.tokens[0, 4:].tolist()
    phases = [p for _, p in seen]
    assert phases == ["think"] * a.think_len + ["forced"] * a.forced_len + ["answer"] * a.answer_len


def test_bad_inputs():
    model = hybrid()
    with pytest.raises(ValueError, match="one prompt"):
        generate_two_phase(model, prompt(4, b=2), S, None, 3, 3, [1])
    with pytest.raises(ConfigError, match="switch"):
        generate_two_phase(model, prompt(4), S, None, 3, 3, [1], switch="magic")
    with pytest.raises(ValueError, match="end_think"):
        generate_two_phase(model, prompt(4), S, None, 3, 3, [])


# ---------------------------------------------------------------------------------------------- transplant
def test_transplant_to_the_same_submodel_is_exact_and_leaves_the_source():
    model = hybrid(seed=7)
    ids = prompt(9, seed=7)
    cache = model.new_cache()
    logits = prefill(model, ids, cache, S)
    copy = transplant_cache(model, cache, S)
    a = decode(model, logits, copy, 8, S)
    b = decode(model, logits, cache, 8, S)
    assert torch.equal(a, b)  # the copy decodes exactly like the original
    # to the full model and back: S's heads come back untouched
    back = transplant_cache(model, transplant_cache(model, cache, None), S)
    for i, st in cache.layers.items():
        for key, v in st.items():
            if key in ("k", "v"):
                assert torch.equal(back.layers[i][key], v[:, :, : st["len"]])
            elif key != "len":
                assert torch.equal(back.layers[i][key], v)


@pytest.mark.parametrize("pattern, sub", [
    ("M*-E", SubArch(hidden=32, mamba_heads_per_group=2)),  # layer 0 is Mamba: same input in S and L
    ("*M-E", SubArch(hidden=32, attn_kv_heads=1, attn_heads_per_group=1)),  # layer 0 is attention
])
def test_transplant_first_block_equals_the_target_own_prefill(pattern, sub):
    """Block 0 sees the same embeddings in S and L (same hidden width), so the states of the heads both
    keep are the ones L's own prefill computes; the heads S lacks are zeros."""
    model = hybrid(pattern, seed=8)
    ids = prompt(9, seed=8)
    cs, cl = model.new_cache(), model.new_cache()
    prefill(model, ids, cs, sub)
    prefill(model, ids, cl, None)
    moved = transplant_cache(model, cs, None)
    assert moved.pos == cl.pos == 9 and moved.sub == model.resolve(None)
    got, ref = moved.layers[0], cl.layers[0]
    if pattern[0] == "M":
        g, m = 2, 2  # groups, heads kept per group (of 4)
        ssm = got["ssm"].unflatten(1, (g, 4))  # [b, g, 4, p, n]
        torch.testing.assert_close(ssm[:, :, :m], ref["ssm"].unflatten(1, (g, 4))[:, :, :m])
        assert (ssm[:, :, m:] == 0).all()
        hp = 8 * 4  # x channels of all heads
        xs, xr = got["conv"][:, :hp].unflatten(1, (g, 4, 4)), ref["conv"][:, :hp].unflatten(1, (g, 4, 4))
        torch.testing.assert_close(xs[:, :, :m], xr[:, :, :m])
        assert (xs[:, :, m:] == 0).all()
        torch.testing.assert_close(got["conv"][:, hp:], ref["conv"][:, hp:])  # B, C: whole groups
    else:
        n = ref["len"]
        torch.testing.assert_close(got["k"][:, :1], ref["k"][:, :1, :n])
        torch.testing.assert_close(got["v"][:, :1], ref["v"][:, :1, :n])
        assert (got["k"][:, 1:] == 0).all() and (got["v"][:, 1:] == 0).all()
    # and it decodes: same shapes as L's own cache
    out = decode(model, prefill(model, ids[:, -1:], moved, None), moved, 3)
    assert out.shape == (1, 3)


def test_transplant_two_phase_runs_and_refuses_dropped_stateful_blocks():
    model = hybrid(seed=9)
    ids = prompt(6, seed=9)
    res = generate_two_phase(model, ids, S, None, 6, 4, [VOCAB - 1] * 3, switch="transplant")
    assert res.switch == "transplant" and res.think_ids.tolist()[:6] == uncached(model, ids, 6, S)[0, 6:].tolist()
    cache = model.new_cache()
    prefill(model, ids, cache, SubArch(layers=(0, 1, 2, 3, 5, 6, 7)))  # drops block 4 (Mamba)
    with pytest.raises(ConfigError, match=r"blocks \[4\]"):
        transplant_cache(model, cache, None)
    dropped_mlp = model.new_cache()
    prefill(model, ids, dropped_mlp, SubArch(layers=(0, 1, 3, 4, 5, 6, 7)))  # drops block 2 (MLP): no state
    moved = transplant_cache(model, dropped_mlp, None)
    assert sorted(moved.layers) == [0, 1, 4, 5]  # the stateful blocks (M * M *)
    assert decode(model, prefill(model, ids[:, -1:], moved, None), moved, 2).shape == (1, 2)


@pytest.mark.parametrize("think, answer, switch", [
    (S, None, "reprefill"), (S, None, "transplant"),
    (None, SubArch(hidden=24, mamba_heads_per_group=2, layers=(0, 1, 2, 3, 5, 6, 7)), "transplant"),  # L→S, S drops block 4
])
def test_standalone_submodels_match_the_sliced_elastic_model(think, answer, switch):
    model = hybrid(seed=11)
    ids = prompt(7, seed=11)
    tag = [VOCAB - 1, VOCAB - 2]
    ref = generate_two_phase(model, ids, think, answer, 9, 6, tag, switch=switch)
    fast = Standalone(model)
    got = generate_two_phase(fast, ids, think, answer, 9, 6, tag, switch=switch)
    assert torch.equal(got.tokens, ref.tokens) and got.switch == ref.switch == switch
    cache = model.new_cache()  # the standalone caches are the elastic model's, block for block
    cs = fast.new_cache()
    prefill(model, ids, cache, answer)
    prefill(fast, ids, cs, answer)
    assert cs.sub == cache.sub and {k for k, v in cs.layers.items() if v} == {k for k, v in cache.layers.items() if v}
    for i, st in cs.layers.items():
        for key, v in st.items():
            torch.testing.assert_close(v, cache.layers[i][key], atol=1e-5, rtol=1e-5)


def write_elastic(path, seed: int) -> ByteTokenizer:
    """A random hybrid exported as an elastic checkpoint (budgets full and 70%) with the byte tokenizer."""
    from nestlm.elastic.artifact import export
    from nestlm.elastic.config import ElasticConfig
    from nestlm.elastic.router import Router

    tok = ByteTokenizer()
    model = hybrid("M*-M", seed=seed, vocab=tok.vocab_size)
    ecfg = ElasticConfig(budgets=[1.0, 0.7], align=4, choices={"hidden": [1.0, 0.75], "mamba_heads_per_group": [1.0, 0.5]},
                         router_hidden=4, steps=1, sort=False)
    export(model, Router(model.cfg, ecfg), ecfg, path)
    tok.save(path)
    return tok


def test_think_answer_from_an_elastic_checkpoint(tmp_path, capsys):
    tok = write_elastic(tmp_path, seed=10)
    res = think_answer(tmp_path, "Q:1+2=?\n<think>", think_budget="70%", answer_budget="full", max_think=5,
                       max_answer=4)
    printed = capsys.readouterr().out
    assert printed.startswith("Q:1+2=?\n<think>")
    back, _, manifest = nestlm.load_elastic(tmp_path)
    s = SubArch.from_dict(manifest["budgets"]["70%"]["sub"])
    ref = generate_two_phase(back, torch.tensor([tok.encode("Q:1+2=?\n<think>", bos=True)]), s, None, 5, 4,
                             tok.encode("</think>"), stop_tokens=tok.eos_id)
    assert torch.equal(res.tokens, ref.tokens)
    # bytes that never make a whole character are left out, not printed as U+FFFD (issue 15)
    assert printed.rstrip("\n").endswith(tok.decode(res.tokens[0, res.prompt_len:]).replace("\ufffd", ""))
    assert "\ufffd" not in printed
    again = think_answer(tmp_path, "Q:1+2=?\n<think>", think_budget="0.7", max_think=5, max_answer=4, stream=False)
    assert torch.equal(again.tokens, res.tokens)  # a fraction names the same budget
    with pytest.raises(ConfigError, match="no budget"):
        think_answer(tmp_path, "x", think_budget="33%", stream=False)


# ---------------------------------------------------------------------------------------------- the task
def test_problems_are_deterministic_correct_and_split():
    task = TaskConfig(terms=(3, 7), digits=2)
    a = sample_problems(task, 300, seed=1)
    assert a == sample_problems(task, 300, seed=1)
    assert a != sample_problems(task, 300, seed=2)
    test = sample_problems(task, 100, seed=1, split="test")
    assert not {p.expression for p in a} & {p.expression for p in test}
    for p in a + test:
        assert 3 <= len(p.terms) <= 7 and all(0 <= t < 100 for t in p.terms)
        assert p.answer == eval(_no_leading_zeros(p.expression)) % 100  # Python's own arithmetic
        assert parse_answer(format_example(p)) == p.answer and score(p, format_example(p))
        steps = format_trace(p).split(" ")
        assert len(steps) == len(p.terms) - 1 and steps[-1].endswith("=" + p.num(p.answer))


def _no_leading_zeros(expr: str) -> str:
    """'07+58*00' -> '7+58*0' (Python reads 07 as a syntax error)."""
    import re

    return re.sub(r"\b0+(\d)", r"\1", expr)


def test_example_format_and_parse():
    p = Problem(terms=(3, 5, 9, 2), ops=("+", "-", "+"), digits=1)
    assert format_example(p) == "Q:3+5-9+2=?\n<think>3+5=8 8-9=9 9+2=1</think>A:1"
    assert format_prompt(p) == "Q:3+5-9+2=?\n<think>"
    assert parse_answer("3+5=8</think>A:42") == 42
    assert parse_answer("A:7 ... </think>A: 05") == 5  # the answer after the last tag
    assert parse_answer("</think>A:") is None and parse_answer("no answer") is None
    assert not score(p, "</think>A:2")
    with pytest.raises(ConfigError, match="terms"):
        TaskConfig(terms=(1, 3))
    with pytest.raises(ConfigError, match="ops"):
        TaskConfig(ops="/")


def test_encode_examples_masks_the_question():
    tok = ByteTokenizer()
    probs = sample_problems(TaskConfig(), 5, seed=3)
    ids, mask = encode_examples(probs, tok)
    assert ids.shape == mask.shape
    for i, p in enumerate(probs):
        row = ids[i].tolist()
        assert row[0] == tok.bos_id
        assert tok.decode(row) == format_example(p)
        targets = [t for t, m in zip(row, mask[i].tolist(), strict=True) if m]
        assert tok.decode(targets) == format_example(p)[len(format_prompt(p)):] and targets[-1] == tok.eos_id
    with pytest.raises(ConfigError, match="seq_len"):
        encode_examples(probs, tok, seq_len=10)


def test_cli_generate_with_budget_control(tmp_path, capsys):
    """`nestlm generate ELASTIC --think-budget 70%` streams what think_answer computes; a bad budget exits 2."""
    from nestlm.cli import main

    tok = write_elastic(tmp_path, seed=11)
    ref = think_answer(tmp_path, "Q:3+4=?\n<think>", think_budget="70%", max_think=6, max_answer=5, stream=False,
                       transplant=True)
    assert main(["generate", str(tmp_path), "--prompt", "Q:3+4=?\n<think>", "--think-budget", "70%",
                 "--max-think", "6", "--max-new-tokens", "5", "--transplant"]) == 0
    out, err = capsys.readouterr()
    # the prompt (after <bos>) and every new token; bytes that make no character are left out (issue 15)
    assert out.rstrip("\n") == tok.decode(ref.tokens[0, 1:]).replace("\ufffd", "")
    assert "on 70%" in err and "transplant" in err
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tmp_path), "--prompt", "x", "--think-budget", "33%"])
    assert e.value.code == 2 and "no budget" in capsys.readouterr().err
