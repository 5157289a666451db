"""Packed checkpoints in the NVIDIA ModelOpt unified HF layout that vLLM loads, and back.

    export_quantized(model, "out/nvfp4", "nvfp4", input_amax=calibrate(model, batches))
    slice_quantized("out/nvfp4", "out/nvfp4_75", "75%")      # a budget of a packed elastic checkpoint
    model = load_quantized("out/nvfp4")                      # dequantized to fp32, for CPU evaluation
    quantize("elastic_dir", "out/nvfp4", "nvfp4")            # `nestlm quantize`: load, calibrate, export

On disk, per quantized Linear (HF tensor names, as nestlm.convert writes them; one set per MoE expert):
    NVFP4: weight uint8 [out, in/2] (two E2M1 codes a byte, even index low), weight_scale float8_e4m3fn
           [out, in/16], weight_scale_2 fp32 [] (amax / (6*448)), input_scale fp32 [] (act amax / (6*448))
    FP8:   weight float8_e4m3fn [out, in], weight_scale fp32 [] (amax / 448), input_scale fp32 [] (act amax / 448)
    FP8_PER_CHANNEL_PER_TOKEN (fp8_channel): weight_scale fp32 [out], no input_scale (dynamic per token)
plus hf_quant_config.json and config.json's quantization_config (quant_method "modelopt"). Every other
tensor is written as is and listed in exclude_modules.

A packed elastic checkpoint keeps the manifest and the router: a budget is cut out of it by index ranges on
the packed tensors (nestlm.slicing.plan's ranges, halved for the nibbles, divided by 16 for the block scales),
which is exactly the budget quantized with the parent's per-tensor scales (blocks are whole).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from nestlm.arch import SubArch, count_active_params, count_params, sliced_config
from nestlm.config import MANIFEST, ROUTER_FILE
from nestlm.convert import FAMILIES, config_from_hf, nemotron_h
from nestlm.convert.io import (
    QUANT_CONFIG,
    TOKENIZER_FILES,
    CheckpointError,
    SafetensorsDir,
    atomic_dir,
    copy_files,
    read_config,
    split_shards,
    write_shards,
)
from nestlm.model.config import ConfigError
from nestlm.model.decoder import Decoder
from nestlm.model.slice import sliced_state_dict
from nestlm.quant.fake import (
    calibrate,
    check_subarch,
    fake_quant_disabled,
    fake_quantize_,
    quantized_weights,
    weight_scales,
)
from nestlm.quant.formats import (
    BLOCK,
    FORMATS,
    Format,
    fp8_dequantize,
    fp8_quantize,
    get_format,
    nvfp4_dequantize,
    nvfp4_quantize,
)
from nestlm.quant.packed import COMPANIONS, KV_SCALES, cut_quant_configs, materialize, packed_plan
from nestlm.quant.packed import quantized_names as _quantized_names

ALGO_FORMAT = {f.quant_algo: f.name for f in FORMATS.values()} | {"W4A16_NVFP4": "nvfp4"}


# ---------------------------------------------------------------------------------------------- packing
def pack_weights(model, fmt: str | Format, input_amax: dict[str, torch.Tensor] | None = None) -> dict:
    """{weight name: {"weight": packed, "weight_scale": ..., ...}} for every quantized weight of the FULL
    model, from its latent weights (fake quantization, if any, is bypassed). Stacked experts keep their
    leading [experts] dim on every tensor (scalars become [experts])."""
    fmt = get_format(fmt)
    scales = weight_scales(model, fmt)
    out = {}
    with torch.no_grad():
        for q in quantized_weights(model):
            w, s = q.latent().detach(), scales[q.name]
            if fmt.name == "nvfp4":
                packed, block = nvfp4_quantize(w, s)
                d = {"weight": packed, "weight_scale": block, "weight_scale_2": s}
            else:
                d = {"weight": fp8_quantize(w, s), "weight_scale": s}
            if fmt.act_max is not None and input_amax is not None:
                a = input_amax[q.name].to(s.device).float()
                if (a <= 0).any():
                    raise ValueError(f"calibration never reached the input of {q.name}: no input_scale")
                d["input_scale"] = a / fmt.act_max
            out[q.name] = d
    return out


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


# ---------------------------------------------------------------------------------------------- slicing
class _Tensors:
    """A dict of tensors with SafetensorsDir's reading interface."""

    def __init__(self, d: dict[str, torch.Tensor]):
        self.d = d

    def keys(self):
        return list(self.d)

    def __contains__(self, k):
        return k in self.d

    def get(self, k):
        return self.d[k]

    def shape(self, k):
        return list(self.d[k].shape)

    def read(self, k, idx):
        return self.d[k][idx]

    def dtype(self, k):
        return self.d[k].dtype


