"""lm-evaluation-harness on local jsonl items, per budget of an elastic checkpoint: lm-eval (plain transformers
on the sliced checkpoint) must score every choice exactly as our elastic model does at that SubArch."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_slicing_stream import make_elastic

from nestlm import ConfigError
from nestlm.data import ByteTokenizer
from nestlm.elastic.artifact import resolve_budget
from nestlm.evaluate import evaluate, jsonl_task

pytestmark = pytest.mark.usefixtures("one_thread")

ITEMS = [
    {"query": "In the beginning God created", "choices": [" the heaven and the earth.", " a cat."], "gold": 0},
    {"query": "And God said, Let there be", "choices": [" light", " pizza", " darkness"], "gold": 0},
    {"query": "The LORD is my", "choices": [" shepherd", " spreadsheet"], "gold": 0},
]


def write_items(path, items=ITEMS):
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


def our_loglikelihoods(model, sub, items) -> list[list[float]]:
    """Sum of log p(choice tokens | query) under our model at `sub`: the independent reference."""
    tok = ByteTokenizer()
    out = []
    with torch.no_grad():
        for it in items:
            q = tok.encode(it["query"])
            row = []
            for c in it["choices"]:
                ids = torch.tensor([q + tok.encode(c)])
                logp = F.log_softmax(model(ids[:, :-1], sub=sub).float(), -1)[0]  # [t - 1, V]
                tgt = ids[0, 1:]
                row.append(float(logp.gather(-1, tgt[:, None])[len(q) - 1:].sum()))
            out.append(row)
    return out


def test_lm_eval_on_local_jsonl_matches_our_loglikelihoods(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    import nestlm
    from nestlm.evaluate import lm_eval_scores
    from nestlm.slicing import slice as slice_

    src = make_elastic(tmp_path, "llama")
    model = nestlm.from_hf(src)
    items = write_items(tmp_path / "kjv_mc.jsonl")
    for budget in ("full", "50%"):
        _, sub = resolve_budget(src, budget)
        hf_dir = src if budget == "full" else slice_(src, budget, tmp_path / "cut")
        got = lm_eval_scores(hf_dir, [str(items)], samples=True)
        ref = our_loglikelihoods(model, sub, ITEMS)
        assert len(got["_samples"]["kjv_mc"]) == len(ref)
        for g, r in zip(got["_samples"]["kjv_mc"], ref, strict=True):
            torch.testing.assert_close(torch.tensor(g), torch.tensor(r), atol=2e-4, rtol=1e-5)
        acc = sum(max(range(len(r)), key=r.__getitem__) == it["gold"] for r, it in zip(ref, ITEMS, strict=True))
        assert got["kjv_mc"]["acc,none"] == pytest.approx(acc / len(ITEMS))

    rows = evaluate(src, seq_len=16, max_windows=1, budgets=["50%"], lm_eval_tasks=[str(items)])
    assert [r["name"] for r in rows] == ["parent", "50%"]
    assert all("acc,none" in r["lm_eval"]["kjv_mc"] for r in rows)


@pytest.mark.parametrize("lines, match", [
    (["{not json"], r"kjv\.jsonl:1: not JSON"),
    ([json.dumps({"query": "a", "choices": ["b"], "gold": 0})], r":1: need"),
    ([json.dumps(ITEMS[0]), json.dumps({"query": "a", "choices": ["b", "c"], "gold": 2})], r":2: need"),
    ([""], "no items"),
])
def test_jsonl_task_rejects_malformed_items(tmp_path, lines, match):
    p = tmp_path / "kjv.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=match):
        jsonl_task(p)


def test_jsonl_task_config(tmp_path):
    task = jsonl_task(write_items(tmp_path / "items.jsonl"), name="mine")
    assert task["task"] == "mine" and task["output_type"] == "multiple_choice"
    assert task["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "items.jsonl").resolve())
