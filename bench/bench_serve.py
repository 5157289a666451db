"""Requests per second of `nestlm serve` at 1, 4 and 16 concurrent clients.

    python bench/bench_serve.py --elastic nestlm-demo/elastic     # the demo model (nestlm demo --out nestlm-demo)
    python bench/bench_serve.py --quick                           # builds `nestlm demo --quick` in a temp folder

The server runs in its own process on 127.0.0.1 (a free port), with one torch thread by default
(`--threads`), continuously batched (`--max-batch`, default 32; `--max-batch 1` serves one sequence at a
time, the unbatched baseline). Each client sends non-streaming `/v1/completions` requests back to back (no
think time) until the level's `--requests` are done. Each level runs `--repeats` times (default 3); the table
shows the median requests/s and the median of the repeats' p50 / p95 latency. Workloads (`--workload`,
several allowed):

    s2l     think on the smallest budget (thinking_token_budget --think), answer on the full one (--answer
            tokens), re-prefill: budget control
    l-cap   the full model thinks (the same cap) and answers: standard budget control
    plain   the full model, --answer tokens, no thinking

Prompts are distinct lines of text, greedy decoding. Thinking runs to the budget unless the model writes
'</think>' (the demo model, trained on the Bible, never does), so every request generates about the same
number of tokens. Columns: req/s (requests / wall time of the level), its ratio to 1 client, p50 and p95
latency per request, generated tokens/s, the server's median queue wait, and the largest decoding batch a
request shared a step with.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

PROMPTS = ["In the beginning", "And God said", "The LORD is my shepherd", "Blessed are the", "And it came to pass",
           "Now the serpent was", "For God so loved", "Let there be", "And the earth was", "Thou shalt not",
           "He that hath ears", "Behold, I stand", "In my Father's house", "The heavens declare",
           "Vanity of vanities", "Ask, and it shall"]


def request_body(workload: str, models: list[str], prompt: str, think: int, answer: int) -> dict:
    full, small = models[0], models[-1]
    body = {"model": full, "prompt": prompt, "max_tokens": answer, "temperature": 0}
    if workload == "s2l":
        body.update(think_model=small, thinking_token_budget=think, switch="reprefill")
    elif workload == "l-cap":
        body.update(thinking_token_budget=think)
    elif workload != "plain":
        raise SystemExit(f"unknown workload {workload!r}")
    return body


def post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def level(url: str, bodies: list[dict], clients: int, timeout: float) -> dict:
    """Send every body (clients at a time, each client back to back); -> timings of the level."""
    lat, toks, waits, errors, batch = [], [], [], [], []
    lock, nxt = threading.Lock(), iter(range(len(bodies)))

    def client():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                r = post(url, bodies[i], timeout)
            except OSError as e:
                errors.append(str(e))
                continue
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                toks.append(r["usage"]["completion_tokens"])
                waits.append(r["nestlm"]["queue_s"])
                batch.append(r["nestlm"].get("peak_batch", 1))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout * len(bodies))
    wall = time.perf_counter() - t0
    lat.sort()
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "wall_s": wall,
            "req_s": len(lat) / wall, "p50_s": statistics.median(lat), "p95_s": lat[round(0.95 * (len(lat) - 1))],
            "tok_s": sum(toks) / wall, "queue_median_s": statistics.median(waits), "peak_batch": max(batch)}


def median_of(runs: list[dict]) -> dict:
    """The repeats of one level -> one row: the median of every timing, the largest batch, all errors."""
    row = {k: statistics.median(r[k] for r in runs) for k in ("req_s", "p50_s", "p95_s", "tok_s", "queue_median_s")}
    return {**runs[0], **row, "peak_batch": max(r["peak_batch"] for r in runs),
            "errors": sum(r["errors"] for r in runs), "repeats": len(runs)}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elastic", default=None, help="an elastic checkpoint (default: build `nestlm demo --quick`)")
    ap.add_argument("--quick", action="store_true", help="fewer requests per level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default 32, quick 16)")
    ap.add_argument("--workload", nargs="+", default=["s2l"], choices=["s2l", "l-cap", "plain"])
    ap.add_argument("--think", type=int, default=32, help="thinking-token budget")
    ap.add_argument("--answer", type=int, default=16, help="answer tokens (max_tokens)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (1: no batching)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each level (the table shows medians)")
    ap.add_argument("--device", default=None, help="the server's --device (default: its rule)")
    ap.add_argument("--extract", action="store_true", help="serve each budget extracted (nestlm serve --extract)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args, _ = ap.parse_known_args(argv)
    from nestlm.inference.serve import launch, stop, wait_ready

    n = args.requests or (16 if args.quick else 32)
    tmp = None
    path = args.elastic
    if path is None:
        from nestlm.demo import demo

        tmp = tempfile.TemporaryDirectory(prefix="nestlm_bench_serve_")
        demo(out_dir=tmp.name, quick=True)
        path = str(Path(tmp.name) / "elastic")
    proc, url = launch(path, "--threads", str(args.threads), "--max-batch", str(args.max_batch),
                       *(["--extract"] if args.extract else []), *(["--device", args.device] if args.device else []))
    rows = []
    try:
        wait_ready(proc, url)
        with urllib.request.urlopen(url + "/models", timeout=10) as r:
            models = [m["id"] for m in json.loads(r.read())["data"]]  # largest first
        for w in args.workload:
            bodies = [request_body(w, models, PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)),
                                   args.think, args.answer) for i in range(n)]
            level(url, bodies[:2], 1, args.timeout)  # warm-up (first-call costs, extraction)
            for c in args.concurrency:
                runs = []
                for _ in range(args.repeats):
                    runs.append(level(url, bodies, c, args.timeout))
                    print(json.dumps({"workload": w, **runs[-1]}), file=sys.stderr, flush=True)
                rows.append({"workload": w, **median_of(runs)})
    finally:
        stop(proc)
        if tmp is not None:
            tmp.cleanup()
    think_of = {"s2l": f"{models[-1]} -> {models[0]}", "l-cap": f"{models[0]} -> {models[0]}", "plain": "-"}
    lines = [f"nestlm serve {path} (continuous batching, --max-batch {args.max_batch}; server threads {args.threads}"
             f"{', extracted' if args.extract else ''}); thinking budget {args.think}, answer {args.answer} tokens, "
             f"{n} requests per level, median of {args.repeats} runs", "",
             "| workload | think -> answer | clients | req/s | x 1 client | p50 s | p95 s | tok/s | queue median s | "
             "peak batch | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        one = next((x["req_s"] for x in rows if x["workload"] == r["workload"] and x["clients"] == 1), None)
        ratio = f"{r['req_s'] / one:.2f}" if one else "-"
        lines.append(f"| {r['workload']} | {think_of[r['workload']]} | {r['clients']} | {r['req_s']:.2f} | {ratio} | "
                     f"{r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['tok_s']:.0f} | {r['queue_median_s']:.3f} | "
                     f"{r['peak_batch']} | {r['errors']} |")
    table = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return table


if __name__ == "__main__":
    print(main())
