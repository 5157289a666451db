"""Budget control through `nestlm serve`: accuracy vs latency of think→answer configurations on the synthetic
reasoning task, every request a `/v1/completions` call to a live server on 127.0.0.1.

    python recipes/reasoning_elastic.py --config recipes/configs/reasoning_cutoff.yaml --out runs/cutoff
    python bench/budget_serve.py --run runs/cutoff --n 100

The configurations are bench/budget_control.py's (S, M, L: the smallest, middle and largest budgets):
L→L, M→M, S→S, M→L, S→L (re-prefill and transplant), and standard budget control "L trunc@k" (L thinks,
cut at k tokens, '</think>' appended, L answers), with S→L trunc@k beside it. Thinking is otherwise capped
at --full-think tokens (more than any trace needs). The request for "M→L trunc@k" is

    {"model": L, "think_model": M, "thinking_token_budget": k, "switch": "reprefill", "max_tokens": 8,
     "temperature": 0, "prompt": "Q:07+58-81=?\\n<think>"}

One client, requests one after another; the problems are the outer loop and the configurations the inner
one, so load drift hits every configuration alike. Latency is the client's wall time per request (HTTP
included), reported as the MEDIAN per configuration. The server runs each budget extracted (--extract, so a
small budget really is cheaper per step) on --threads torch threads. Rows marked * are Pareto-optimal in
(median latency, accuracy). Writes budget_serve.{md,json} into --out (default RUN/bench).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import budget_control

from nestlm.data.reasoning import TaskConfig, format_prompt, format_trace, parse_answer, sample_problems

DEFAULT_CONFIGS = ["L→L", "M→M", "S→S", "M→L", "S→L", "M→L transplant", "S→L transplant", "L trunc@*",
                   "S→L trunc@*"]


def post(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def ask(url: str, setup, prompt: str, max_answer: int) -> tuple[dict, float]:
    body = {"model": setup.answer, "think_model": setup.think, "thinking_token_budget": setup.max_think,
            "switch": setup.switch, "prompt": prompt, "max_tokens": max_answer, "temperature": 0}
    t0 = time.perf_counter()
    r = post(url, body)
    return r, time.perf_counter() - t0


def summarize(configs, rec: dict) -> list[dict]:
    rows = []
    for c in configs:
        rs = rec[c.name]
        k, n = sum(r["correct"] for r in rs), len(rs)
        lo, hi = budget_control.wilson(k, n)
        rows.append({"name": c.name, "think": c.think, "answer": c.answer, "max_think": c.max_think,
                     "switch": c.switch, "n": n, "accuracy": k / n, "ci": [lo, hi],
                     "trace_exact": statistics.mean(r["trace_exact"] for r in rs),
                     "think_tokens": statistics.mean(r["think"] for r in rs),
                     "tag": statistics.mean(r["tag"] for r in rs),
                     "latency_ms": 1000 * statistics.median(r["seconds"] for r in rs),
                     "server_ms": 1000 * statistics.median(r["server_s"] for r in rs)})
    return budget_control.mark_pareto(rows)


def format_table(rows: list[dict]) -> str:
    lines = ["| config | think | answer | accuracy (95% CI) | trace exact | think tok | tag % | latency ms | server ms |",
             "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['name']}{' *' if r['pareto'] else ''} | {r['think']} | {r['answer']} | "
                     f"{100 * r['accuracy']:.1f} ({100 * r['ci'][0]:.0f}-{100 * r['ci'][1]:.0f}) | "
                     f"{100 * r['trace_exact']:.0f}% | {r['think_tokens']:.1f} | {100 * r['tag']:.0f} | "
                     f"{r['latency_ms']:.1f} | {r['server_ms']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="the recipe's output folder (RUN/elastic)")
    ap.add_argument("--n", type=int, default=100, help="held-out problems")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full-think", type=int, default=64, help="the thinking cap of the untruncated configurations")
    ap.add_argument("--truncate", type=int, nargs="*", default=[0, 8, 16, 24, 32])
    ap.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="names or patterns (L trunc@*)")
    ap.add_argument("--max-answer", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sliced", action="store_true", help="serve the budgets sliced, not extracted")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from nestlm.inference.serve import launch, stop, wait_ready

    elastic = args.run / "elastic"
    manifest = json.loads((elastic / "nestlm_elastic.json").read_text())
    task = TaskConfig(**json.loads((elastic / "reasoning_task.json").read_text()))
    every = budget_control.setups(manifest, args.full_think, args.truncate)
    configs = [c for c in every if any(fnmatch.fnmatchcase(c.name, p) for p in args.configs)]
    problems = sample_problems(task, args.n, seed=args.seed, split="test")
    proc, url = launch(elastic, "--threads", str(args.threads), *([] if args.sliced else ["--extract"]))
    rec: dict[str, list[dict]] = {c.name: [] for c in configs}
    try:
        wait_ready(proc, url)
        for c in configs:  # warm-up: extraction of each budget, first-call costs
            ask(url, c, format_prompt(problems[0]), args.max_answer)
        t0 = time.perf_counter()
        for i, p in enumerate(problems):
            for c in configs:
                r, secs = ask(url, c, format_prompt(p), args.max_answer)
                text, u = r["choices"][0]["text"], r["usage"]
                rec[c.name].append({"correct": parse_answer(text) == p.answer,
                                    "trace_exact": text.split("</think>")[0] == format_trace(p),
                                    "think": u["thinking_tokens"], "tag": r["nestlm"]["ended_by"] == "tag",
                                    "seconds": secs, "server_s": r["nestlm"]["generate_s"]})
            if (i + 1) % 10 == 0:
                print(f"{i + 1}/{len(problems)} problems ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                      flush=True)
    finally:
        stop(proc)
    rows = summarize(configs, rec)
    s, m, big = budget_control.budgets_by_size(manifest)
    table = (f"{elastic}: S = {s}, M = {m}, L = {big}; {args.n} held-out problems, greedy, through nestlm serve "
             f"({'sliced' if args.sliced else 'extracted'} budgets, {args.threads} thread(s))\n\n" + format_table(rows))
    out = args.out or args.run / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget_serve.md").write_text(table + "\n")
    (out / "budget_serve.json").write_text(json.dumps({"rows": rows, "records": rec}, indent=1))
    return table


if __name__ == "__main__":
    print(main())
