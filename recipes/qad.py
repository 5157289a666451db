"""Quantization-aware distillation (QAD) of an elastic checkpoint, then a packed FP8 / NVFP4 export.

    python recipes/qad.py nestlm-demo/elastic --out /tmp/qad                       # NVFP4, 200 steps, KJV
    python recipes/qad.py ELASTIC_DIR --out DIR --fmt fp8 --steps 500 --text corpus.txt
    python recipes/qad.py ELASTIC_DIR --out DIR --config recipes/configs/qad_demo.yaml

1. The elastic config: the checkpoint's own (its manifest: budgets, choices, router settings) with
   quant = fmt, sort = false (the parent is already sorted) and the QAD overrides (--config, --steps).
2. `nestlm.elastify` from the elastic checkpoint: the teacher is a frozen full-precision copy, the student
   the same weights fake-quantized (nestlm.quant.fake_quantize_), trained by KL to the teacher on every
   budget, sampled as in elastic training, starting from the checkpoint's trained router. Its output folder
   (DIR/elastify) holds the student's latent (full-precision) weights, the router and a manifest.
3. Those latent weights fake-quantized again, activations calibrated at every budget,
   packed: DIR/<fmt> is a packed elastic checkpoint (manifest and router kept) that vLLM loads and
   `nestlm.slicing.slice_quantized` cuts budgets out of.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

import nestlm
from nestlm.cli import device_args
from nestlm.elastic.artifact import MANIFEST, ROUTER_FILE, read_manifest
from nestlm.elastic.config import ElasticConfig
from nestlm.info import quantized_bytes
from nestlm.quant import calibrate, fake_quantize_
from nestlm.slicing import export_quantized

# QAD defaults on top of the checkpoint's own elastic config: a short run at a small learning rate, every
# budget sampled equally often (p_full = 1 / budgets: the full model has quantization error to recover too)
QAD_DEFAULTS = {"steps": 200, "lr_model": 1e-4, "checkpoint_every": 50, "sort": False}


def qad_config(elastic_dir: str | Path, fmt: str, overrides: dict | None = None) -> ElasticConfig:
    """The elastic checkpoint's ElasticConfig (budgets from its manifest) with quant=fmt and the overrides."""
    manifest = read_manifest(elastic_dir, required=True)
    d = dict(manifest["elastic"])
    d["budgets"] = sorted((b["fraction"] for b in manifest["budgets"].values()), reverse=True)
    d.update(QAD_DEFAULTS | {"p_full": 1 / len(d["budgets"])} | (overrides or {}) | {"quant": fmt})
    return ElasticConfig.from_dict(d)


def train_tokens(elastic_dir: str | Path, vocab_size: int, text: str | None = None, val_frac: float = 0.05):
    """The training stream: the front of the text (default: the KJV Bible), its last val_frac held out."""
    from nestlm.data import kjv_text, load_text, split
    from nestlm.io.tokenizer import load_tokenizer

    tok = load_tokenizer(elastic_dir, vocab_size)
    ids = tok.encode_tensor(load_text(text) if text is not None else kjv_text())
    return split(ids, val_frac)[0]


def load_student(elastify_dir: str | Path, fmt: str) -> nestlm.Decoder:
    """The QAD student: the latent weights elastify exported, fake-quantized (what training computed)."""
    return fake_quantize_(nestlm.from_hf(elastify_dir), fmt).eval()


def qad(elastic_dir: str | Path, out_dir: str | Path, fmt: str = "nvfp4", overrides: dict | None = None,
        data: torch.Tensor | None = None, calib_batches: int = 8, progress: bool = True,
        device: str | None = None, dtype: str | None = None) -> dict:
    """Steps 1-3 of the module doc. Returns {"elastify": dir, "packed": dir, "student": Decoder, ...}.
    device, dtype: where and in which precision the QAD run trains (nestlm.elastify's)."""
    elastic_dir, out = Path(elastic_dir), Path(out_dir)
    ecfg = qad_config(elastic_dir, fmt, overrides)
    parent = nestlm.from_hf(elastic_dir)
    data = train_tokens(elastic_dir, parent.cfg.vocab_size) if data is None else data

    t0 = time.perf_counter()
    run = nestlm.elastify(ecfg, parent, data, out / "elastify", progress=progress, router_init=elastic_dir,
                          device=device, dtype=dtype)
    seconds = time.perf_counter() - t0

    student = load_student(run, fmt)  # 3: latent weights, activations, packed export
    manifest = read_manifest(run, required=True)
    subs = [None] + [nestlm.SubArch.from_dict(b["sub"]) for b in manifest["budgets"].values()]
    amax = calibrate(student, _batches(data, calib_batches, ecfg.batch, ecfg.seq_len), subs, progress=progress)
    packed = export_quantized(student, out / fmt, fmt, input_amax=amax, tokenizer_dir=elastic_dir, overwrite=True)
    for name in (MANIFEST, ROUTER_FILE):  # the QAD run's budgets and router: the packed folder stays elastic
        shutil.copy2(run / name, packed / name)
    return {"elastify": run, "packed": packed, "student": student, "seconds": seconds, "config": ecfg}


def _batches(data: torch.Tensor, n: int, batch: int, seq_len: int) -> list[torch.Tensor]:
    """n consecutive [batch, seq_len] windows from the end of the stream (elastify reads it from the front)."""
    need = n * batch * seq_len
    return list(data[-need:].view(n, batch, seq_len).unbind(0))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("elastic", help="an elastic checkpoint folder (nestlm elastify / nestlm demo's elastic/)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fmt", default="nvfp4", choices=["nvfp4", "fp8"])
    ap.add_argument("--config", type=Path, help="YAML of ElasticConfig overrides for the QAD run")
    ap.add_argument("--steps", type=int, help="QAD steps (default 200)")
    ap.add_argument("--text", help="training text file (default: the KJV Bible)")
    device_args(ap)
    args = ap.parse_args(argv)

    import yaml

    overrides = yaml.safe_load(args.config.read_text()) if args.config else {}
    if args.steps:
        overrides["steps"] = args.steps
    data = None
    if args.text:
        vocab = nestlm.from_hf(args.elastic).cfg.vocab_size
        data = train_tokens(args.elastic, vocab, args.text)
    res = qad(args.elastic, args.out, args.fmt, overrides, data, device=args.device, dtype=args.dtype)
    b = quantized_bytes(res["packed"])
    print(f"QAD: {res['config'].steps} steps in {res['seconds']:.0f} s -> {res['elastify']}")
    print(f"packed {args.fmt}: {res['packed']} ({b['bytes_per_quantized_param']:.4f} bytes per quantized "
          f"parameter, {b['file_bytes']:,} bytes of safetensors)")


if __name__ == "__main__":
    main()
