"""Interleaved A/B of two copies of nestlm's source on the elastic training step and on generation: what a
refactor costs or saves, measured side by side.

    git worktree add /tmp/main-ref main
    python bench/ab_versions.py old=/tmp/main-ref new=. [--rounds 3] [--bench-elastic]

Each name=path is a checkout (its `src` is put on PYTHONPATH). Every round runs each measure in fresh
one-thread processes, on both versions back to back (the order rotates between rounds), since the load of
a shared machine moves the figures more than most changes do:
  elastify   ms per step of nestlm.elastify (the whole loop: budget sampling, teacher, student, router,
             AdamW, log) on a 0.5M-parameter hybrid, 3 budgets, 4 x 64 tokens; median over steps 5..N
  generate   ms per token of nestlm.inference.generate.generate (greedy, batch 1, prompt 20, 32 new tokens,
             prefill included) on decode_width.py's M*-M*- shape at hidden 256; median of 5
  two_phase  ms per token of generate_two_phase (think 16 on a 62% submodel, answer 16 on the full model,
             re-prefill) on the same model; median of 5
--bench-elastic also runs each version's own bench/bench_elastic.py --quick and reports its ratios
(elastic step / standalone step, interleaved within one process: robust to load; its milliseconds are not).
Prints the medians over rounds per version and new / old.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ELASTIFY = r'''
import json, statistics, sys, tempfile, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
import nestlm
cfg = nestlm.ModelConfig(vocab_size=256, hidden_size=128, pattern="M*-EM*-E", num_heads=8, num_kv_heads=2,
                         head_dim=16, intermediate_size=384, mamba_heads=16, mamba_head_dim=16, mamba_groups=2,
                         ssm_state=32, chunk_size=32, n_experts=8, top_k=2, moe_intermediate_size=128,
                         shared_intermediate_size=128)
parent = nestlm.Decoder(cfg).init_weights(seed=0)
steps = int(sys.argv[1])
ecfg = nestlm.ElasticConfig(budgets=[1.0, 0.77, 0.4], choices={"hidden": [1.0, 0.75, 0.5], "ffn": [1.0, 0.5],
                            "mamba_heads_per_group": [1.0, 0.5]}, align=16, steps=steps, batch=4, seq_len=64,
                            router_hidden=64, calib_batches=1, checkpoint_every=10**6, seed=0,
                            budgets_per_step=1)  # pinned: the library's default (every budget) changed in issue 29
data = torch.randint(0, 256, (100_000,), generator=torch.Generator().manual_seed(0))
stamps = {}
def on_step(rec):
    stamps.setdefault(rec["step"], time.perf_counter())
with tempfile.TemporaryDirectory() as d:
    nestlm.elastify(ecfg, parent, data, d + "/out", progress=False, on_step=on_step, device="cpu")
t = [stamps[i] for i in sorted(stamps)]
gaps = [(b - a) * 1e3 for a, b in zip(t, t[1:])][4:]
print(json.dumps({"elastify": statistics.median(gaps)}))
'''

GENERATE = r'''
import json, statistics, time
import torch
torch.set_num_threads(1)
import nestlm
from nestlm.inference.generate import generate
from nestlm.inference.two_phase import generate_two_phase
cfg = nestlm.ModelConfig.from_dict({"family": "nemotron_h", "vocab_size": 260, "tie_embeddings": True,
    "hidden_size": 256, "pattern": "M*-M*-", "num_heads": 4, "num_kv_heads": 2, "head_dim": 64,
    "intermediate_size": 1024, "mamba_heads": 8, "mamba_head_dim": 64, "mamba_groups": 2, "ssm_state": 16,
    "chunk_size": 32})
torch.manual_seed(0)
model = nestlm.Decoder(cfg).init_weights(seed=0).eval()
ids = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(0))
small = nestlm.SubArch(hidden=160)
tag = [255, 254, 253]
def gen():
    generate(model, ids, 32)
def two():
    generate_two_phase(model, ids, small, None, 16, 16, tag)
out = {}
for name, fn in (("generate", gen), ("two_phase", two)):
    fn()  # warm-up
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) / 32 * 1e3)
    out[name] = statistics.median(times)
print(json.dumps(out))
'''


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run(tree: Path, args: list[str], cwd: Path | None = None) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=cwd)
    if p.returncode:
        raise SystemExit(f"{tree}: {' '.join(args[:2])} failed:\n{p.stderr[-3000:]}")
    return p.stdout


def bench_elastic_ratios(tree: Path) -> dict[str, float]:
    out = run(tree, [str(tree / "bench" / "bench_elastic.py"), "--quick"], cwd=tree)
    rows = re.findall(r"^\| (standalone|elastic hard|elastic soft) \|.*\| ([\d.]+) ms \| ([\d.]+) \|$", out, re.M)
    return {f"bench_elastic {name} ratio": float(r) for name, _, r in rows if name != "standalone"}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("versions", nargs=2, metavar="NAME=PATH")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25, help="elastify steps per run (default 25)")
    ap.add_argument("--bench-elastic", action="store_true", help="also each version's bench_elastic.py --quick")
    args = ap.parse_args(argv)
    versions = {n: Path(p).resolve() for n, p in (v.split("=", 1) for v in args.versions)}
    got: dict[str, dict[str, list[float]]] = {n: {} for n in versions}
    names = list(versions)
    jobs = [["-c", ELASTIFY, str(args.steps)], ["-c", GENERATE]]
    for r in range(args.rounds):  # each measure runs on both versions back to back: the load hits both alike
        for child in jobs:
            for n in names[r % 2:] + names[:r % 2]:  # rotate the order
                res = json.loads(run(versions[n], child).strip().splitlines()[-1])
                for k, v in res.items():
                    got[n].setdefault(k, []).append(v)
                print(f"round {r + 1} {n}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()) + f" (load {load()})",
                      flush=True)
    for r in range(args.rounds if args.bench_elastic else 0):  # its ratios: elastic / standalone, in one process
        for n in names[r % 2:] + names[:r % 2]:
            res = bench_elastic_ratios(versions[n])
            for k, v in res.items():
                got[n].setdefault(k, []).append(v)
            print(f"round {r + 1} {n}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()), flush=True)
    old, new = names
    lines = [f"| measure (median of {args.rounds} rounds) | {old} | {new} | {new} / {old} |", "|---|---|---|---|"]
    for k in got[old]:
        a, b = statistics.median(got[old][k]), statistics.median(got[new][k])
        unit = "" if "ratio" in k else " ms"
        lines.append(f"| {k}{'' if 'ratio' in k else (' per step' if k == 'elastify' else ' per token')} "
                     f"| {a:.2f}{unit} | {b:.2f}{unit} | {b / a:.3f} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
