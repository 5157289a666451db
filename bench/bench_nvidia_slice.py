"""Cutting NVIDIA's elastic release at real layer sizes: `nestlm.slicing.slice` on a synthetic checkpoint with
Nemotron-3-Nano's shapes (hidden 2688, 128 experts x 1856 + a 3712 shared expert, 64 Mamba heads x 64 in 8
groups, 32/2 attention heads x 128, untied 131072 vocab), in BF16 and in ModelOpt NVFP4 with NVIDIA's mixed
precision (the attention layer and the Mamba layer before it in bf16), cut to 23B- and 12B-like widths.

    python bench/bench_nvidia_slice.py --quick       # seconds: 8 experts, vocab 16384, pattern MEM*E
    python bench/bench_nvidia_slice.py               # pattern MEMEM*E (3 MoE layers): 9.3 GB bf16, 3.6 GB nvfp4

What is measured, per source format and cut (medians of --repeats):
    slice s   the whole slice() call in a fresh python process (open, plan, read, write, rename) + `sync`;
              the libraries (torch, torch._dynamo, nestlm with nestlm.quant, transformers' config classes) are
              imported before the clock starts and their import time is printed apart (a `nestlm slice`
              command pays it once)
    cp s      `cp` of the same output files (same disk) + `sync`
    ratio     cp s / slice s: slicing throughput as a fraction of copying its output bytes
    cold      page cache dropped before each timed run (root: `sync; echo 3 > /proc/sys/vm/drop_caches`; else
              posix_fadvise(POSIX_FADV_DONTNEED) on the files read) ; warm: the files just read once
    peak RSS  in the slicing process above its baseline after `import nestlm, torch`: VmHWM (includes the
              memory-mapped source pages the process touched) and the sampled peak of RssAnon (its own heap)

The synthetic values are random bytes (slicing copies bytes; their values do not matter). Files go to
--workdir (default /work/scratch17, falling back to a temp folder) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NANO = dict(hidden=2688, experts=128, moe_ffn=1856, shared_ffn=3712, mamba_heads=64, mamba_head_dim=64,
            mamba_groups=8, ssm_state=128, conv_kernel=4, heads=32, kv_heads=2, head_dim=128, vocab=131072)
CUTS = {"23B-like (hidden 2304, moe_ffn 1536)": {"hidden": 2304, "moe_ffn": 1536},
        "12B-like (hidden 1792, moe_ffn 1024)": {"hidden": 1792, "moe_ffn": 1024}}


# ---------------------------------------------------------------------------------------------- the source
def config_json(pattern: str, experts: int, vocab: int) -> dict:
    n = NANO
    return {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "hybrid_override_pattern": pattern,
            "num_hidden_layers": len(pattern), "hidden_size": n["hidden"], "vocab_size": vocab,
            "mamba_num_heads": n["mamba_heads"], "mamba_head_dim": n["mamba_head_dim"], "n_groups": n["mamba_groups"],
            "ssm_state_size": n["ssm_state"], "conv_kernel": n["conv_kernel"], "chunk_size": 128,
            "num_attention_heads": n["heads"], "num_key_value_heads": n["kv_heads"], "head_dim": n["head_dim"],
            "n_routed_experts": experts, "num_experts_per_tok": 6, "moe_intermediate_size": n["moe_ffn"],
            "moe_shared_expert_intermediate_size": n["shared_ffn"], "n_group": 1, "topk_group": 1,
            "norm_topk_prob": True, "routed_scaling_factor": 2.5, "mlp_hidden_act": "relu2",
            "tie_word_embeddings": False, "layer_norm_epsilon": 1e-5, "torch_dtype": "bfloat16"}


def kept_bf16(pattern: str) -> set[int]:
    """NVIDIA's NVFP4 mixed precision: the attention layers and the Mamba layers just before them stay bf16."""
    return {i for i, c in enumerate(pattern) if c == "*"} | \
        {i - 1 for i, c in enumerate(pattern) if c == "*" and i and pattern[i - 1] == "M"}


