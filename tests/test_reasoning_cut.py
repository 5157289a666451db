"""Training on early-cut thinking (nestlm.data.reasoning.cut_points, encode_examples(keep=...)): the rows budget-
controlled reasoning models are trained on, so that a parent can answer after a trace cut by a thinking cap."""

from __future__ import annotations

import random

from nestlm.data import ByteTokenizer
from nestlm.data.reasoning import (
    TaskConfig,
    cut_points,
    encode_examples,
    format_example,
    format_prompt,
    format_trace,
    parse_answer,
    sample_problems,
    score,
)


def test_cut_rows_keep_a_trace_prefix_and_the_right_answer():
    tok = ByteTokenizer()
    probs = sample_problems(TaskConfig(digits=2), 400, seed=4)
    keep = cut_points(probs, 0.3, random.Random(0))
    assert keep == cut_points(probs, 0.3, random.Random(0))  # deterministic in the generator
    cut = [k for k in keep if k is not None]
    assert 0.25 < len(cut) / len(keep) < 0.35
    assert all(0 <= k < len(format_trace(p)) for p, k in zip(probs, keep, strict=True) if k is not None)
    ids, mask = encode_examples(probs, tok, keep=keep)
    for i, (p, k) in enumerate(zip(probs, keep, strict=True)):
        text = tok.decode(ids[i].tolist())
        trace = format_trace(p) if k is None else format_trace(p)[:k]
        assert text == format_prompt(p) + trace + f"</think>A:{p.num(p.answer)}"
        assert text == format_example(p, k) and score(p, text) and parse_answer(text) == p.answer
        targets = [t for t, m in zip(ids[i].tolist(), mask[i].tolist(), strict=True) if m]
        assert tok.decode(targets) == text[len(format_prompt(p)):] and targets[-1] == tok.eos_id
    full, _ = encode_examples(probs, tok)
    same = encode_examples(probs, tok, keep=[None] * len(probs))[0]
    assert (full == same).all()  # no cuts: the rows as before
    assert cut_points(probs, 0.0, random.Random(0)) == [None] * len(probs)
