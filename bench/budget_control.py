"""Budget control on the synthetic reasoning task: think on one nested submodel, answer on another, against
standard budget control (one model whose thinking is cut at a token budget).

    python recipes/reasoning_elastic.py --out runs/reasoning          # train + elastify (~15 min, 1 thread)
    python bench/budget_control.py --run runs/reasoning               # then this (~3 min)
    python bench/budget_control.py --run runs/reasoning --train       # or both in one go

Budgets come from the elastic checkpoint's manifest: L = the full model, S = the smallest budget, M = the
middle one (when there are three or more). Configurations ("think→answer"):

    L→L, S→S, M→M          one submodel for both phases (the cache just goes on)
    S→L, M→L, L→S          thinking on one submodel, answering on another, re-prefilling the answerer
    S→L / M→L transplant   the same with the thinker's caches transplanted into L (nestlm.inference.two_phase.transplant_cache)
    L trunc@k, S→L trunc@k thinking cut after k tokens, '</think>' appended (standard budget control)

Every configuration answers the same `--n` held-out problems (greedy). The problems are the outer loop and
the configurations the inner one, so machine-load drift hits every configuration alike; latencies are
MEDIANS per problem (prefill + thinking + switch + answer, one `--threads` CPU thread by default). Each
budget runs as its own extracted model (nestlm.inference.two_phase.Standalone; --sliced: the elastic model sliced at
every step, which adds per-step slicing overhead to the smaller budgets). Columns:
accuracy (95% Wilson interval), trace exact (the thinking matched the worked trace token for token), mean
thinking tokens, tag% (thinking ended at the model's own '</think>'), median latency, tokens/s (generated
tokens / total time), and two hardware-independent costs relative to L→L: compute (active parameters times
the tokens each submodel processed, prefills included: FLOPs) and weight reads (active parameters times the
forward calls, a prefill being one call: the cost of memory-bound batch-1 decoding). Rows marked * are
Pareto-optimal in (median latency, accuracy). Writes budget_control.{md,json,png} into --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setup:
    name: str
    think: str  # manifest budget names
    answer: str
    max_think: int
    switch: str = "reprefill"


# ---------------------------------------------------------------------------------------------- setup
def load_recipe():
    spec = importlib.util.spec_from_file_location("reasoning_elastic", ROOT / "recipes" / "reasoning_elastic.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def budgets_by_size(manifest: dict) -> tuple[str, str | None, str]:
    """(S, M, L) budget names: the smallest, a middle one (or None), the largest."""
    names = sorted(manifest["budgets"], key=lambda k: manifest["budgets"][k]["fraction"])
    return names[0], (names[len(names) // 2] if len(names) >= 3 else None), names[-1]


def setups(manifest: dict, full_think: int, truncate: list[int]) -> list[Setup]:
    s, m, big = budgets_by_size(manifest)
    out = [Setup("L→L", big, big, full_think), Setup("S→S", s, s, full_think)]
    if m is not None:
        out += [Setup("M→M", m, m, full_think), Setup("M→L", m, big, full_think),
                Setup("M→L transplant", m, big, full_think, "transplant")]
    out += [Setup("S→L", s, big, full_think), Setup("S→L transplant", s, big, full_think, "transplant"),
            Setup("L→S", big, s, full_think)]
    out += [Setup(f"L trunc@{k}", big, big, k) for k in truncate]
    out += [Setup(f"S→L trunc@{k}", s, big, k) for k in truncate if k > 0]
    return out


# ---------------------------------------------------------------------------------------------- measuring
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def compute_cost(res, think_params: int, answer_params: int) -> float:
    """Active parameters times tokens processed, summed over both phases (prefills included)."""
    s_tokens = (res.prompt_len + res.think_len - 1) if res.think_len else 0  # prefill + all but the last
    seen = res.prompt_len + res.think_len + res.forced_len  # what L needs in its cache before answering
    if res.switch == "reprefill" or res.switch == "prefill":
        l_switch = seen
    else:  # transplant / continue: only the tokens S never fed
        l_switch = seen - s_tokens
    cost = s_tokens * think_params
    cost += (l_switch + max(res.answer_len - 1, 0)) * answer_params
    return float(cost)


def weight_reads(res, think_params: int, answer_params: int) -> float:
    """Active parameters read, one pass over the submodel's weights per forward call (a prefill is one call):
    what batch-1 decoding costs where it is memory-bound (accelerators), whatever the prompt length."""
    s_calls = res.think_len  # the prefill, then one step per thinking token but the last
    l_calls = (1 + max(res.answer_len - 1, 0)) if res.switch != "none" else 0  # switch prefill + answer steps
    return float(s_calls * think_params + l_calls * answer_params)


def evaluate(model, manifest, task, configs: list[Setup], n: int, seed: int, max_answer: int, warmup: int):
    from nestlm.data import ByteTokenizer
    from nestlm.data.reasoning import THINK_END, format_prompt, format_trace, sample_problems, score
    from nestlm.elastic.artifact import resolve_budget
    from nestlm.inference.two_phase import generate_two_phase

    tok = ByteTokenizer()
    tag = tok.encode(THINK_END)
    subs = {b: resolve_budget(None, b, manifest=manifest)[1] for b in manifest["budgets"]}
    params = {b: v["active_params"] for b, v in manifest["budgets"].items()}
    problems = sample_problems(task, n + warmup, seed=seed, split="test")
    dev = model.lm_head_weight.device
    rec = {c.name: [] for c in configs}
    t0 = time.perf_counter()
    for i, p in enumerate(problems):
        ids = torch.tensor([tok.encode(format_prompt(p), bos=True)], device=dev)  # [1, t]
        for c in configs:
            res = generate_two_phase(model, ids, subs[c.think], subs[c.answer], c.max_think, max_answer, tag,
                                     stop_tokens=tok.eos_id, switch=c.switch)
            if i < warmup:
                continue
            text = tok.decode(res.tokens[0, res.prompt_len:].tolist())
            think_text = tok.decode(res.tokens[0, res.prompt_len:res.prompt_len + res.think_len].tolist())
            rec[c.name].append({
                "correct": score(p, text), "trace_exact": think_text == format_trace(p) + THINK_END,
                "think": res.think_len, "tag": res.ended_by == "tag", "seconds": res.total_s,
                "switch_s": res.switch_s, "new_tokens": res.think_len + res.forced_len + res.answer_len,
                "compute": compute_cost(res, params[c.think], params[c.answer]),
                "reads": weight_reads(res, params[c.think], params[c.answer])})
        if i + 1 - warmup in (10, 50) or i + 1 == len(problems):
            print(f"  {i + 1 - warmup}/{n} problems ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rec


def summarize(configs: list[Setup], rec: dict) -> list[dict]:
    ref = {k: statistics.mean(r[k] for r in rec["L→L"]) if "L→L" in rec else 1.0 for k in ("compute", "reads")}
    rows = []
    for c in configs:
        rs = rec[c.name]
        k, n = sum(r["correct"] for r in rs), len(rs)
        lo, hi = wilson(k, n)
        secs = sum(r["seconds"] for r in rs)
        rows.append({
            "name": c.name, "think": c.think, "answer": c.answer, "max_think": c.max_think, "switch": c.switch,
            "n": n, "accuracy": k / n, "ci": [lo, hi], "trace_exact": statistics.mean(r["trace_exact"] for r in rs),
            "think_tokens": statistics.mean(r["think"] for r in rs), "tag": statistics.mean(r["tag"] for r in rs),
            "latency_ms": 1000 * statistics.median(r["seconds"] for r in rs),
            "switch_ms": 1000 * statistics.median(r["switch_s"] for r in rs),
            "tok_per_s": sum(r["new_tokens"] for r in rs) / secs,
            "compute": statistics.mean(r["compute"] for r in rs) / ref["compute"],
            "reads": statistics.mean(r["reads"] for r in rs) / ref["reads"]})
    return mark_pareto(rows)


def mark_pareto(rows: list[dict]) -> list[dict]:
    """Each row's "pareto": no other row is at least as accurate and as fast, and strictly better in one."""
    for r in rows:
        r["pareto"] = not any(
            o is not r and o["accuracy"] >= r["accuracy"] and o["latency_ms"] <= r["latency_ms"]
            and (o["accuracy"] > r["accuracy"] or o["latency_ms"] < r["latency_ms"]) for o in rows)
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| config | think | answer | accuracy (95% CI) | trace exact | think tok | tag % | latency ms | switch ms "
            "| tok/s | compute | weight reads |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['name']}{' *' if r['pareto'] else ''} | {r['think']} | {r['answer']} | "
            f"{100 * r['accuracy']:.1f} ({100 * r['ci'][0]:.0f}-{100 * r['ci'][1]:.0f}) | {100 * r['trace_exact']:.0f}% | "
            f"{r['think_tokens']:.1f} | {100 * r['tag']:.0f} | {r['latency_ms']:.1f} | {r['switch_ms']:.1f} | "
            f"{r['tok_per_s']:.0f} | {r['compute']:.2f} | {r['reads']:.2f} |")
    return "\n".join(lines)