def tensor_specs(pattern: str, experts: int, vocab: int, fmt: str) -> list[tuple[str, tuple, str]]:
    """(name, shape, safetensors dtype) of every tensor, NVIDIA's names and dtypes; nvfp4: ModelOpt layout
    with the attention layers and the Mamba layers before them kept in bf16 (NVIDIA's exclude list)."""
    n = NANO
    d, h, p, g, s = n["hidden"], n["mamba_heads"], n["mamba_head_dim"], n["mamba_groups"], n["ssm_state"]
    q, kv = n["heads"] * n["head_dim"], n["kv_heads"] * n["head_dim"]
    bf16_layers = kept_bf16(pattern)
    out = [("backbone.embeddings.weight", (vocab, d), "BF16")]

    def linear(name, rows, cols, layer):
        if fmt == "bf16" or layer in bf16_layers:
            out.append((name + ".weight", (rows, cols), "BF16"))
            return
        out.extend([(name + ".weight", (rows, cols // 2), "U8"), (name + ".weight_scale", (rows, cols // 16), "F8_E4M3"),
                    (name + ".weight_scale_2", (), "F32"), (name + ".input_scale", (), "F32")])

    for i, kind in enumerate(pattern):
        m = f"backbone.layers.{i}.mixer."
        out.append((f"backbone.layers.{i}.norm.weight", (d,), "BF16"))
        if kind == "M":
            conv = h * p + 2 * g * s
            linear(m + "in_proj", 2 * h * p + 2 * g * s + h, d, i)
            out += [(m + "conv1d.weight", (conv, 1, n["conv_kernel"]), "BF16"), (m + "conv1d.bias", (conv,), "BF16"),
                    (m + "dt_bias", (h,), "BF16"), (m + "A_log", (h,), "BF16"), (m + "D", (h,), "BF16"),
                    (m + "norm.weight", (h * p,), "BF16")]
            linear(m + "out_proj", d, h * p, i)
        elif kind == "*":
            for name, rows, cols in (("q_proj", q, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, q)):
                linear(m + name, rows, cols, i)
            if fmt == "nvfp4":
                out += [(m + "k_proj.k_scale", (), "F32"), (m + "v_proj.v_scale", (), "F32")]
        else:
            out += [(m + "gate.weight", (experts, d), "F32"), (m + "gate.e_score_correction_bias", (experts,), "F32")]
            for j in range(experts):
                linear(m + f"experts.{j}.up_proj", n["moe_ffn"], d, i)
                linear(m + f"experts.{j}.down_proj", d, n["moe_ffn"], i)
            linear(m + "shared_experts.up_proj", n["shared_ffn"], d, i)
            linear(m + "shared_experts.down_proj", d, n["shared_ffn"], i)
    out.append(("backbone.norm_f.weight", (d,), "BF16"))
    linear("lm_head", vocab, d, -1) if fmt == "bf16" else out.append(("lm_head.weight", (vocab, d), "BF16"))
    return out


def write_source(folder: Path, pattern: str, experts: int, vocab: int, fmt: str, shard_bytes: int = 4 << 30) -> int:
    """The synthetic checkpoint, streamed to disk (random bytes, headers by nestlm.slicing's writer)."""
    import torch

    from nestlm.io.safetensors import DTYPES, split_shards, write_shards
    from nestlm.slicing.plan import OutTensor
    from nestlm.slicing.write import _header

    folder.mkdir(parents=True)
    tensors = [OutTensor(name, [], 0, shape, DTYPES[dt]) for name, shape, dt in tensor_specs(pattern, experts, vocab, fmt)]
    pool = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()

    def write_one(fp: Path, shard):
        with open(fp, "wb") as f:
            f.write(_header(shard))
            for k, t in enumerate(shard):
                left, off = t.nbytes, (k * 4099) % (1 << 20)
                while left:
                    n = min(left, len(pool) - off)
                    f.write(memoryview(pool[off:off + n]))
                    left -= n
                    off = 0

    total = sum(t.nbytes for t in tensors)
    write_shards(folder, split_shards(tensors, lambda t: t.nbytes, shard_bytes), write_one,
                 lambda shard: [t.name for t in shard], total)
    cfg = config_json(pattern, experts, vocab)
    if fmt == "nvfp4":
        excl = ["lm_head"] + [f"backbone.layers.{i}.mixer.{x}" for i in sorted(kept_bf16(pattern))
                              for x in (("q_proj", "k_proj", "v_proj", "o_proj") if pattern[i] == "*"
                                        else ("in_proj", "out_proj"))]
        quant = {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16, "exclude_modules": excl}
        cfg["quantization_config"] = {"quant_method": "modelopt", **quant}
        (folder / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": quant}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    os.sync()
    return total


# ---------------------------------------------------------------------------------------------- timing
def drop_cache(files: list[Path]) -> str:
    """Evict the files from the page cache: drop_caches as root, else posix_fadvise DONTNEED per file."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


CHILD = r"""
import json, os, sys, threading, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0
t_import = time.perf_counter()
import torch, torch._dynamo, nestlm, transformers.models.auto  # slice() checks the cut's config with transformers;
# torch._dynamo: older writers' meta-device shape check imported it (kept, so that A/B runs compare alike);
# the modules slice() imports lazily (packed folders: nestlm.quant; the cut's config class): also once per process
import nestlm.quant, nestlm.model.decoder, transformers.models.nemotron_h.configuration_nemotron_h
from nestlm.arch import SubArch
from nestlm.slicing import slice as slice_
t_import = time.perf_counter() - t_import
base_anon, base_hwm = status("RssAnon:"), status("VmRSS:")
peak = [base_anon]
stop = False
def watch():
    while not stop:
        peak[0] = max(peak[0], status("RssAnon:"))
        time.sleep(0.02)
th = threading.Thread(target=watch, daemon=True); th.start()
src, dst, sub = sys.argv[1], sys.argv[2], SubArch(**json.loads(sys.argv[3]))
t0 = time.perf_counter()
stats = {}
slice_(src, sub, dst, stats=stats)
os.sync()
dt = time.perf_counter() - t0
stop = True; th.join()
print(json.dumps({"seconds": dt, "bytes": stats["bytes_written"], "import_s": t_import, "hwm_above": status("VmHWM:") - base_hwm,
                  "anon_above": max(peak[0], status("RssAnon:")) - base_anon}))
"""


def run_slice(src: Path, dst: Path, sub: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), json.dumps(sub)], env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_cp(files: list[Path], work: Path) -> float:
    t0 = time.perf_counter()
    for i, f in enumerate(files):
        subprocess.run(["cp", str(f), str(work / f"cp_{i}.safetensors")], check=True)
    os.sync()
    dt = time.perf_counter() - t0
    for i in range(len(files)):
        (work / f"cp_{i}.safetensors").unlink()
    return dt


def measure(src: Path, sub: dict, work: Path, repeats: int, cold: bool) -> dict:
    src_files = sorted(src.glob("*.safetensors"))
    rows, how = [], ""
    if not cold:  # warm: one untimed run reads the source into the page cache
        run_slice(src, work / "out", sub)
        shutil.rmtree(work / "out")
    for _ in range(repeats):
        if cold:
            how = drop_cache(src_files)
        r = run_slice(src, work / "out", sub)
        out_files = sorted((work / "out").glob("model*.safetensors"))
        if cold:
            drop_cache(out_files)
        r["cp"] = run_cp(out_files, work)
        rows.append(r)
        shutil.rmtree(work / "out")
    med = lambda k: statistics.median(r[k] for r in rows)
    return {"bytes": rows[0]["bytes"], "slice_s": med("seconds"), "cp_s": med("cp"), "how": how,
            "import_s": med("import_s"),
            "hwm": max(r["hwm_above"] for r in rows), "anon": max(r["anon_above"] for r in rows)}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 experts, vocab 16384, pattern MEM*E: seconds")
    ap.add_argument("--pattern", default=None, help="hybrid_override_pattern (default MEMEM*E; quick MEM*E)")
    ap.add_argument("--experts", type=int, default=None, help="routed experts per MoE layer (default 128)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default 131072)")
    ap.add_argument("--formats", default="bf16,nvfp4")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    ap.add_argument("--workdir", default="/work/scratch17")
    args, _ = ap.parse_known_args(argv)
    pattern = args.pattern or ("MEM*E" if args.quick else "MEMEM*E")
    experts = args.experts or (8 if args.quick else NANO["experts"])
    vocab = args.vocab or (16384 if args.quick else NANO["vocab"])
    try:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="bench_nvslice_", dir=args.workdir))
    except OSError:
        root = Path(tempfile.mkdtemp(prefix="bench_nvslice_"))
    head = (f"| {'source':<24} | {'cut':<36} | {'cache':<5} | {'out GB':>6} | {'slice s':>7} | {'cp s':>6} | "
            f"{'ratio':>5} | {'slice GB/s':>10} | {'HWM MB':>7} | {'anon MB':>7} |")
    lines = [head, "|" + "|".join("-" * len(c) for c in head.strip("|").split("|")) + "|"]
    how = ""
    try:
        for fmt in args.formats.split(","):
            t0 = time.perf_counter()
            src = root / fmt
            total = write_source(src, pattern, experts, vocab, fmt)
            print(f"wrote the {fmt} source ({total / 1e9:.2f} GB, pattern {pattern}, {experts} experts, vocab {vocab}) "
                  f"in {time.perf_counter() - t0:.0f} s", flush=True)
            for cname, sub in CUTS.items():
                for cold in ([False] if args.no_cold else [False, True]):
                    r = measure(src, sub, root, args.repeats, cold)
                    how = r["how"] or how
                    lines.append(f"| {f'{fmt} {total / 1e9:.2f} GB':<24} | {cname:<36} | {'cold' if cold else 'warm':<5} | "
                                 f"{r['bytes'] / 1e9:>6.2f} | {r['slice_s']:>7.2f} | {r['cp_s']:>6.2f} | "
                                 f"{r['cp_s'] / r['slice_s']:>5.2f} | {r['bytes'] / r['slice_s'] / 1e9:>10.2f} | "
                                 f"{r['hwm'] / 1e6:>7.0f} | {r['anon'] / 1e6:>7.0f} |")
                    print(lines[-1] + f" (imports {r['import_s']:.1f} s)", flush=True)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = "\n".join(lines) + (f"\nmedians of {args.repeats} run(s); ratio = cp s / slice s for the same output bytes "
                                f"(both include sync); cold: {how or 'not run'}; HWM / anon: peak VmHWM / RssAnon of "
                                "the slicing process above its baseline after imports")
    print()
    print(table)
    return table


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
