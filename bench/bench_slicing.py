"""Zero-shot slicing throughput: `nestlm.slicing.slice` (elastic checkpoint -> plain HF checkpoint, streamed
from the memory-mapped safetensors) vs copying the same number of bytes with `cp`.

    slice MB/s = bytes of the sliced model*.safetensors / seconds of the whole slice() call
                 (opening + checking the source, planning, reading the kept prefixes, writing, renaming)
    cp MB/s    = the same bytes / seconds of `cp` (a subprocess) copying that sliced output file to a new
                 file in the same folder (same disk)
    ratio      = slice MB/s / cp MB/s (1.0: slicing is as fast as a plain copy of its output)

Source checkpoints: a synthetic random Nemotron-H (Mamba2 + attention + MoE + MLP, float32, written once to
a temp folder; ~100 MB with --quick, ~300 MB otherwise) and, without --quick, SmolLM2-135M (Llama, 540 MB)
when `nestlm.data.pretrained.has_smollm2()`. One warmup run (the source is then in the page cache, as it is
for cp), then `--repeats` runs of slice and cp taking turns; MEDIANS. Each output is deleted after its run.

    python bench/bench_slicing.py --quick    # < 1 min
    python bench/bench_slicing.py            # ~2-3 min
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")


def synthetic_nemotron_h(root: Path, quick: bool) -> tuple[Path, dict]:
    """A random Nemotron-H checkpoint folder and {budget name: SubArch} to cut from it."""
    import torch

    import nestlm
    from nestlm import SubArch

    d = 512 if quick else 768
    cfg = nestlm.ModelConfig(
        vocab_size=16384, hidden_size=d, pattern="ME*-ME*-" if quick else "ME*-ME*-ME*-", num_heads=8,
        num_kv_heads=2, head_dim=64, intermediate_size=4 * d, mamba_heads=16, mamba_head_dim=64, mamba_groups=2,
        ssm_state=64, n_experts=8, top_k=2, moe_intermediate_size=2 * d, shared_intermediate_size=2 * d)
    with torch.device("meta"):
        model = nestlm.Decoder(cfg)
    model = model.to_empty(device="cpu").init_weights(seed=0)
    src = nestlm.to_hf(model, root / "nemotron_h")
    n = cfg.n_blocks
    subs = {
        "77% widths": SubArch(hidden=int(0.75 * d), mamba_heads_per_group=6, attn_heads_per_group=3, ffn=3 * d,
                              moe_ffn=3 * d // 2, shared_ffn=3 * d // 2, experts=6),
        "50% width+depth": SubArch(hidden=d // 2, mamba_heads_per_group=4, attn_heads_per_group=2, ffn=2 * d,
                                   moe_ffn=d, shared_ffn=d, experts=4, layers=tuple(range(n - 4))),
    }
    return src, subs


def smollm2() -> tuple[Path, dict] | None:
    from nestlm import SubArch
    from nestlm.data.pretrained import has_smollm2, smollm2_135m_dir

    if not has_smollm2():
        return None
    keep = tuple(i for j in range(30) if j % 6 != 5 for i in (2 * j, 2 * j + 1))  # 25 of 30 layers
    return smollm2_135m_dir(), {
        "hidden 432, 6 heads": SubArch(hidden=432, attn_heads_per_group=2, ffn=1152),
        "+ 25/30 layers": SubArch(hidden=432, attn_heads_per_group=2, ffn=1152, layers=keep),
    }


def time_pair(src: Path, sub, work: Path, repeats: int) -> dict:
    from nestlm.slicing import slice as slice_

    t_slice, t_cp, nbytes, peak = [], [], 0, 0
    for r in range(repeats + 1):
        out = work / f"slice{r}"
        stats = {}
        t0 = time.perf_counter()
        slice_(src, sub, out, stats=stats)
        ts = time.perf_counter() - t0
        files = sorted(out.glob("model*.safetensors"))
        nbytes, peak = sum(f.stat().st_size for f in files), stats["peak_bytes"]
        t0 = time.perf_counter()
        for f in files:
            subprocess.run(["cp", str(f), str(work / f"copy{r}_{f.name}")], check=True)
        tc = time.perf_counter() - t0
        if r:  # round 0 warms the page cache
            t_slice.append(ts)
            t_cp.append(tc)
        shutil.rmtree(out)
        for f in work.glob(f"copy{r}_*"):
            f.unlink()
    s, c = statistics.median(t_slice), statistics.median(t_cp)
    return {"bytes": nbytes, "slice_s": s, "cp_s": c, "slice_mbs": nbytes / s / 1e6, "cp_mbs": nbytes / c / 1e6,
            "ratio": c / s, "peak": peak}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp folder)")
    args, _ = ap.parse_known_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)

    tmp = Path(tempfile.mkdtemp(prefix="nestlm_bench_slicing_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        sources = {"synthetic nemotron_h": synthetic_nemotron_h(tmp, args.quick)}
        src_bytes = {"synthetic nemotron_h": sum(f.stat().st_size for f in
                                                  sources["synthetic nemotron_h"][0].glob("*.safetensors"))}
        print(f"built the synthetic checkpoint ({src_bytes['synthetic nemotron_h'] / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        if not args.quick and (s := smollm2()) is not None:
            sources["smollm2_135m"] = s
            src_bytes["smollm2_135m"] = (s[0] / "model.safetensors").stat().st_size
        head = (f"| {'source (MB)':<26} | {'budget':<20} | {'out MB':>7} | {'peak MB':>7} | {'slice s':>7} | "
                f"{'slice MB/s':>10} | {'cp s':>6} | {'cp MB/s':>8} | {'ratio':>5} |")
        lines = [head, "|" + "|".join("-" * len(c) for c in head.strip("|").split("|")) + "|"]
        for name, (src, subs) in sources.items():
            for bname, sub in subs.items():
                r = time_pair(src, sub, tmp, repeats)
                lines.append(f"| {f'{name} ({src_bytes[name] / 1e6:.0f})':<26} | {bname:<20} | "
                             f"{r['bytes'] / 1e6:>7.1f} | {r['peak'] / 1e6:>7.1f} | {r['slice_s']:>7.3f} | "
                             f"{r['slice_mbs']:>10.0f} | {r['cp_s']:>6.3f} | {r['cp_mbs']:>8.0f} | "
                             f"{r['ratio']:>5.2f} |")
                print(lines[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = "\n".join(lines) + (f"\nmedians of {repeats} runs after a warmup; ratio = slice MB/s / cp MB/s; "
                                "peak = largest tensor slice() held")
    print()
    print(table)
    return table


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
