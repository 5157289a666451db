"""`nestlm quantize`: a checkpoint folder (plain or elastic) -> a packed FP8 / NVFP4 checkpoint in the ModelOpt
layout (which vLLM reads): load, fake-quantize, calibrate, pack (nestlm.slicing.packed.export_quantized).

    quantize("elastic_dir", "out/nvfp4", "nvfp4")            # stays elastic: manifest and router copied
    quantize("elastic_dir", "out/nvfp4_75", "nvfp4", "75%")  # one budget (= slicing the packed elastic folder)

The primitives are nestlm.quant's (formats, fake quantization, the packed layout); the writer is
nestlm.slicing.packed's; reading a packed folder back is nestlm.load's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nestlm.elastic.artifact import MANIFEST, ROUTER_FILE, SLICE_FILE, budget_subs, provenance
from nestlm.errors import CheckpointError, ConfigError
from nestlm.io.safetensors import check_output
from nestlm.io.tokenizer import check_ids, load_tokenizer, text_tokens
from nestlm.load import open_folder
from nestlm.quant.fake import calibrate, check_subarch, fake_quantize_
from nestlm.quant.formats import get_format
from nestlm.slicing.packed import export_quantized

__all__ = ["quantize"]


def quantize(src: str, out: str, fmt: str = "nvfp4", budget: str | None = None, calib_tokens: int = 8192,
             text: str | None = None, seq_len: int = 256, batch: int = 8, overwrite: bool = False,
             progress: bool = True) -> Path:
    """`nestlm quantize`: an HF checkpoint folder or an elastic checkpoint -> a packed `fmt` checkpoint.

    The weights are fake-quantized, activations are calibrated on `calib_tokens` tokens of `text` (a .txt /
    .jsonl file; default: the start of the KJV Bible) at the full model and, for an elastic checkpoint, at
    every budget of its manifest (one input_scale serves all budgets), then packed. An elastic checkpoint
    stays elastic (manifest and router copied): slice_quantized cuts budgets out of it. budget: write only
    that budget (a manifest name, a fraction); identical to slicing the packed elastic checkpoint.
    calib_tokens=0: no calibration (NVFP4 weight-only; FP8 needs calibration, fp8_channel does not).
    The tensors that stay unquantized keep the source's dtype. Tokenizer files are copied."""
    fmt_ = get_format(fmt)
    path = Path(src)
    check_output(out, path, text, overwrite=overwrite)  # before calibrating
    folder = open_folder(path, check_weights=False)
    if folder.fmt is not None:
        raise CheckpointError(f"{path} is already quantized ({folder.hf['quantization_config'].get('quant_algo')})")
    cfg, manifest = folder.cfg, folder.manifest
    subs = [None, *budget_subs(manifest).values()]
    for s in subs:
        check_subarch(cfg, s, fmt_)  # before any work
    name, sub = (None, None) if budget is None else folder.budget(budget)
    if sub is not None:
        check_subarch(cfg, sub, fmt_)
    model = folder.load()
    fake_quantize_(model, fmt_)  # calibrate the activations the quantized weights produce
    amax = None
    if calib_tokens > 0 and fmt_.act_max is not None:
        amax = calibrate(model, _calibration_batches(path, cfg.vocab_size, text, calib_tokens, seq_len, batch),
                         subs, progress=progress)
    extra, copy = {}, ()
    if sub is None and manifest is not None:
        copy = (MANIFEST, ROUTER_FILE)
    elif sub is not None:
        extra = {SLICE_FILE: provenance(path, name, sub, cfg, quant_format=fmt_.name)}
    return export_quantized(model, out, fmt_, sub=sub, input_amax=amax, tokenizer_dir=path, overwrite=overwrite,
                            copy=copy, extra=extra, dtype=folder.dtype)


def _calibration_batches(path: Path, vocab_size: int, text: str | None, n_tokens: int, seq_len: int,
                         batch: int) -> list[torch.Tensor]:
    from nestlm.data import kjv_text, load_text

    tok = load_tokenizer(path, vocab_size)
    ids = text_tokens(tok, load_text(text) if text is not None else kjv_text(), n_tokens)
    n = len(ids) // seq_len
    if n == 0:
        raise ConfigError(f"calibration text gives {len(ids)} tokens, fewer than one window of {seq_len}")
    check_ids(ids, vocab_size, "calibration text")
    return list(ids[: n * seq_len].view(n, seq_len).split(batch))