def _slice_tensors(src, cfg, s: SubArch, fmt: Format) -> dict[str, torch.Tensor]:
    """Every HF tensor of the submodel s cut out of the packed full tensors `src` (in memory)."""
    return {t.name: materialize(src, t) for t in packed_plan(src, cfg, s, fmt)}


# ---------------------------------------------------------------------------------------------- configs
def quant_configs(fmt: Format, tensors: dict, weight_only: bool) -> tuple[dict, dict]:
    """(hf_quant_config.json, config.json's quantization_config), as ModelOpt's HF export writes them."""
    from nestlm import __version__

    quantized = _quantized_names(tensors)
    exclude = sorted(k.removesuffix(".weight") for k in tensors if k.endswith(".weight") and k not in quantized)
    algo = "W4A16_NVFP4" if fmt.name == "nvfp4" and weight_only else fmt.quant_algo
    producer = {"name": "nestlm", "version": __version__}
    quantization = {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": exclude}
    bits = {"num_bits": 4 if fmt.name == "nvfp4" else 8, "type": "float"}
    weights = {"dynamic": False, **bits}
    acts = None if weight_only else {"dynamic": fmt.act_max is None, **bits}
    if fmt.name == "nvfp4":
        quantization["group_size"] = BLOCK
        weights["group_size"] = BLOCK
        acts = acts and {**acts, "group_size": BLOCK}
    if fmt.name == "fp8_channel":
        weights["strategy"], acts["strategy"] = "channel", "token"
    qc = {"quant_method": "modelopt", "quant_algo": algo, "producer": producer, "ignore": exclude,
          "kv_cache_scheme": None, "config_groups": {"group_0": {"weights": weights, "input_activations": acts}}}
    if fmt.name == "nvfp4":
        qc["group_size"] = BLOCK
    return {"producer": producer, "quantization": quantization}, qc


def _format_of(hf: dict, path: Path) -> tuple[Format, bool]:
    """(format, weight only) of a packed checkpoint's config.json."""
    qc = hf.get("quantization_config")
    if not isinstance(qc, dict) or not str(qc.get("quant_method", "")).startswith("modelopt"):
        raise CheckpointError(f"{path}: config.json has no ModelOpt quantization_config (not a packed "
                              "checkpoint; load a plain one with nestlm.from_hf)")
    algo = str(qc.get("quant_algo", "")).upper()
    if algo not in ALGO_FORMAT:
        raise CheckpointError(f"{path}: quant_algo {algo!r} is not one nestlm reads ({sorted(ALGO_FORMAT)})")
    return FORMATS[ALGO_FORMAT[algo]], algo == "W4A16_NVFP4"


# ---------------------------------------------------------------------------------------------- writing
def _write(out: Path, hf: dict, tensors: dict[str, torch.Tensor], fmt: Format, weight_only: bool,
           src_dir: str | Path | None, extra: dict[str, object], copy: tuple[str, ...], overwrite: bool,
           max_shard_bytes: int = 4 << 30) -> Path:
    """config.json (with quantization_config), hf_quant_config.json, safetensors shards, tokenizer files and
    `copy` copied from src_dir, and the JSON files `extra`, written atomically."""
    hq, qc = quant_configs(fmt, tensors, weight_only)
    hf = dict(hf, quantization_config=qc)
    with atomic_dir(Path(out), overwrite) as tmp:
        items = list(tensors.items())
        shards = split_shards(items, lambda kv: kv[1].nbytes, max_shard_bytes)
        write_shards(tmp, shards, lambda fp, sh: save_file(dict(sh), str(fp), metadata={"format": "pt"}),
                     lambda sh: [k for k, _ in sh], sum(v.nbytes for _, v in items))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / QUANT_CONFIG).write_text(json.dumps(hq, indent=2))
        copy_files(src_dir, tmp, TOKENIZER_FILES + _extra_tokenizer_files() + copy)
        for name, obj in extra.items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
    return Path(out)


