"""Writing packed checkpoints (the ModelOpt layout of nestlm.quant.packed), and `nestlm quantize`.

    export_quantized(model, "out/nvfp4", "nvfp4", input_amax=calibrate(model, batches))
    slice_quantized("out/nvfp4", "out/nvfp4_75", "75%")      # a budget of a packed elastic checkpoint
    quantize("elastic_dir", "out/nvfp4", "nvfp4")            # `nestlm quantize`: load, calibrate, export

A packed elastic checkpoint keeps the manifest and the router, so budgets can still be cut out of it
(slice_quantized, by index ranges: nothing is requantized). Reading back: nestlm.quant.load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nestlm.arch import SubArch, sliced_config
from nestlm.convert import FAMILIES
from nestlm.elastic.artifact import (
    MANIFEST,
    ROUTER_FILE,
    SLICE_FILE,
    provenance,
    read_manifest,
    resolve_budget,
)
from nestlm.errors import CheckpointError, ConfigError
from nestlm.io.safetensors import (
    QUANT_CONFIG,
    atomic_dir,
    check_output,
    copy_files,
    read_config,
    split_shards,
    write_shards,
    write_tensors,
)
from nestlm.io.tokenizer import TOKENIZER_FILES, check_ids, load_tokenizer, text_tokens
from nestlm.model.extract import sliced_state_dict
from nestlm.quant.fake import (
    calibrate,
    check_subarch,
    fake_quant_disabled,
    fake_quantize_,
)
from nestlm.quant.formats import (
    Format,
    get_format,
)
from nestlm.quant.packed import (
    COMPANIONS,
    Tensors,
    pack_weights,
    quant_configs,
)
from nestlm.slicing.packed import slice_packed


# ---------------------------------------------------------------------------------------------- packing
def _hf_tensors(model, packed: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named tensors of the full model with the packed weights and their companions in place; the other
    floating-point tensors in `dtype`."""
    cfg = model.cfg
    fam = FAMILIES[cfg.family]
    with fake_quant_disabled(model):
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sliced_state_dict(model, None).items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    sd.update({name: d["weight"] for name, d in packed.items()})
    out = fam.state_to_hf(sd, cfg)
    for comp in COMPANIONS:  # the converter names each companion as the weight it belongs to
        part = {name: d[comp] for name, d in packed.items() if comp in d}
        if not part:
            continue
        part["lm_head.weight"] = torch.empty(0)  # (Nemotron-H would otherwise copy the embeddings)
        for k, v in fam.state_to_hf(part, cfg).items():
            if k != "lm_head.weight":
                out[k.removesuffix("weight") + comp] = v
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- writing
def _write(out: Path, hf: dict, tensors: dict[str, torch.Tensor], fmt: Format, weight_only: bool,
           src_dir: str | Path | None, extra: dict[str, object], copy: tuple[str, ...], overwrite: bool,
           max_shard_bytes: int = 4 << 30) -> Path:
    """config.json (with quantization_config), hf_quant_config.json, safetensors shards, tokenizer files and
    `copy` copied from src_dir, and the JSON files `extra`, written atomically."""
    hq, qc = quant_configs(fmt, tensors, weight_only)
    hf = dict(hf, quantization_config=qc)
    with atomic_dir(Path(out), overwrite, inputs=(src_dir,)) as tmp:
        items = list(tensors.items())
        shards = split_shards(items, lambda kv: kv[1].nbytes, max_shard_bytes)
        write_shards(tmp, shards, lambda fp, sh: write_tensors(fp, dict(sh), {"format": "pt"}),
                     lambda sh: [k for k, _ in sh], sum(v.nbytes for _, v in items))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / QUANT_CONFIG).write_text(json.dumps(hq, indent=2))
        copy_files(src_dir, tmp, TOKENIZER_FILES + copy)
        for name, obj in extra.items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
    return Path(out)


