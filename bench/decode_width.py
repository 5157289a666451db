"""Where width starts to pay on this machine: per-token decode time (batch 1) of random-init Nemotron-H decoders
of the reasoning recipe's shape (pattern M*-M*-), a full-width L against an S with about 31% of its parameters
(every width x0.625, FFN x0.25), at several hidden sizes.

    python bench/decode_width.py --hidden 128 256 512 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import nestlm
from nestlm.data import ByteTokenizer
from nestlm.inference.generate import generate


def model_config(hidden: int, ffn: int) -> nestlm.ModelConfig:
    head_dim = max(16, hidden // 4)
    return nestlm.ModelConfig.from_dict({
        "family": "nemotron_h", "vocab_size": ByteTokenizer().vocab_size, "tie_embeddings": True,
        "hidden_size": hidden, "pattern": "M*-M*-", "num_heads": 4, "num_kv_heads": 2, "head_dim": head_dim,
        "intermediate_size": ffn, "mamba_heads": 8, "mamba_head_dim": head_dim, "mamba_groups": 2, "ssm_state": 16,
        "chunk_size": 32})


def ms_per_token(cfg: nestlm.ModelConfig, prompt: int, new: int, repeats: int) -> tuple[int, float]:
    """(parameters, median ms per generated token including the prompt's prefill)."""
    model = nestlm.Decoder(cfg).eval()
    ids = torch.randint(0, 250, (1, prompt))
    generate(model, ids, 4)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        generate(model, ids, new)
        times.append((time.perf_counter() - t) / new * 1000)
    return sum(p.numel() for p in model.parameters()), statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="*", default=[128, 256, 512, 1024])
    ap.add_argument("--prompt", type=int, default=20)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for h in args.hidden:
        n_l, t_l = ms_per_token(model_config(h, 3 * h), args.prompt, args.new, args.repeats)
        n_s, t_s = ms_per_token(model_config(int(h * 0.625) // 8 * 8, 3 * h // 4), args.prompt, args.new, args.repeats)
        print(f"hidden {h}: L {n_l / 1e6:.2f}M {t_l:.2f} ms/token, S {n_s / 1e6:.2f}M ({n_s / n_l:.0%}) "
              f"{t_s:.2f} ms/token, S/L time {t_s / t_l:.2f}", flush=True)


if __name__ == "__main__":
    main()
