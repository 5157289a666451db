"""nestlm Decoder vs transformers: prefill (forward) and cached greedy generation throughput.

Same weights, same inputs, fp32, torch.inference_mode; warmup runs, then `--repeats` timed runs; MEDIANS.

    python bench/bench_model.py              # full settings
    python bench/bench_model.py --quick      # < 3 min on 2 CPU cores
    python bench/bench_model.py --repeats 7 --models tiny_nemotron_h
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from nestlm.device import set_threads

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

MODELS = ("tiny_nemotron_h", "smollm2_135m")


# ---------------------------------------------------------------------------------------------- models
@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every HF weight a value that matters (HF's init leaves norms at 1 and many blocks near zero,
    which would make routing and outputs degenerate)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in sorted(model.named_parameters()):
        if n.endswith(("norm.weight", "norm_f.weight", "layernorm.weight")):
            v = 1 + 0.2 * torch.randn(p.shape, generator=g)
        elif "A_log" in n:
            v = torch.rand(p.shape, generator=g) * 1.5
        elif "dt_bias" in n:
            v = torch.rand(p.shape, generator=g) * 2 - 1
        elif p.dim() >= 2:
            v = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
        else:
            v = 0.1 * torch.randn(p.shape, generator=g)
        p.copy_(v.to(p.dtype))


def tiny_nemotron_h(tmp: Path):
    """A small random Nemotron-H (8 blocks M E M * - M E -, hidden 256, vocab 1024): (ours, transformers)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    import nestlm

    blocks = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
    cfg = NemotronHConfig(
        vocab_size=1024, hidden_size=256, layers_block_type=[blocks[c] for c in "MEM*-ME-"],
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=512,
        mamba_num_heads=8, mamba_head_dim=32, n_groups=1, ssm_state_size=64, conv_kernel=4, chunk_size=64,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
        moe_shared_expert_intermediate_size=256, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    hf = NemotronHForCausalLM(cfg).eval()
    _randomize(hf)
    hf.save_pretrained(tmp / "tiny_nemotron_h")
    return nestlm.from_hf(tmp / "tiny_nemotron_h"), hf


def smollm2_135m(tmp: Path):
    """SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152), or None when not installed."""
    try:
        from nestlm.data.pretrained import has_smollm2, smollm2_135m_dir
    except ImportError:
        return None
    if not has_smollm2():
        return None
    from transformers import AutoModelForCausalLM

    import nestlm

    path = smollm2_135m_dir()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return nestlm.from_hf(path), hf


# ---------------------------------------------------------------------------------------------- timing
def _median_seconds(fns, warmup: int, repeats: int) -> list[float]:
    """Median wall time of each function in `fns`. Runs are interleaved (a b a b ...) so that load from
    other processes hits every contender alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def bench_pair(name: str, ours, hf, args) -> tuple[list[tuple], list[str]]:
    """Rows (model, what, ours tok/s, hf tok/s) and notes (correctness checks) for one model."""
    from nestlm.inference.generate import generate

    vocab = ours.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    rows, notes = [], []
    warmup = max(args.warmup - 1, 0)  # the correctness check below is the first warmup run
    pb, pt = args.prefill_batch, args.prefill_len
    if name == "smollm2_135m" and args.quick:
        pb = min(pb, 2)  # its 49k-vocab lm_head on 4 x 256 tokens alone takes seconds on 2 cores
    with torch.inference_mode():
        # prefill: one forward over [pb, pt] tokens, logits for every position (both sides)
        ids = torch.randint(0, vocab, (pb, pt), generator=g)
        a, b = ours(ids), hf(ids, use_cache=False).logits
        notes.append(f"{name}: prefill max |logit diff| = {(a - b).abs().max().item():.2e}")
        del a, b
        t_ours, t_hf = _median_seconds([lambda: ours(ids), lambda: hf(ids, use_cache=False)], warmup,
                                       args.repeats)
        rows.append((name, f"prefill {pb}x{pt}", pb * pt / t_ours, pb * pt / t_hf))

        # cached greedy generation, batch 1: prompt + new tokens, tok/s counts the new tokens
        n_new = args.new_tokens
        prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=g)
        mask = torch.ones_like(prompt)

        def run_ours():
            return generate(ours, prompt, n_new)

        def run_hf():
            # eos_token_id=[]: no EOS. With one, min_new_tokens would mask it in transformers only and the
            # greedy outputs would differ as soon as the model prefers EOS (SmolLM2 does on random prompts)
            return hf.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=n_new,
                               min_new_tokens=n_new, eos_token_id=[], pad_token_id=0)

        same = torch.equal(run_ours(), run_hf())
        notes.append(f"{name}: greedy generations identical: {same}")
        t_ours, t_hf = _median_seconds([run_ours, run_hf], warmup, args.repeats)
        rows.append((name, f"generate {args.prompt_len}+{n_new} b1", n_new / t_ours, n_new / t_hf))
    return rows, notes


def format_table(rows: list[tuple]) -> str:
    head = ("model", "what", "ours tok/s", "transformers tok/s", "ratio (ours/theirs)")
    body = [(m, w, f"{o:,.1f}", f"{t:,.1f}", f"{o / t:.2f}x") for m, w, o, t in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in body)])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller SmolLM2 prefill (< 3 min)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (the first one is also the "
                   "ours-vs-transformers check); default 1 with --quick, else 2")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads; default: nestlm.device.default_threads (the cores other processes leave "
                        "idle, by the load average), since oversubscribed OpenMP threads slow small ops by up to 10x")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    t0 = time.time()
    rows, notes = [], []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    all_threads = torch.get_num_threads()
    n = set_threads(args.threads)  # nestlm.device's rule: the cores other processes leave idle unless given
    if args.threads is None and n < all_threads:
        notes.append(f"load average {load:.1f} at start: using {n} of {all_threads} threads (set --threads to "
                     "override)")
    if load > 0.5:
        notes.append(f"load average was {load:.1f} at start: other processes share the CPU, timings are noisy")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            pair = {"tiny_nemotron_h": tiny_nemotron_h, "smollm2_135m": smollm2_135m}[name](Path(tmp))
            if pair is None:
                notes.append(f"{name}: skipped (not installed; see nestlm.data.pretrained)")
                continue
            r, n = bench_pair(name, *pair, args)
            rows += r
            notes += n
            del pair
    table = format_table(rows)
    print(f"\n## bench_model: nestlm vs transformers {_versions()} (fp32, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}, {time.time() - t0:.0f} s)\n")
    print(table)
    for n in notes:
        print("  " + n)
    sys.stdout.flush()
    return table


def _versions() -> str:
    import transformers

    return f"{transformers.__version__}, torch {torch.__version__}"


if __name__ == "__main__":
    main(sys.argv[1:])