def _extra_tokenizer_files() -> tuple[str, ...]:
    from nestlm.data import ByteTokenizer

    return (ByteTokenizer.FILE,)


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
        tensors = _slice_tensors(_Tensors(tensors), cfg, s, fmt)
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
    Streamed like nestlm.slicing.slice (one output tensor in memory). The source's quantization settings
    (hf_quant_config.json, config.json's quantization_config) are kept, with the exclude list renumbered
    for the kept layers. stats: as nestlm.slicing.slice's."""
    from nestlm.slicing import SLICE_FILE, Source, _write_shard, resolve_budget

    path = Path(src_dir)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose a new directory or pass overwrite=True")
    hf = read_config(path)
    fmt, weight_only = _format_of(hf, path)
    cfg = config_from_hf(hf)
    manifest = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).is_file() else None
    name, sub = resolve_budget(path, budget, cfg=cfg, manifest=manifest)
    s = sub.resolve(cfg)
    check_subarch(cfg, s, fmt)
    src = Source(path)
    tensors = packed_plan(src, cfg, s, fmt)  # every read planned (and checked) before anything is written
    small = FAMILIES[cfg.family].config_to_hf(sliced_config(cfg, s))
    small["dtype"] = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if (path / QUANT_CONFIG).is_file():  # the source's settings (NVIDIA's: kv cache FP8, its exclude list)
        hq, qc = cut_quant_configs(json.loads((path / QUANT_CONFIG).read_text()), hf["quantization_config"], cfg, s)
    else:
        hq, qc = quant_configs(fmt, {t.name: None for t in tensors}, weight_only)
    small["quantization_config"] = qc
    prov = {"source": str(path.resolve()), "budget": name, "sub": s.to_dict(), "family": cfg.family,
            "params": count_params(cfg, s), "active_params": count_active_params(cfg, s), "quant_format": fmt.name}
    st = {"bytes_written": 0, "peak_bytes": 0, "tensors": len(tensors)}
    shards = split_shards(tensors, lambda t: t.nbytes, max_shard_bytes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory-bound copies (see nestlm.slicing.slice)
    try:
        with atomic_dir(out, overwrite) as tmp:
            write_shards(tmp, shards, lambda fp, shard: _write_shard(fp, src, shard, st),
                         lambda shard: [t.name for t in shard], sum(t.nbytes for t in tensors))
            (tmp / "config.json").write_text(json.dumps(small, indent=2))
            (tmp / QUANT_CONFIG).write_text(json.dumps(hq, indent=2))
            copy_files(path, tmp, TOKENIZER_FILES + _extra_tokenizer_files())
            (tmp / SLICE_FILE).write_text(json.dumps(prov, indent=2))
    finally:
        torch.set_num_threads(threads)
    if stats is not None:
        stats.update(st)
    return out


# ---------------------------------------------------------------------------------------------- loading
def dequantize_state(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF-named packed tensors -> HF-named plain tensors: quantized weights dequantized, their companions
    dropped, every floating tensor in `dtype`."""
    quantized = _quantized_names(tensors)
    out = {}
    for k, v in tensors.items():
        if any(k.endswith("." + c) for c in COMPANIONS) and k.rsplit(".", 1)[0] + ".weight" in quantized:
            continue
        if k.endswith(tuple("." + c for c in KV_SCALES)):  # the FP8 KV cache's scales: not used here
            continue
        if k in quantized:
            base = k.removesuffix("weight")
            if v.dtype == torch.uint8:
                v = nvfp4_dequantize(v, tensors[base + "weight_scale"], tensors[base + "weight_scale_2"], dtype)
            else:
                v = fp8_dequantize(v, tensors[base + "weight_scale"], dtype)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


class _Ckpt(_Tensors):
    """In-memory tensors with what the family converters read from a SafetensorsDir."""

    def same(self, a, b):
        return torch.equal(self.d[a], self.d[b])


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Decoder:
    """A packed checkpoint (written by export_quantized / slice_quantized / quantize) as a Decoder whose
    quantized weights are dequantized to `dtype`: exactly the fake-quantized model's weights."""
    path = Path(path)
    hf = read_config(path)
    _format_of(hf, path)
    cfg = config_from_hf(hf)
    src = SafetensorsDir(path)
    ckpt = _Ckpt(dequantize_state({k: src.get(k) for k in src.keys()}, dtype))
    if cfg.family == "nemotron_h" and cfg.tie_embeddings and nemotron_h.runs_own_lm_head(ckpt):
        cfg = dataclasses.replace(cfg, tie_embeddings=False)  # as nestlm.convert.load_hf_state
    sd = FAMILIES[cfg.family].state_from_hf(ckpt, cfg)
    with torch.device("meta"):
        model = Decoder(cfg)
    try:
        model.load_state_dict(sd, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: tensors don't match config.json ({str(e).splitlines()[0]} ...)") from None
    model = model.to(device=device, dtype=dtype)
    model.source_dir = str(path)
    return model.eval()


def quantized_bytes(path: str | Path) -> dict:
    """Bytes on disk of a packed checkpoint: the quantized weights with their scales, per quantized parameter,
    and the whole safetensors payload."""
    from nestlm.slicing import Source

    src = Source(Path(path))
    hf = read_config(path)
    fmt, _ = _format_of(hf, Path(path))
    quantized = _quantized_names(src.keys())
    nbytes = {k: torch.Size(src.shape(k)).numel() * src.dtype(k).itemsize for k in src.keys()}
    q_bytes = sum(n for k, n in nbytes.items() if k in quantized or (k.rsplit(".", 1)[0] + ".weight") in quantized)
    q_params = sum(torch.Size(src.shape(k)).numel() * (2 if fmt.name == "nvfp4" else 1) for k in quantized)
    files = [p for p in Path(path).glob("*.safetensors") if p.name != ROUTER_FILE]
    return {"quantized_params": q_params, "quantized_bytes": q_bytes,
            "bytes_per_quantized_param": q_bytes / max(q_params, 1),
            "other_bytes": sum(nbytes.values()) - q_bytes, "file_bytes": sum(p.stat().st_size for p in files)}


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
    from nestlm.slicing import SLICE_FILE, resolve_budget

    fmt_ = get_format(fmt)
    path = Path(src)
    hf = read_config(path)
    if "quantization_config" in hf:
        raise CheckpointError(f"{path} is already quantized ({hf['quantization_config'].get('quant_algo')})")
    model = from_hf(path)
    cfg = model.cfg
    manifest = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).is_file() else None
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
        s = sub.resolve(cfg)
        extra = {SLICE_FILE: {"source": str(path.resolve()), "budget": name, "sub": s.to_dict(),
                              "family": cfg.family, "params": count_params(cfg, s),
                              "active_params": count_active_params(cfg, s), "quant_format": fmt_.name}}
    dtype = getattr(torch, str(hf.get("dtype") or hf.get("torch_dtype") or "float32"), torch.float32)
    return export_quantized(model, out, fmt_, sub=sub, input_amax=amax, tokenizer_dir=path, overwrite=overwrite,
                            copy=copy, extra=extra, dtype=dtype)


def _calibration_batches(path: Path, vocab_size: int, text: str | None, n_tokens: int, seq_len: int,
                         batch: int) -> list[torch.Tensor]:
    from nestlm.data import kjv_text, load_text
    from nestlm.evaluate import _tokens, load_tokenizer

    tok = load_tokenizer(path, vocab_size)
    ids = _tokens(tok, load_text(text) if text is not None else kjv_text(), n_tokens)
    n = len(ids) // seq_len
    if n == 0:
        raise ConfigError(f"calibration text gives {len(ids)} tokens, fewer than one window of {seq_len}")
    if int(ids.max()) >= vocab_size:
        raise ConfigError(f"the tokenizer produced id {int(ids.max())} >= the model's vocab_size {vocab_size}")
    return list(ids[: n * seq_len].view(n, seq_len).split(batch))
