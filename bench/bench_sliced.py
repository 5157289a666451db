"""Sliced variants' speedup against the ideal active-parameter ratio.

For each model, width budgets of the parameters are cut out with `extract` (a standalone, smaller
Decoder, as the sliced HF checkpoint would load) and timed against the full model in the same run,
interleaved (full, 75%, 50%, full, ...); MEDIANS of `--repeats` runs.

    python bench/bench_sliced.py                 # full settings
    python bench/bench_sliced.py --quick         # < 2 min on 2 CPU cores
    python bench/bench_sliced.py --models demo_hybrid --budgets 0.75 0.5 0.3

Ideal speedup = full active params / sliced active params (what the budget promises). Per-token matmul
work is a fairer ideal on small models, where the embedding lookup is free but the lm_head is not:
"matmul ideal" counts active params minus the embedding, plus the lm_head when it is tied. Efficiency =
measured speedup / matmul ideal (1.0: compute shrank exactly as the weights did).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import _median_seconds, _randomize

MODELS = ("demo_hybrid", "smollm2_135m")


def demo_hybrid():
    """The demo's hybrid parent (M-*EM-: Mamba, MLP, attention, MoE; hidden 128), random weights."""
    from nestlm.data import ByteTokenizer
    from nestlm.demo import demo_config
    from nestlm.model.decoder import Decoder

    return Decoder(demo_config(ByteTokenizer().vocab_size)).init_weights(seed=0).eval()


def smollm2_135m():
    from nestlm.data.pretrained import has_smollm2, smollm2_135m_dir

    if not has_smollm2():
        return None
    import nestlm

    return nestlm.from_hf(smollm2_135m_dir()).eval()


def matmul_params(cfg, sub) -> int:
    """Weights touched by matmuls per token: active params - embedding (+ lm_head when tied)."""
    from nestlm.arch import count_active_params

    k = sub.hidden if sub is not None and sub.hidden else cfg.hidden_size
    emb = cfg.vocab_size * k
    return count_active_params(cfg, sub) - emb + (emb if cfg.tie_embeddings else 0)


def bench_model(name: str, model, args) -> list[dict]:
    from nestlm.arch import count_active_params, width_subarch
    from nestlm.inference.generate import generate
    from nestlm.model.extract import extract

    cfg = model.cfg
    subs = {1.0: None} | {f: width_subarch(cfg, f) for f in args.budgets}
    models = {f: (model if s is None else extract(model, s).eval()) for f, s in subs.items()}
    g = torch.Generator().manual_seed(0)
    pb, pt = args.prefill_batch, args.prefill_len
    ids = torch.randint(0, cfg.vocab_size, (pb, pt), generator=g)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g)
    rows = []
    with torch.inference_mode():
        fracs = list(subs)
        t_pre = _median_seconds([lambda m=models[f]: m(ids) for f in fracs], args.warmup, args.repeats)
        t_gen = _median_seconds([lambda m=models[f]: generate(m, prompt, args.new_tokens) for f in fracs],
                                args.warmup, args.repeats)
    full_active, full_mm = count_active_params(cfg), matmul_params(cfg, None)
    for i, f in enumerate(fracs):
        active = count_active_params(cfg, subs[f])
        mm = matmul_params(cfg, subs[f])
        rows.append({"model": name, "budget": f, "active": active, "ideal": full_active / active,
                     "mm_ideal": full_mm / mm, "prefill": t_pre[0] / t_pre[i], "generate": t_gen[0] / t_gen[i],
                     "prefill_tok_s": pb * pt / t_pre[i], "gen_tok_s": args.new_tokens / t_gen[i]})
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| model | budget | active params | ideal | matmul ideal | prefill tok/s | prefill speedup "
            "| generate tok/s | generate speedup | efficiency (prefill, generate) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        eff = f"{r['prefill'] / r['mm_ideal']:.2f}, {r['generate'] / r['mm_ideal']:.2f}"
        lines.append(f"| {r['model']} | {r['budget']:.2f} | {r['active']:,} | {r['ideal']:.2f}x | "
                     f"{r['mm_ideal']:.2f}x | {r['prefill_tok_s']:,.0f} | {r['prefill']:.2f}x | "
                     f"{r['gen_tok_s']:,.1f} | {r['generate']:.2f}x | {eff} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, shorter inputs")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5])
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 7, 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--prefill-batch", type=int, default=None)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: keep torch's)")
    args, _ = ap.parse_known_args(argv)  # bench/run.py passes the same argv to every bench
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.prefill_batch = args.prefill_batch or (2 if args.quick else 4)
    args.new_tokens = args.new_tokens or (32 if args.quick else 64)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = []
    for name in args.models:
        model = {"demo_hybrid": demo_hybrid, "smollm2_135m": smollm2_135m}[name]()
        if model is None:
            print(f"{name}: skipped (not available offline)")
            continue
        if name == "demo_hybrid":
            _randomize(model)  # every block matters, routing is not degenerate
        rows += bench_model(name, model, args)
    table = format_table(rows)
    print(f"\nsliced vs full, medians of {args.repeats} interleaved runs, {torch.get_num_threads()} threads, "
          f"prefill {args.prefill_batch}x{args.prefill_len}, generate {args.prompt_len}+{args.new_tokens} "
          f"b1 ({time.time() - t0:.0f} s)\n")
    print(table)
    med = statistics.median(r["prefill"] / r["mm_ideal"] for r in rows if r["budget"] < 1) if len(rows) > 1 else 0
    print(f"\nmedian prefill efficiency over sliced rows: {med:.2f}")
    return table


if __name__ == "__main__":
    main()
