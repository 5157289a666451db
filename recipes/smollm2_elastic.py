"""The real-model reproduction: SmolLM2-135M elastified into 100% / 75% / 50% of its parameters, compared
with the baselines the paper compares against. Offline (KJV text, the cached SmolLM2); CPU or CUDA.

    python recipes/smollm2_elastic.py --out runs/smollm2 --eval 16 --threads 1 --no-width-depth  # the YAML's 60 steps
    python recipes/smollm2_elastic.py --out runs/smollm2_v2 --eval 16 --threads 1 --steps 120 --no-width-depth \
        --set budgets_per_step=1                                                           # one budget per step
    python recipes/smollm2_elastic.py --out runs/smollm2 --steps 40 --baseline-steps 40          # shorter

Stages (each one is skipped when its output exists, so the command resumes after a kill; elastic training
itself resumes from its checkpoint):
  1. tokens: KJV with SmolLM2's tokenizer; training text = Genesis..Malachi, held out = Matthew onward
  2. sort:   importance on `--calib` training windows, sort_, written as an HF folder (out/sorted)
  3. elastify the sorted parent (recipes/configs/smollm2_elastic.yaml; sort: false) -> out/elastic
  4. for every budget, held-out perplexity of
       elastic      the elastic checkpoint at the router's SubArch (zero-shot slice, no extra training)
       one-shot     the sorted parent at the same SubArch, untrained (importance + sort only)
       independent  the same SubArch cut from the sorted parent and distilled ALONE from the same teacher
                    (recipes/fidelity.distill_alone: elastify's loss, optimizer and lr schedule), with
                    T/(K-1) tokens (`independent_short`: the K-1 runs alone cost about the elastic run) and
                    with T tokens, T = the elastic run's tokens (`--baseline-steps` overrides T's steps)
  5. width vs depth at 15% reduction: one-shot and independently distilled (the same token count each)
  6. results.json and a markdown table (pasted into docs/results.md)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from fidelity import distill_alone, parse_set  # the run alone (elastify's loss and optimizer); --set

import nestlm
from nestlm import ElasticConfig, SubArch
from nestlm.arch import count_params, depth_subarch, width_subarch
from nestlm.data import perplexity
from nestlm.elastic.importance import Scores
from nestlm.elastic.train import get_batch

HERE = Path(__file__).resolve().parent


def kjv_tokens(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out) token streams: the Old Testament for training, the New Testament held out."""
    from transformers import AutoTokenizer

    from nestlm.data import kjv_text

    text = kjv_text()
    cut = text.upper().find("THE GOSPEL ACCORDING TO ST. MATTHEW")
    cut = cut if cut > 0 else int(len(text) * 0.75)
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = lambda s: torch.tensor(tok(s)["input_ids"], dtype=torch.long)
    return enc(text[:cut]), enc(text[cut:])


