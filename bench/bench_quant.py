"""FP8 / NVFP4 quality and storage per budget of an elastic checkpoint: full precision, FP8 PTQ, NVFP4 PTQ
and NVFP4 QAD; held-out KJV perplexity, its recovery, bytes on disk of the packed exports.

    OMP_NUM_THREADS=1 python bench/bench_quant.py --elastic nestlm-demo/elastic     # ~5 min on 1 CPU thread
    OMP_NUM_THREADS=1 python bench/bench_quant.py            # first builds the demo's elastic checkpoint

Perplexity: exp(mean next-token NLL) on the held-out end of the KJV stream (the demo's validation split),
the same windows for every row. A quantized row loads the packed checkpoint with nestlm.load.load_quantized
(dequantized weights, activations in full precision: weight-only fake quantization) and runs each budget's
SubArch, which equals the budget sliced out of the packed checkpoint (tests/test_quant.py).
recovery = ppl(full precision) / ppl(quantized) at the same budget. QAD: recipes/qad.py (starting from the
checkpoint's router); each QAD budget is evaluated at the original manifest's widths and at its own.
Bytes: the packed elastic checkpoint and each sliced budget; "B/qparam" = bytes of the quantized weights and
all their scales / quantized parameters. Times are medians of --repeat runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import time
from pathlib import Path

import nestlm
from nestlm.arch import SubArch
from nestlm.data import ByteTokenizer, kjv_text, perplexity, split
from nestlm.elastic.artifact import read_manifest
from nestlm.info import quantized_bytes
from nestlm.load import load_quantized
from nestlm.quantize import quantize
from nestlm.slicing import slice_quantized

ROOT = Path(__file__).resolve().parents[1]


def load_recipe():
    spec = importlib.util.spec_from_file_location("qad_recipe", ROOT / "recipes" / "qad.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def median_time(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elastic", type=Path, help="elastic checkpoint (default: build the demo's in --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_quant"))
    ap.add_argument("--qad-steps", type=int, default=200)
    ap.add_argument("--qad-lr", type=float, default=1e-4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=96)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing (median)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke settings (bench/run.py --quick): the quick demo, 40 QAD steps, fewer windows")
    args, _ = ap.parse_known_args(argv)  # bench/run.py passes the same arguments to every bench
    if args.quick:
        args.qad_steps, args.eval_windows, args.calib_tokens, args.repeat = 40, 24, 4096, 1
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.elastic is None:
        from nestlm.demo import demo

        demo(out_dir=work / "demo", quick=args.quick)
        args.elastic = work / "demo" / "elastic"
    elastic = args.elastic

    # ---- held-out tokens and the full-precision elastic model
    val = split(ByteTokenizer().encode_tensor(kjv_text()), val_frac=0.05)[1]
    manifest = read_manifest(elastic, required=True)
    budgets = {n: SubArch.from_dict(b["sub"]) for n, b in manifest["budgets"].items()}
    fp = nestlm.from_hf(elastic)

    def ppl(model, sub):
        return perplexity(model, val, args.seq_len, batch=16, sub=sub, max_windows=args.eval_windows)

    res = {"elastic": str(elastic), "eval_tokens": args.eval_windows * args.seq_len, "rows": {}}
    for name, sub in budgets.items():
        res["rows"][name] = {"params": nestlm.count_params(fp.cfg, sub), "fp": ppl(fp, sub)}

    # ---- PTQ: quantize the elastic checkpoint (calibrated at every budget), load the packed folder
    times = {}
    for fmt in ("fp8", "nvfp4"):
        out = work / f"ptq_{fmt}"
        times[f"quantize {fmt}"], _ = median_time(
            lambda fmt=fmt, out=out: quantize(str(elastic), str(out), fmt, calib_tokens=args.calib_tokens,
                                              seq_len=args.seq_len, overwrite=True, progress=False), args.repeat)
        q = load_quantized(out)
        for name, sub in budgets.items():
            res["rows"][name][f"{fmt}_ptq"] = ppl(q, sub)
        res[f"bytes_{fmt}"] = quantized_bytes(out)

    # ---- QAD: recipes/qad.py (elastify with a fake-quantized student), packed NVFP4
    recipe = load_recipe()
    t0 = time.perf_counter()
    shutil.rmtree(work / "qad", ignore_errors=True)  # a fresh QAD run (the recipe would resume an old one)
    run = recipe.qad(elastic, work / "qad", "nvfp4", {"steps": args.qad_steps, "lr_model": args.qad_lr,
                                                      "checkpoint_every": args.qad_steps}, progress=False)
    res["qad_seconds"] = time.perf_counter() - t0
    q = load_quantized(run["packed"])
    qad_manifest = read_manifest(run["packed"], required=True)
    for name, sub in budgets.items():
        res["rows"][name]["nvfp4_qad"] = ppl(q, sub)
        own = SubArch.from_dict(qad_manifest["budgets"][name]["sub"])
        res["rows"][name]["nvfp4_qad_own"] = ppl(q, own)
        res["rows"][name]["qad_own_params"] = nestlm.count_params(fp.cfg, own)

    # ---- storage: the packed elastic checkpoints and every budget sliced out of them
    fp_bytes = sum(p.stat().st_size for p in elastic.glob("model*.safetensors"))
    res["bytes_fp32"] = fp_bytes
    slices = {}
    for fmt in ("fp8", "nvfp4"):
        for name in budgets:
            dst = work / f"slice_{fmt}_{name.replace('%', '')}"
            t, _ = median_time(lambda fmt=fmt, name=name, dst=dst: slice_quantized(
                work / f"ptq_{fmt}", dst, name, overwrite=True), args.repeat)
            slices[(fmt, name)] = quantized_bytes(dst) | {"seconds": t}
    (work / "bench_quant.json").write_text(json.dumps(res | {"times": times, "slices": {
        f"{f}/{n}": v for (f, n), v in slices.items()}}, indent=2, default=str))

    # ---- report
    pct = lambda a, b: f"{100 * a / b:.1f}%"
    rows = []
    for name, r in res["rows"].items():
        rows.append([name, f"{r['params']:,}", f"{r['fp']:.3f}", f"{r['fp8_ptq']:.3f} ({pct(r['fp'], r['fp8_ptq'])})",
                     f"{r['nvfp4_ptq']:.3f} ({pct(r['fp'], r['nvfp4_ptq'])})",
                     f"{r['nvfp4_qad']:.3f} ({pct(r['fp'], r['nvfp4_qad'])})",
                     f"{r['nvfp4_qad_own']:.3f} ({r['qad_own_params']:,} params)"])
    print(f"\nelastic checkpoint {elastic}; held-out KJV perplexity on {res['eval_tokens']:,} tokens "
          f"(recovery = ppl_fp / ppl_q); QAD: {args.qad_steps} steps in {res['qad_seconds']:.0f} s\n")
    quality = table(["budget", "params", "ppl full precision", "FP8 PTQ", "NVFP4 PTQ", "NVFP4 QAD",
                     "NVFP4 QAD at its own widths"], rows)
    print(quality)
    srows = [["elastic (all budgets)", "fp32", f"{fp_bytes:,}", "4.0000", ""]]
    for fmt in ("fp8", "nvfp4"):
        b = res[f"bytes_{fmt}"]
        srows.append(["elastic (all budgets)", fmt, f"{b['file_bytes']:,}", f"{b['bytes_per_quantized_param']:.4f}",
                      f"{times[f'quantize {fmt}']:.2f} s (quantize)"])
        for name in budgets:
            s = slices[(fmt, name)]
            srows.append([name, fmt, f"{s['file_bytes']:,}", f"{s['bytes_per_quantized_param']:.4f}",
                          f"{s['seconds'] * 1000:.0f} ms (slice)"])
    storage = table(["checkpoint", "format", "safetensors bytes", "B/qparam", "median time"], srows)
    print()
    print(storage)
    return quality + "\n\n" + storage


if __name__ == "__main__":
    main()