def export_quantized(model, out_dir: str | Path, fmt: str | Format = "nvfp4", sub: SubArch | None = None,
                     input_amax: dict[str, torch.Tensor] | None = None, tokenizer_dir: str | Path | None = None,
                     overwrite: bool = False, copy: tuple[str, ...] = (), extra: dict | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Write the model (or its submodel `sub`) as a packed checkpoint. Per-tensor scales come from the FULL
    model's latent weights; `sub` is cut out of the packed full tensors. input_amax (from `calibrate`) gives
    input_scale; without it NVFP4 is written weight-only (W4A16_NVFP4) and FP8 (static activation scales)
    is refused. dtype: of the tensors that stay unquantized (default: the model's). Tokenizer files (and the
    file names in `copy`) are copied from tokenizer_dir (default: the folder the model was loaded from);
    `extra` {file name: JSON object} is written beside."""
    fmt = get_format(fmt)
    cfg = model.cfg
    check_subarch(cfg, None, fmt)
    if fmt.name == "fp8" and input_amax is None:
        raise ValueError("fp8 stores a static activation scale: pass input_amax from calibrate(), or use "
                         "fp8_channel (dynamic per-token activations)")
    dtype = dtype or model.embeddings.weight.dtype
    tensors = _hf_tensors(model, pack_weights(model, fmt, input_amax), dtype)
    out_cfg = cfg
    if sub is not None and sub.resolve(cfg) != SubArch.full(cfg):
        s = sub.resolve(cfg)
        check_subarch(cfg, s, fmt)
        tensors = slice_packed(Tensors(tensors), cfg, s, fmt)
        out_cfg = sliced_config(cfg, s)
    hf = FAMILIES[cfg.family].config_to_hf(out_cfg)
    hf["dtype"] = str(dtype).removeprefix("torch.")
    src = tokenizer_dir or getattr(model, "source_dir", None)
    weight_only = fmt.act_max is not None and input_amax is None
    return _write(Path(out_dir), hf, tensors, fmt, weight_only, src, extra or {}, copy, overwrite)


def slice_quantized(src_dir: str | Path, out_dir: str | Path, budget: str | float | SubArch,
                    overwrite: bool = False, max_shard_bytes: int = 4 << 30, stats: dict | None = None) -> Path:
    """Cut the submodel `budget` (a manifest name, a fraction, or a SubArch) out of the packed checkpoint
    src_dir by index ranges: packed codes and block scales are read as they are, nothing is requantized.
    The streamed writer of nestlm.slicing (`slice_checkpoint`) does it; this name refuses a plain folder."""
    from nestlm.slicing.write import slice_checkpoint  # (the writer imports nestlm.quant: load it on use)

    if "quantization_config" not in read_config(src_dir):
        raise CheckpointError(f"{src_dir}: config.json has no quantization_config (not a packed checkpoint; "
                              "cut it with nestlm.slicing.slice)")
    return slice_checkpoint(src_dir, budget, out_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                            stats=stats)


# ---------------------------------------------------------------------------------------------- quantize
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
    from nestlm.convert import from_hf

    fmt_ = get_format(fmt)
    path = Path(src)
    check_output(out, path, text, overwrite=overwrite)  # before calibrating
    hf = read_config(path)
    if "quantization_config" in hf:
        raise CheckpointError(f"{path} is already quantized ({hf['quantization_config'].get('quant_algo')})")
    model = from_hf(path)
    cfg = model.cfg
    manifest = read_manifest(path)
    subs = [None] + ([SubArch.from_dict(b["sub"]) for b in manifest["budgets"].values()] if manifest else [])
    for s in subs:
        check_subarch(cfg, s, fmt_)  # before any work
    name, sub = (None, None) if budget is None else resolve_budget(path, budget, cfg=cfg, manifest=manifest)
    if sub is not None:
        check_subarch(cfg, sub, fmt_)
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
    dtype = getattr(torch, str(hf.get("dtype") or hf.get("torch_dtype") or "float32"), torch.float32)
    return export_quantized(model, out, fmt_, sub=sub, input_amax=amax, tokenizer_dir=path, overwrite=overwrite,
                            copy=copy, extra=extra, dtype=dtype)


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
