"""Seconds per elastify step of the demo model: the old demo settings (one budget per step, p_full 0.2, constant
lr) against the library's defaults since issue 29 (every budget on every batch, cosine lr), side by side.

    python bench/bench_defaults.py            # ~2 min on one CPU thread

Interleaved rounds (drifting load hits both alike), medians. The new defaults train three budgets per step
over one shared teacher forward, so a step costs more by design; the table says how much.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

import nestlm
from nestlm.data import ByteTokenizer, kjv_text
from nestlm.demo import demo_config, elastic_config


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="elastify steps per timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = ByteTokenizer().encode_tensor(kjv_text()[:400_000])  # [n]
    parent = nestlm.Decoder(demo_config(ByteTokenizer().vocab_size)).init_weights(0)
    new = elastic_config(args.steps, 16, 128, 0)
    old = dataclasses.replace(new, budgets_per_step=1, p_full=0.2, lr_schedule="constant", lr_warmup=0.0)
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.repeats):
        for name, cfg in (("old", old), ("new", new)):
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                nestlm.elastify(cfg, parent, ids, d, progress=False, device="cpu", dtype="fp32")
                times[name].append((time.perf_counter() - t0) / cfg.steps)
    m = {k: statistics.median(v) for k, v in times.items()}
    table = "\n".join([
        f"| settings | s / step (median of {args.repeats} x {args.steps} steps of 16 x 128 tokens) |", "|---|---|",
        f"| old demo (1 budget per step, p_full 0.2, constant lr) | {m['old']:.3f} |",
        f"| library defaults (every budget per step, cosine lr) | {m['new']:.3f} |",
        f"| ratio defaults / old | {m['new'] / m['old']:.2f} |"])
    print(table)
    return table


if __name__ == "__main__":
    main()
