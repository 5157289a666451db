"""Interleaved A/B of slicing writers on the synthetic Nano v3 checkpoint of bench_nvidia_slice.py.

    python bench/ab_slice_writers.py old=/tmp/old/src new=src [--cold] [--rounds 3] [--formats bf16,nvfp4] [--quick]

Each name=path is a copy of nestlm's `src` (e.g. `git archive OLD_COMMIT src | tar -x -C /tmp/old`). Every
round runs each version once per cut in a fresh process (bench_nvidia_slice's child: imports before the clock,
slice() + sync timed), rotating the order between rounds, then `cp` + sync of the output once. Warm: one
untimed round first. Prints medians and every run, the slice process's CPU seconds (user + sys, its final sync
included) and cp's (cp only: its sync runs in this process), and the load average, since the machine's load
moves the figures more than the writer does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_nvidia_slice as b

CHILD = b.CHILD.replace("t0 = time.perf_counter()\nstats = {}",
                        "import resource\nru0 = resource.getrusage(resource.RUSAGE_SELF)\nt0 = time.perf_counter()\nstats = {}")
CHILD = CHILD.replace('print(json.dumps({"seconds": dt,',
                      'ru1 = resource.getrusage(resource.RUSAGE_SELF)\nprint(json.dumps({"cpu": ru1.ru_utime - '
                      'ru0.ru_utime + ru1.ru_stime - ru0.ru_stime, "seconds": dt,')


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("versions", nargs="+", help="name=path of a nestlm src folder")
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--formats", default="bf16,nvfp4")
    ap.add_argument("--workdir", default="/work/scratch17")
    ap.add_argument("--quick", action="store_true", help="bench_nvidia_slice's quick source: 8 experts, vocab "
                    "16384, pattern MEM*E (hundreds of MB instead of GB)")
    args = ap.parse_args()
    versions = dict(v.split("=", 1) for v in args.versions)
    root = Path(args.workdir) / "ab_slice_writers"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print("load", load(), "cold" if args.cold else "warm", flush=True)
    table = []
    try:
        for fmt in args.formats.split(","):
            src = root / fmt
            total = b.write_source(src, "MEM*E", 8, 16384, fmt) if args.quick else \
                b.write_source(src, "MEMEM*E", b.NANO["experts"], b.NANO["vocab"], fmt)
            print(fmt, f"source {total / 1e9:.2f} GB", flush=True)
            for cname, sub in b.CUTS.items():
                res, cps, cpu_cp = {k: [] for k in versions}, [], []
                names = list(versions)
                for r in range(args.rounds + (0 if args.cold else 1)):
                    timed = r > 0 or args.cold
                    order = names[r % len(names):] + names[:r % len(names)]
                    for name in order:
                        if args.cold:
                            b.drop_cache(sorted(src.glob("*.safetensors")))
                        out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(root / "out"), json.dumps(sub)],
                                             env={**os.environ, "PYTHONPATH": str(Path(versions[name]).resolve())},
                                             capture_output=True, text=True, check=True)
                        d = json.loads(out.stdout.strip().splitlines()[-1])
                        if timed and name == order[-1]:
                            files = sorted((root / "out").glob("model*.safetensors"))
                            if args.cold:
                                b.drop_cache(files)
                            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                            cps.append(b.run_cp(files, root))
                            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                            cpu_cp.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
                        shutil.rmtree(root / "out")
                        if timed:
                            res[name].append(d)
                        print(r, fmt, cname.split()[0], name, f"{d['seconds']:.2f} s", f"cpu {d['cpu']:.2f}",
                              f"HWM {d['hwm_above'] / 1e6:.0f} MB", "load", load(), flush=True)
                cp = statistics.median(cps)
                for k, v in res.items():
                    s = statistics.median(x["seconds"] for x in v)
                    runs = ", ".join(f"{x['seconds']:.2f}" for x in v)
                    cp_runs = ", ".join(f"{c:.2f}" for c in cps)
                    table.append(f"| {fmt} | {cname.split(' (')[0]} | {'cold' if args.cold else 'warm'} | {k} | "
                                 f"{d['bytes'] / 1e9:.2f} | {s:.2f} ({runs}) | "
                                 f"{cp:.2f} ({cp_runs}) | **{cp / s:.2f}** | "
                                 f"{statistics.median(x['cpu'] for x in v):.2f} / {statistics.median(cpu_cp):.2f} | "
                                 f"{max(x['hwm_above'] for x in v) / 1e6:.0f} |")
                    print(table[-1], flush=True)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n| source | cut | cache | writer | out GB | slice s: median (runs) | cp s: median (runs) | ratio | "
          "CPU s slice / cp | peak VmHWM MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    print("load at the end", load())


if __name__ == "__main__":
    main()
