"""Training on early-cut thinking (nestlm.data.reasoning.cut_points, encode_examples(keep=...)): the rows budget-
controlled reasoning models are trained on, so that a parent can answer after a trace cut by a thinking cap."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from nestlm.data import ByteTokenizer
from nestlm.data.reasoning import (
    Problem,
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
from nestlm.errors import ConfigError
from nestlm.load import from_hf

ROOT = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------------------------------------- the recipe's curriculum
def _recipe():
    spec = importlib.util.spec_from_file_location("reasoning_elastic_recipe", ROOT / "recipes" / "reasoning_elastic.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


TINY_MODEL = {"hidden_size": 32, "pattern": "M*-", "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
              "intermediate_size": 64, "mamba_heads": 4, "mamba_head_dim": 8, "mamba_groups": 1, "ssm_state": 8,
              "chunk_size": 16}


def _config(tmp_path, **finetune):
    raw = {"task": {"terms": [3, 4], "digits": 2}, "model": TINY_MODEL,
           "pretrain": {"steps": 3, "batch": 16, "lr": 0.003, "warmup": 1, "checkpoint_every": 2}}
    if finetune:
        raw["finetune"] = finetune
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cut_rows(ids, tok) -> int:
    """Rows that are not their question's whole worked example."""
    n = 0
    for row in ids.tolist():
        text = tok.decode(row)
        expr = re.match(r"Q:([\d+-]+)=\?", text).group(1)
        p = Problem(tuple(int(x) for x in re.findall(r"\d+", expr)), tuple(re.findall(r"[+-]", expr)), 2)
        n += text != format_example(p)
    return n


def test_cut_examples_appear_only_in_the_finetune(tmp_path):
    r, tok = _recipe(), ByteTokenizer()
    cfg = r.load_config(_config(tmp_path, steps=4, lr=0.001, cut_share=0.5))
    pre, fine = cfg["pretrain"], cfg["finetune"]
    assert (fine.batch, fine.seed, fine.checkpoint_every, fine.warmup) == (pre.batch, pre.seed, 2, 1)  # inherited
    assert (fine.steps, fine.lr, fine.cut_share, pre.cut_share) == (4, 0.001, 0.5, 0.0)
    assert [(name, start) for name, start, _ in r.phases(cfg)] == [("pretrain", 0), ("finetune", 3)]
    for step in range(3):
        assert r.phase_at(cfg, step) is pre and _cut_rows(r.batch_at(cfg, step)[0], tok) == 0
    for step in range(3, 7):
        assert r.phase_at(cfg, step) is fine
        ids, mask = r.batch_at(cfg, step)
        assert 0 < _cut_rows(ids, tok) < 16
        ref = r.train_batch(cfg["task"], step, 16, 0, 0.5)
        assert (ids == ref[0]).all() and (mask == ref[1]).all()
    assert not (r.batch_at(cfg, 3)[0] == r.batch_at(cfg, 0)[0]).all()  # the fine-tune draws other problems
    plain = r.load_config(_config(tmp_path))
    assert plain["finetune"] is None and [name for name, _, _ in r.phases(plain)] == ["pretrain"]
    assert all(_cut_rows(r.batch_at(plain, s)[0], tok) == 0 for s in range(3, 7))
    with pytest.raises(ConfigError, match="finetune keys"):
        r.load_config(_config(tmp_path, steps=4, batch=8))
    with pytest.raises(ConfigError, match="cut_share"):
        r.load_config(_config(tmp_path, steps=4, cut_share=1.0))


def test_finetune_stage_continues_from_the_pretrained_parent(tmp_path):
    r = _recipe()
    cfg = r.load_config(_config(tmp_path, steps=2, lr=0.001, cut_share=0.3))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="pretraining finished"):
        r.train_stage(cfg, out, "finetune")
    assert r.train_stage(cfg, out, "pretrain") == out / "parent"
    assert r.train_stage(cfg, out, "finetune") == out / "parent_cut"
    assert r.final_parent(cfg, out) == ("finetune", out / "parent_cut")
    logs = {k: json.loads((out / w / "loss.json").read_text()) for k, (w, _) in r.STAGES.items()}
    assert len(logs["pretrain"]) == 3 and len(logs["finetune"]) == 2
    pre = from_hf(out / "parent").state_dict()
    fine = from_hf(out / "parent_cut").state_dict()
    assert pre.keys() == fine.keys() and any(not torch.equal(pre[k], fine[k]) for k in pre)
