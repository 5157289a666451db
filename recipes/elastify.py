"""Elastify a model: train nested submodels for several budgets inside it, with a learned router.

    python recipes/elastify.py --tiny --out /tmp/elastic_tiny              # a random tiny hybrid, ~10 s
    python recipes/elastify.py --config elastic.yaml --model path/to/hf --text corpus.txt --out out/elastic
    python recipes/elastify.py ... --max-steps 500    # stop after 500 steps; run the same command to resume

The same script on N processes (PyTorch DDP or FSDP2; gloo on CPU, nccl on GPUs), only flags change:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 recipes/elastify.py --parallel ddp --tiny --out /tmp/elastic_ddp
    torchrun --nproc_per_node 8 recipes/elastify.py --parallel fsdp2 --config elastic.yaml --model path/to/hf ...

Every rank takes batch / N rows of each global batch (the config's `batch` must divide by N), draws the same
budgets, and gets the one-process losses up to float summation order; rank 0 writes the log, the checkpoint
manifest and this report. A run may stop on N processes and resume on M (torch.distributed.checkpoint).
On CPU this is a correctness path, not a speedup: the tiny run on a busy 2-core machine took ~27 ms per step
on 1 process, ~43 ms with DDP and ~100 ms with FSDP2 on 2 (gloo collectives dominate a 21k-parameter model).

The training loop itself is `nestlm.elastic.train.elastify` (src/nestlm/elastify.py), readable top to bottom:
sort the parent, freeze a copy as the teacher, then per step sample a budget, let the router pick the widths,
distill the sliced submodel, and keep its cost on budget. This script only gathers the inputs and prints the
result: each budget's architecture, parameters and held-out KL to the teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import nestlm
from nestlm import ElasticConfig, SubArch
from nestlm.cli import device_args
from nestlm.elastic.losses import kd_loss


def tiny_parent() -> nestlm.Decoder:
    cfg = nestlm.ModelConfig(vocab_size=64, hidden_size=32, pattern="M*-E", num_heads=4, num_kv_heads=2,
                             head_dim=8, intermediate_size=48, mamba_heads=8, mamba_head_dim=4, mamba_groups=2,
                             ssm_state=8, chunk_size=4, n_experts=4, top_k=2, moe_intermediate_size=16,
                             shared_intermediate_size=24)
    torch.manual_seed(0)  # init_weights leaves some tensors (conv1d) at their default init: seed it too, so
    return nestlm.Decoder(cfg).init_weights(seed=0, std=0.3)  # that every torchrun rank builds the same parent


def tiny_config() -> ElasticConfig:
    return ElasticConfig(budgets=[1.0, 0.75, 0.64], align=4, steps=120, batch=4, seq_len=16, lr_model=1e-3,
                         lr_router=0.03, router_weight=2.0, router_hidden=32, p_full=0.2, calib_batches=2,
                         choices={"hidden": [1.0, 0.875, 0.75, 0.625, 0.5], "ffn": [1.0, 0.5],
                                  "mamba_heads_per_group": [1.0, 0.5]})


def tokens_from_text(model_dir: str, text_path: str | None) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if text_path is None:
        from nestlm.data import kjv_text

        text = kjv_text()
    else:
        text = Path(text_path).read_text()
    return torch.tensor(tok(text)["input_ids"], dtype=torch.long)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="ElasticConfig YAML (default: the tiny demo's settings)")
    ap.add_argument("--model", help="Hugging Face checkpoint folder of the parent model")
    ap.add_argument("--text", help="training text file (default: the KJV bible)")
    ap.add_argument("--tiny", action="store_true", help="random tiny hybrid parent on random tokens")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resume later)")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    ap.add_argument("--parallel", choices=["ddp", "fsdp2"], default=None,
                    help="under torchrun: wrap the student in DDP (default) or shard it with FSDP2")
    device_args(ap)  # --device, --dtype (under torchrun each rank computes on its own device)
    args = ap.parse_args(argv)

    # ---- inputs: the parent, the data, the elastic config
    if args.tiny or args.model is None:
        parent = tiny_parent()
        tokens = torch.randint(0, 64, (8000,), generator=torch.Generator().manual_seed(0))
    else:
        parent = nestlm.from_hf(args.model)
        tokens = tokens_from_text(args.model, args.text)
    ecfg = ElasticConfig.load(args.config) if args.config else tiny_config()
    n_val = max(ecfg.seq_len * 4, len(tokens) // 50)
    train, val = tokens[:-n_val], tokens[-n_val:]

    # ---- train (resumes from args.out/train/ unless --fresh)
    times = []
    out = nestlm.elastify(ecfg, parent, train, args.out, max_steps=args.max_steps, resume=not args.fresh,
                          parallel=args.parallel, on_step=lambda rec: times.append(time.perf_counter()),
                          device=args.device, dtype=args.dtype)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    if len(times) > 1:
        ms = (times[-1] - times[0]) / (len(times) - 1) * 1e3
        print(f"{len(times)} steps on {os.environ.get('WORLD_SIZE', '1')} process(es): {ms:.1f} ms per step")
    if not (out / "nestlm_elastic.json").exists():
        print(f"stopped early; checkpoint in {out / 'train'} (run again to resume)")
        return

    # ---- report: each budget's architecture and its held-out KL to the full model it was distilled from
    model, router, manifest = nestlm.load_elastic(out)
    n = (len(val) // ecfg.seq_len) * ecfg.seq_len
    ids = val[:n].view(-1, ecfg.seq_len)[:8]
    with torch.no_grad():
        full = model(ids)
        print(f"{'budget':>8} {'params':>10} {'ratio':>7} {'KL to full':>10}  widths")
        for name, b in manifest["budgets"].items():
            sub = SubArch.from_dict(b["sub"])
            kl = float(kd_loss(model(ids, sub=sub), full))
            widths = {k: v for k, v in b["sub"].items() if v is not None}
            print(f"{name:>8} {b['params']:>10,} {b['cost_ratio']:>7.3f} {kl:>10.4f}  {json.dumps(widths)}")
    print(f"elastic checkpoint: {out}")


if __name__ == "__main__":
    main()
