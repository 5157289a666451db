"""A reasoning parent (or any HF checkpoint of recipes/reasoning_elastic.py) on held-out problems, without a
server: greedy accuracy with free thinking and with thinking capped at k tokens ('</think>' forced, then the
answer), the check that a budget-control fine-tune keeps the full-trace accuracy and answers after a cut.

    python bench/reasoning_parent.py --model runs/fair19/parent --n 100 --caps 0 16 24 32 40

Prints one line per setting: accuracy (95% Wilson interval), trace exact (free thinking only), mean thinking
tokens, and the share of answers that parse at all. Then (--token-loss) the teacher-forced loss of the whole
examples by kind of target: in each step 'a op b = r', the digits of a, the operator, the digits of b, '=', each
digit of the result r1 (most significant) .. rd, the space; then the tags and the answer. A kind at ln 10 = 2.30
(a digit) or ln 2 = 0.69 (the operator) is not learned at all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import budget_control

from nestlm.data import ByteTokenizer
from nestlm.data.reasoning import (
    THINK_END,
    TaskConfig,
    encode_examples,
    format_answer,
    format_prompt,
    format_trace,
    parse_answer,
    sample_problems,
)
from nestlm.inference.two_phase import generate_two_phase
from nestlm.load import from_hf


def run_setting(model, tok: ByteTokenizer, problems, cap: int) -> dict:
    """Greedy think (at most `cap` tokens) then answer, per problem; the summary of one setting."""
    end = tok.encode(THINK_END)
    recs = []
    for p in problems:
        ids = torch.tensor([tok.encode(format_prompt(p), bos=True)])
        r = generate_two_phase(model, ids, None, None, cap, 8, end_think=end, stop_tokens=tok.eos_id)
        text = tok.decode(r.tokens[0, ids.shape[1]:].tolist())
        ans = parse_answer(text) if THINK_END in text else None
        recs.append({"correct": ans == p.answer, "parsed": ans is not None, "think": r.think_len,
                     "exact": text.split(THINK_END)[0] == format_trace(p)})
    k, n = sum(r["correct"] for r in recs), len(recs)
    lo, hi = budget_control.wilson(k, n)
    return {"cap": cap, "accuracy": k / n, "ci": [lo, hi], "trace_exact": statistics.mean(r["exact"] for r in recs),
            "think_tokens": statistics.mean(r["think"] for r in recs),
            "parsed": statistics.mean(r["parsed"] for r in recs)}


def target_kind(j: int, digits: int) -> str:
    """The kind of the trace's j-th character: 'a', 'op', 'b', '=', 'r1'..'r<digits>' or 'space'."""
    o = j % (3 * digits + 3)  # one step: a op b = r and a space
    if o < digits:
        return "a"
    if o == digits:
        return "op"
    if o <= 2 * digits:
        return "b"
    if o == 2 * digits + 1:
        return "="
    return f"r{o - 2 * digits - 1}" if o <= 3 * digits + 1 else "space"


def token_losses(model, tok: ByteTokenizer, problems) -> dict[str, float]:
    """Mean teacher-forced cross-entropy per kind of target over the whole examples of `problems`."""
    ids, _ = encode_examples(problems, tok)
    with torch.inference_mode():
        logits = model(ids[:, :-1])
    nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(problems), -1)
    acc: dict[str, list[float]] = defaultdict(list)
    for i, p in enumerate(problems):
        start = len(tok.encode(format_prompt(p), bos=True))  # the first target's index in ids
        trace = format_trace(p)
        kinds = [target_kind(j, p.digits) for j in range(len(trace))] + ["tag"] * len(THINK_END) + [
            "answer"] * (len(format_answer(p)) - len(THINK_END))
        for j, kind in enumerate(kinds):
            acc[kind].append(nll[i, start + j - 1].item())
    return {k: statistics.mean(v) for k, v in acc.items()}


def load_task(path: Path) -> TaskConfig:
    """The task from reasoning_task.json or a recipe config's task section; TaskConfig(digits=2) if no file."""
    if not path.is_file():
        return TaskConfig(digits=2)
    if path.suffix in (".yaml", ".yml"):
        return TaskConfig(**(yaml.safe_load(path.read_text()).get("task") or {}))
    return TaskConfig(**json.loads(path.read_text()))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="an HF checkpoint folder (RUN/parent)")
    ap.add_argument("--task", type=Path, default=None, help="reasoning_task.json or a recipe config YAML (its "
                    "task section); default: the run's elastic/reasoning_task.json, else TaskConfig(digits=2)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full-think", type=int, default=64)
    ap.add_argument("--caps", type=int, nargs="*", default=[0, 16, 24, 32, 40])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--token-loss", action="store_true", help="also the loss by kind of target")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = load_task(args.task or args.model.parent / "elastic" / "reasoning_task.json")
    problems = sample_problems(task, args.n, seed=args.seed, split="test")
    model, tok = from_hf(args.model).eval(), ByteTokenizer()
    rows = []
    for cap in [args.full_think, *args.caps]:
        r = run_setting(model, tok, problems, cap)
        rows.append(r)
        print(f"{args.model} think<={cap:>3}: accuracy {100 * r['accuracy']:5.1f} ({100 * r['ci'][0]:.0f}-"
              f"{100 * r['ci'][1]:.0f})  trace exact {100 * r['trace_exact']:3.0f}%  think tok "
              f"{r['think_tokens']:5.1f}  parsed {100 * r['parsed']:3.0f}%", flush=True)
    if args.token_loss:
        losses = token_losses(model, tok, problems)
        print("loss by target: " + "  ".join(f"{k} {v:.3f}" for k, v in losses.items()))
    return rows


if __name__ == "__main__":
    main()