def compare(rows: list[dict], name: str = "S→L") -> str:
    """The seeds' comparison: `name` against standard budget control (L trunc@k and L→L)."""
    me = next((r for r in rows if r["name"] == name), None)
    std = [r for r in rows if r["name"].startswith("L trunc@") or r["name"] == "L→L"]
    if me is None or not std:
        return ""
    out = []
    under = [r for r in std if r["latency_ms"] <= me["latency_ms"]]
    if under:
        best = max(under, key=lambda r: r["accuracy"])
        out.append(f"{name} ({100 * me['accuracy']:.1f}% at {me['latency_ms']:.1f} ms) vs the best standard budget "
                   f"control row at no more latency, {best['name']} ({100 * best['accuracy']:.1f}% at "
                   f"{best['latency_ms']:.1f} ms): {100 * (me['accuracy'] - best['accuracy']):+.1f} points")
    else:
        out.append(f"no standard budget control row is as fast as {name} ({me['latency_ms']:.1f} ms)")
    match = [r for r in std if r["accuracy"] >= me["accuracy"]]
    if match:
        fast = min(match, key=lambda r: r["latency_ms"])
        out.append(f"to reach {name}'s accuracy, standard budget control needs {fast['name']} at "
                   f"{fast['latency_ms']:.1f} ms: {fast['latency_ms'] / me['latency_ms']:.2f}x {name}'s latency")
    else:
        out.append(f"no standard budget control row reaches {name}'s accuracy")
    return "\n".join(out)


