"""Does a router that may also drop layers do better than one that only narrows? The demo's parent, elastified
twice with the same data, steps and seed: once with the demo's width choices, once with those plus the depth
axis (keep 6, 5 or 4 of the 6 blocks, dropped least important first). Held-out perplexity per budget.

    python recipes/depth_width_demo.py --out runs/depth_width        # ~8 min on 2 CPU cores
    python recipes/depth_width_demo.py --quick --out /tmp/dw           # < 2 min, a smoke test

Writes out/results.json (per run and budget: the manifest's SubArch, its cost, perplexity) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import nestlm
from nestlm.arch import SubArch, count_params
from nestlm.data import ByteTokenizer, kjv_text, perplexity, split
from nestlm.demo import (
    BUDGETS,
    CHOICES,
    demo_config,
    elastic_config,
    pretrain,
    sort_by_importance,
    torch_threads,
)
from nestlm.elastic.config import budget_name
from nestlm.load import load_elastic

RUNS = {"width": CHOICES, "width+depth": {**CHOICES, "depth": [6, 5, 4]}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/depth_width")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pre_steps, steps, (batch, seq_len), n_eval = (40, 40, (8, 64), 16) if args.quick else (600, 300, (16, 128), 96)

    with torch_threads(args.threads):
        gen = torch.Generator().manual_seed(args.seed)
        tok = ByteTokenizer()
        train_ids, val_ids = split(tok.encode_tensor(kjv_text()), val_frac=0.05)
        cfg = demo_config(tok.vocab_size)
        parent = nestlm.Decoder(cfg).init_weights(args.seed)
        pretrain(parent, train_ids, pre_steps, batch, seq_len, lr=3e-3, gen=gen)
        sort_by_importance(parent, train_ids, batch, seq_len, n_batches=2 if args.quick else 8, gen=gen)
        start = int(torch.randint(0, len(train_ids) // 2, (1,), generator=gen))

        def ppl(m, sub=None):
            return perplexity(m, val_ids, seq_len, batch=16, sub=sub, max_windows=n_eval)

        results = {"parent_ppl": ppl(parent.eval()), "steps": steps, "runs": {}}
        for name, choices in RUNS.items():
            ecfg = elastic_config(steps, batch, seq_len, args.seed)
            ecfg.choices = choices
            ecfg.calib_batches = 2 if args.quick else 8  # depth scoring: one forward per block and batch
            t0 = time.perf_counter()
            nestlm.elastify(ecfg, parent, train_ids[start:], out / name, resume=False, progress=False)
            model, _, manifest = load_elastic(out / name)
            model.eval()
            rows = {}
            for frac in BUDGETS:
                b = manifest["budgets"][budget_name(frac)]
                sub = SubArch.from_dict(b["sub"])
                rows[budget_name(frac)] = {"sub": sub.resolve(cfg).to_dict(), "cost": count_params(cfg, sub) / count_params(cfg),
                                           "ppl": ppl(model, sub), "argmax_landed": "argmax_sub" not in b}
            results["runs"][name] = {"seconds": time.perf_counter() - t0, "budgets": rows,
                                     "depth_order": manifest["elastic"].get("depth_order")}

    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"parent ppl {results['parent_ppl']:.3f}; {steps} elastic steps per run\n")
    print("| budget | run | blocks kept | hidden | cost | held-out ppl | router's own choice landed |")
    print("|---|---|---|---|---|---|---|")
    for frac in BUDGETS:
        for name, run in results["runs"].items():
            r = run["budgets"][budget_name(frac)]
            print(f"| {budget_name(frac)} | {name} | {len(r['sub']['layers'])} | {r['sub']['hidden']} | {r['cost']:.3f} "
                  f"| {r['ppl']:.3f} | {'yes' if r['argmax_landed'] else 'no'} |")
    return results


if __name__ == "__main__":
    main()
