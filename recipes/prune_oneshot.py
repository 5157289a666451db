"""One-shot pruning baseline on the real SmolLM2-135M: score, sort, slice at 85% / 70% / 50% of the
parameters with no training, and compare held-out perplexity against slicing the unsorted model.

    python recipes/prune_oneshot.py                 # ~5 min on 2 CPU cores
    python recipes/prune_oneshot.py --calib 8 --eval 16 --out docs/prune_oneshot.json

Width-only shrinks every width axis by one factor (hidden, heads per KV group, FFN); depth-only drops whole
layers. "unsorted" slices the original weight order (first channels / heads, last layers dropped);
"sorted" slices after importance sorting (depth: the least important layers dropped).
Calibration text is Genesis-Kings of the KJV; held-out text is the Gospels onward (disjoint).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

import nestlm
from nestlm.arch import SubArch, count_params, depth_subarch, width_subarch
from nestlm.data import kjv_text, perplexity
from nestlm.data.pretrained import smollm2_135m_dir
from nestlm.elastic.importance import importance
from nestlm.elastic.sort import sort_


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib", type=int, default=16, help="calibration sequences")
    ap.add_argument("--eval", type=int, default=32, help="held-out sequences")
    ap.add_argument("--fracs", type=float, nargs="+", default=[0.85, 0.70, 0.50])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()

    from transformers import AutoTokenizer

    path = smollm2_135m_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = nestlm.from_hf(path)
    text = kjv_text()
    split = text.upper().find("THE GOSPEL ACCORDING TO ST. MATTHEW")
    split = split if split > 0 else int(len(text) * 0.75)
    n_chars = args.seq_len * 6 * max(args.calib, args.eval)  # ~4 chars per token, with slack
    calib_ids = torch.tensor(tok(text[:n_chars])["input_ids"][: args.calib * args.seq_len])
    eval_ids = torch.tensor(tok(text[split:split + n_chars])["input_ids"][: args.eval * args.seq_len])
    calib = list(calib_ids.view(-1, 4, args.seq_len)) if args.calib % 4 == 0 else [calib_ids.view(-1, args.seq_len)]

    def ppl(m, sub=None):
        return perplexity(m, eval_ids, seq_len=args.seq_len, batch=4, sub=sub)

    base = ppl(model)
    scores = importance(model, calib, layer_batches=2)
    sorted_model = copy.deepcopy(model)
    sort_(sorted_model, scores)
    cfg = model.cfg
    rows = [{"budget": 1.0, "mode": "full", "params": count_params(cfg), "unsorted": base, "sorted": base}]
    n_layers = cfg.n_blocks // 2
    for frac in args.fracs:
        w = width_subarch(cfg, frac, axes=("hidden", "attn_heads_per_group", "ffn"))
        d_sorted = depth_subarch(cfg, scores["layers"], frac)
        keep = len(d_sorted.layers) // 2
        d_unsorted = SubArch(layers=tuple(range(2 * keep)))  # the first layers, last ones dropped
        rows.append({"budget": frac, "mode": "width", "params": count_params(cfg, w), "sub": w.to_dict(),
                     "unsorted": ppl(model, w), "sorted": ppl(sorted_model, w)})
        rows.append({"budget": frac, "mode": "depth", "params": count_params(cfg, d_sorted),
                     "layers_kept": f"{keep}/{n_layers}", "dropped": sorted(set(range(n_layers)) - {
                         i // 2 for i in d_sorted.layers}),
                     "unsorted": ppl(model, d_unsorted), "sorted": ppl(sorted_model, d_sorted)})

    full = count_params(cfg)
    print(f"\nSmolLM2-135M one-shot pruning, held-out KJV perplexity ({eval_ids.numel()} tokens), "
          f"calibration {calib_ids.numel()} tokens, {time.time() - t0:.0f} s")
    print(f"{'budget':>6} {'mode':>6} {'params':>12} {'unsorted ppl':>13} {'sorted ppl':>11}")
    for r in rows:
        print(f"{r['budget']:>6.2f} {r['mode']:>6} {r['params']:>9,} ({r['params'] / full:4.0%}) "
              f"{_fmt(r['unsorted']):>13} {_fmt(r['sorted']):>11}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "seconds": time.time() - t0,
                                        "eval_tokens": eval_ids.numel(), "calib_tokens": calib_ids.numel()},
                                       indent=2))
    return rows


def _fmt(v: float) -> str:
    return f"{v:,.1f}" if math.isfinite(v) and v < 1e6 else f"{v:.2e}"


if __name__ == "__main__":
    main()