def paired(rec: dict, a: str, b: str) -> str:
    """Per-problem comparison of two configurations on the same problems: where their correctness differs."""
    if a not in rec or b not in rec:
        return ""
    ra, rb = rec[a], rec[b]
    lost = sum(x["correct"] and not y["correct"] for x, y in zip(ra, rb, strict=True))
    gained = sum(y["correct"] and not x["correct"] for x, y in zip(ra, rb, strict=True))
    same_trace = sum(x["think"] == y["think"] for x, y in zip(ra, rb, strict=True))
    return (f"{b} vs {a}, problem by problem: right only with {a} {lost}, right only with {b} {gained} "
            f"(of {len(ra)}; same thinking length on {same_trace})")


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against median latency (left) and against compute (right), with each Pareto frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = (("full thinking", "C0", lambda n: "trunc" not in n), ("L, thinking truncated", "C1",
             lambda n: n.startswith("L trunc")), ("S→L, thinking truncated", "C2", lambda n: n.startswith("S→L trunc")))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key, label in ((axes[0], "latency_ms", "median latency per problem (ms, CPU, 1 thread)"),
                           (axes[1], "reads", "weight reads (memory-bound decoding) relative to L→L")):
        for kind, color, member in kinds:
            rs = [r for r in rows if member(r["name"])]
            ax.plot([r[key] for r in rs], [100 * r["accuracy"] for r in rs], "o", color=color, label=kind)
            for r in rs:  # truncated rows are labelled by their budget only: '@11'
                text = r["name"] if kind == "full thinking" else "@" + r["name"].rsplit("@", 1)[1]
                ax.annotate(text, (r[key], 100 * r["accuracy"]), textcoords="offset points",
                            xytext=(3, 4 if kind != "S→L, thinking truncated" else -10), fontsize=7, color=color)
        front = sorted((r for r in rows if not any(
            o[key] <= r[key] and o["accuracy"] >= r["accuracy"] and (o[key] < r[key] or o["accuracy"] > r["accuracy"])
            for o in rows)), key=lambda r: r[key])
        ax.step([r[key] for r in front], [100 * r["accuracy"] for r in front], where="post", color="k", lw=1,
                label="Pareto frontier")
        ax.set(xlabel=label, ylabel="accuracy (%)", ylim=(-5, 103))
        ax.legend(loc="upper left", fontsize=7)
    axes[0].set_title("budget control: accuracy vs latency")
    axes[1].set_title("accuracy vs weight reads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/reasoning"), help="the recipe's output folder")
    ap.add_argument("--train", action="store_true", help="run recipes/reasoning_elastic.py first if needed")
    ap.add_argument("--config", type=Path, default=None, help="recipe config (with --train)")
    ap.add_argument("--n", type=int, default=200, help="held-out problems per configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--truncate", default="0,0.25,0.5,0.75",
                    help="thinking budgets of the truncated rows: ints (tokens) or fractions of the median trace")
    ap.add_argument("--max-answer", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="problems run first and not recorded")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sliced", action="store_true",
                    help="run the elastic model sliced at every step instead of extracted submodels (Standalone)")
    ap.add_argument("--out", type=Path, default=None, help="default: RUN/bench")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from nestlm.data import ByteTokenizer
    from nestlm.data.reasoning import THINK_END, TaskConfig, format_trace, sample_problems
    from nestlm.load import load_elastic

    elastic = args.run / "elastic"
    recipe = load_recipe()
    if args.train:
        recipe.run(args.config or recipe.DEFAULT_CONFIG, args.run)
    if not (elastic / recipe.TASK_FILE).is_file():
        sys.exit(f"{elastic} has no trained model: run recipes/reasoning_elastic.py --out {args.run} (or --train)")
    model, _, manifest = load_elastic(elastic)
    model.eval()
    task = TaskConfig(**json.loads((elastic / recipe.TASK_FILE).read_text()))

    # thinking budgets: full = room for the longest trace; truncated = tokens or fractions of the median trace
    tok = ByteTokenizer()
    lengths = [len(tok.encode(format_trace(p) + THINK_END)) for p in sample_problems(task, 500, seed=1, split="test")]
    med, longest = statistics.median(lengths), max(lengths)
    full_think = int(longest * 1.5)
    truncate = sorted({int(v) if "." not in v else int(round(float(v) * med)) for v in args.truncate.split(",") if v})
    configs = setups(manifest, full_think, truncate)
    print(f"task {task}; traces {min(lengths)}-{longest} tokens (median {med:.0f}, tag included); "
          f"full thinking budget {full_think}; {len(configs)} configurations x {args.n} problems")
    for name, b in manifest["budgets"].items():
        print(f"  {name}: {b['params']:,} params ({b['active_params']:,} active)")

    from nestlm.inference.two_phase import Standalone

    runner = model if args.sliced else Standalone(model)
    rec = evaluate(runner, manifest, task, configs, args.n, args.seed, args.max_answer, args.warmup)
    rows = summarize(configs, rec)
    table = format_table(rows)
    summary = [compare(rows, n) for n in ("S→L", "S→L transplant", "M→L", "M→L transplant")]
    summary += [paired(rec, "S→L", "S→L transplant"), paired(rec, "M→L", "M→L transplant")]
    summary = "\n".join(x for x in summary if x)
    out = args.out or args.run / "bench"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"task": task.__dict__, "n": args.n, "threads": args.threads, "full_think": full_think,
            "runner": "sliced" if args.sliced else "standalone",
            "budgets": {k: {"params": v["params"], "active_params": v["active_params"], "sub": v["sub"]}
                        for k, v in manifest["budgets"].items()}}
    (out / "budget_control.json").write_text(json.dumps({"meta": meta, "rows": rows, "per_problem": rec}, default=str))
    (out / "budget_control.md").write_text(table + "\n\n" + summary + "\n")
    plot(rows, out / "budget_control.png")
    print("\n" + table + "\n\n" + summary + f"\n\nwrote {out}/budget_control.md, .json, .png")
    return table


if __name__ == "__main__":
    main()