def sort_parent(parent_dir: Path, out: Path, train: torch.Tensor, n_calib: int, seq_len: int) -> Path:
    """Score importance on training windows, sort, and write the sorted parent as an HF folder."""
    from nestlm.elastic.importance import importance
    from nestlm.elastic.sort import sort_

    if (out / "config.json").exists():
        return out
    model = nestlm.from_hf(parent_dir)
    calib = [get_batch(train, i, 4, seq_len) for i in range(max(n_calib // 4, 1))]
    scores = importance(model, calib, layer_batches=2)
    sort_(model, scores)
    nestlm.to_hf(model, out)
    scores.save(out / "importance.safetensors")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/smollm2"))
    ap.add_argument("--config", type=Path, default=HERE / "configs" / "smollm2_elastic.yaml")
    ap.add_argument("--steps", type=int, default=None, help="elastic training steps (default: the YAML's)")
    ap.add_argument("--baseline-steps", type=int, default=None,
                    help="steps for each independently distilled baseline (default: the elastic run's)")
    ap.add_argument("--width-depth", action=argparse.BooleanOptionalAction, default=True,
                    help="also run stage 5, width vs depth at 15%% reduction (two more runs alone)")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows for importance")
    ap.add_argument("--eval", type=int, default=32, help="held-out windows for perplexity")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override ElasticConfig fields of the YAML, e.g. --set budgets_per_step=3")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from nestlm.data.pretrained import smollm2_135m_dir

    try:  # the settings are checked before anything is written
        over = parse_set(args.set)
        if args.steps:
            over["steps"] = args.steps
        ecfg = dataclasses.replace(ElasticConfig.load(args.config), **over)  # validated again
    except (ValueError, TypeError) as e:  # (ConfigError is a ValueError)
        ap.error(str(e))
    t0 = time.time()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    parent_dir = smollm2_135m_dir()

    # ---- 1-2. data, then the sorted parent
    train, held = kjv_tokens(parent_dir)
    held = held[: args.eval * ecfg.seq_len + 1]
    sorted_dir = sort_parent(parent_dir, out / "sorted", train, args.calib, ecfg.seq_len)
    sorted_model = nestlm.from_hf(sorted_dir).eval()
    teacher = sorted_model.requires_grad_(False)
    cfg = teacher.cfg

    def ppl(m, sub=None):
        return perplexity(m, held, seq_len=ecfg.seq_len, batch=4, sub=sub)

    # ---- 3. elastic training (resumes)
    t_el = time.time()
    nestlm.elastify(ecfg, sorted_dir, train, out / "elastic")
    elastic_s = time.time() - t_el
    model, _router, manifest = nestlm.load_elastic(out / "elastic")
    tokens_seen = ecfg.steps * ecfg.batch * ecfg.grad_accum * ecfg.seq_len
    base_steps = args.baseline_steps or ecfg.steps * ecfg.grad_accum

    # ---- 4. per budget: elastic vs one-shot vs independently distilled (cached in results.json)
    res_path = out / "results.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    res.update({"elastic_steps": ecfg.steps, "tokens_seen": tokens_seen, "baseline_steps": base_steps,
                "eval_tokens": len(held) - 1, "full_params": count_params(cfg)})
    rows = res.setdefault("budgets", {})
    k_small = sum(b["fraction"] < 1.0 for b in manifest["budgets"].values())
    short_steps = max(1, base_steps // max(k_small, 1))  # T/(K-1): the runs alone together cost the elastic run
    for name, b in manifest["budgets"].items():
        r = rows.setdefault(name, {"fraction": b["fraction"], "params": b["params"], "sub": b["sub"]})
        if "elastic" not in r:
            sub = SubArch.from_dict(b["sub"])
            r["elastic"], r["one_shot"] = ppl(model, sub), ppl(teacher, sub)
        if b["fraction"] >= 1.0:  # the full model is the teacher itself
            r.setdefault("independent", r["one_shot"])
            r.setdefault("independent_short", r["one_shot"])
    res_path.write_text(json.dumps(res, indent=2))
    # the short runs first (T/(K-1) tokens each: the protocol's equal-compute comparison), then T tokens each
    for key, steps in (("independent_short", short_steps), ("independent", base_steps)):
        for name, b in manifest["budgets"].items():
            r = rows[name]
            if key not in r:
                student, losses = distill_alone(teacher, SubArch.from_dict(b["sub"]), train, steps, ecfg,
                                                f"{key} {name} ({steps} steps)")
                r[key], r[key + "_final_kd"] = ppl(student), losses[-1]
                res_path.write_text(json.dumps(res, indent=2))
    res["short_steps"] = short_steps

    # ---- 5. width vs depth at 15% reduction (one-shot and independently distilled, same token count)
    wd = res.setdefault("width_vs_depth_85", {})
    cuts = []
    if args.width_depth:
        layer_scores = Scores.load(sorted_dir / "importance.safetensors")["layers"]
        cuts = [("width", width_subarch(cfg, 0.85, axes=("hidden", "attn_heads_per_group", "ffn"))),
                ("depth", depth_subarch(cfg, layer_scores, 0.85))]
    for mode, sub in cuts:
        if mode in wd:
            continue
        one = ppl(teacher, sub)
        student, _ = distill_alone(teacher, sub, train, base_steps, ecfg, f"{mode} 85%")
        wd[mode] = {"params": count_params(cfg, sub), "one_shot": one, "distilled": ppl(student),
                    "sub": sub.to_dict()}
        res_path.write_text(json.dumps(res, indent=2))

    res["seconds_total"] = res.get("seconds_total", 0) + time.time() - t0
    res.setdefault("elastic_seconds", elastic_s)
    res_path.write_text(json.dumps(res, indent=2))
    print(format_results(res))
    return res


def format_results(res: dict) -> str:
    full = res["full_params"]
    lines = [f"SmolLM2-135M, held-out KJV perplexity ({res['eval_tokens']:,} tokens); elastic run "
             f"{res['elastic_steps']} steps = {res['tokens_seen']:,} tokens; each independent baseline "
             f"{res['baseline_steps']} steps (T), {res.get('short_steps', '-')} steps (T/(K-1))", "",
             "| budget | params | elastic (zero-shot slice) | one-shot (sorted, untrained) | independent KD, T/(K-1) "
             "| independent KD, T |", "|---|---|---|---|---|---|"]
    f = lambda r, k: f"{r[k]:.2f}" if k in r else "-"
    for name, r in res["budgets"].items():
        lines.append(f"| {name} | {r['params']:,} ({r['params'] / full:.0%}) | {r['elastic']:.2f} | "
                     f"{r['one_shot']:.2f} | {f(r, 'independent_short')} | {f(r, 'independent')} |")
    wd = res.get("width_vs_depth_85", {})
    if wd:
        lines += ["", "| 15% reduction | params | one-shot | distilled |", "|---|---|---|---|"]
        for mode, r in wd.items():
            lines.append(f"| {mode} | {r['params']:,} ({r['params'] / full:.0%}) | {r['one_shot']:.2f} | "
                         f"{r['distilled']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
