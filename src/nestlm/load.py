"""One opener for every folder nestlm reads: a plain Hugging Face checkpoint, a packed FP8 / NVFP4 one (the
quantization enters here, at load time: the Decoder itself knows nothing of it), or an elastic checkpoint
(the full model, plus its router and manifest). Everything about the folder is read once, here: the family
config (with the Nemotron-H lm_head quirk: nestlm.convert.folder_config), the stored dtype, the packed
format, the weights' headers, the manifest (checked against the config) and, on demand, the router.

    folder = open_folder("path/hf")                          # Folder: hf, cfg, src, fmt, manifest, dtype
    name, sub = folder.budget("60%")                         # nestlm.elastic.artifact.resolve_budget
    model = folder.load()                                    # plain, or packed (dequantized)
    model = nestlm.from_hf("path/hf")                        # the same, in one call
    model, router, manifest = nestlm.load_elastic("out/elastic")
    out, what = convert_folder("path/hf", "out/hf")          # `nestlm convert`: read in, written back
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nestlm.arch import SubArch, count_params
from nestlm.convert import FAMILIES, decoder, folder_config, moe
from nestlm.elastic.artifact import MANIFEST, check_manifest, read_manifest, read_router, resolve_budget
from nestlm.elastic.router import Router
from nestlm.errors import CheckpointError, UnsupportedArchitecture
from nestlm.io.safetensors import QUANT_CONFIG, Source, check_output, read_config
from nestlm.model.config import ModelConfig
from nestlm.model.decoder import Decoder
from nestlm.quant.formats import Format
from nestlm.quant.packed import Tensors, dequantize_state, format_of

__all__ = ["Folder", "convert_folder", "from_hf", "load_elastic", "load_quantized", "open_folder"]


@dataclass
class Folder:
    """A checkpoint folder, opened: read once, then handed to whatever slices, counts, evaluates or loads it."""

    path: Path
    hf: dict  # config.json
    cfg: ModelConfig  # the family's config of it (Nemotron-H lm_head quirk applied)
    src: Source  # the weights: headers read, tensors memory-mapped on demand
    fmt: Format | None = None  # a packed FP8 / NVFP4 folder's format (ModelOpt layout), else None
    weight_only: bool = False  # packed without activation scales (W4A16_NVFP4)
    manifest: dict | None = None  # an elastic checkpoint's manifest, checked against cfg; None for a plain folder
    _router: Router | None = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype of the unquantized tensors (the embeddings')."""
        return self.src.dtype(FAMILIES[self.cfg.family].hf_name("embeddings.weight", self.cfg))

    @property
    def format_name(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.fmt.quant_algo} (+ {dtype})" if self.fmt is not None else dtype

    @property
    def kv_bytes(self) -> float:
        """Bytes per KV-cache element: 1 with the ModelOpt FP8 KV cache, else 2."""
        if self.fmt is None:
            return 2.0
        hq = json.loads((self.path / QUANT_CONFIG).read_text()) if (self.path / QUANT_CONFIG).is_file() else {}
        kv = (hq.get("quantization") or {}).get("kv_cache_quant_algo") or \
            self.hf["quantization_config"].get("kv_cache_quant_algo")
        return 1.0 if str(kv).upper() == "FP8" else 2.0

    def router(self) -> Router:
        """The trained router of an elastic checkpoint (read on first use, then kept)."""
        if self.manifest is None:
            raise CheckpointError(f"{self.path}: no {MANIFEST} (not an elastic checkpoint): no router")
        if self._router is None:
            self._router = read_router(self.path, self.cfg, self.manifest)
        return self._router

    def budget(self, budget: str | float | SubArch | None = None, sub=None) -> tuple[str, SubArch]:
        """(name, SubArch) of a budget of this folder: nestlm.elastic.artifact.resolve_budget."""
        return resolve_budget(self.path, budget, sub=sub, cfg=self.cfg, manifest=self.manifest, router=self.router)

    def load(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Decoder:
        """The Decoder of these weights in `dtype` on `device`; a packed folder's quantized weights are
        dequantized (exactly the fake-quantized model's weights)."""
        if self.fmt is None:
            return decoder(self.path, self.cfg, self.src, dtype, device)
        return decoder(self.path, self.cfg, _Ckpt(dequantize_state({k: self.src.get(k) for k in self.src.keys()},
                                                                   dtype)), dtype, device)


def open_folder(path: str | Path, elastic: bool = False, check_weights: bool = True) -> Folder:
    """Open a checkpoint folder: config.json, its family config, the packed format, the weights' headers and
    the manifest (CheckpointError naming the file when broken or another model's). elastic: the manifest is
    required. check_weights: every HF tensor name and shape checked against the config before anything is
    read (what the streamed slicer needs; loading checks the converted tensors instead, and also reads
    transformers' in-memory layouts)."""
    path = Path(path)
    manifest = read_manifest(path, required=True) if elastic else None
    hf = read_config(path)
    fmt, weight_only = format_of(hf, path) if "quantization_config" in hf else (None, False)
    opened: dict[str, Source] = {}  # the weights are opened once the config is known to describe a model

    def weights() -> Source:
        if "src" not in opened:
            opened["src"] = Source(path)
        return opened["src"]

    cfg = folder_config(path, hf, weights)
    src = weights()
    if check_weights and fmt is None:  # a packed folder's shapes are checked when it is loaded
        _check_weights(path, cfg, src)
    if not elastic:
        manifest = read_manifest(path)
    if manifest is not None:
        check_manifest(path, cfg, manifest)
    return Folder(path, hf, cfg, src, fmt, weight_only, manifest)


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for the on-disk layout that nestlm.to_hf writes for `cfg`."""
    with torch.device("meta"):
        sd = Decoder(cfg).state_dict()
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: tuple(v.shape) for k, v in FAMILIES[cfg.family].state_to_hf(sd, cfg).items()}


def _check_weights(path: Path, cfg: ModelConfig, src: Source) -> None:
    have = {k for k in src.keys() if not k.startswith("mtp.") and "rotary_emb" not in k}
    if cfg.family == "nemotron_h" and any(k.startswith("model.") for k in have):
        raise UnsupportedArchitecture(f"{path}: nemotron_h tensors named model.* (transformers' in-memory "
                                      "layout); re-export with nestlm.to_hf(nestlm.from_hf(path), new_dir)")
    fused = ("experts.gate_up_proj", "experts.down_proj")
    if cfg.family in moe.EXPERT_NAMES and any(k.endswith(fused) for k in have):
        raise UnsupportedArchitecture(f"{path}: {cfg.family} experts stored fused (experts.gate_up_proj: "
                                      "transformers' in-memory layout); re-export with "
                                      "nestlm.to_hf(nestlm.from_hf(path), new_dir)")
    want = _expected_shapes(cfg)
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = sorted(set(want) - have - optional)
    extra = sorted(have - set(want) - optional)
    if missing or extra:
        raise CheckpointError(f"{path}: weights don't match config.json: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                              f"{' ...' if len(extra) > 5 else ''}")
    bad = [(k, tuple(src.shape(k)), s) for k, s in want.items() if k in have and tuple(src.shape(k)) != s]
    if bad:
        k, got, exp = bad[0]
        raise CheckpointError(f"{path}: tensor {k} has shape {got} but config.json implies {exp} "
                              f"({len(bad)} mismatched tensors)")


class _Ckpt(Tensors):
    """In-memory tensors with what the family converters read from a SafetensorsDir."""

    def same(self, a, b):
        return torch.equal(self.d[a], self.d[b])


def from_hf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Decoder:
    """Load a Hugging Face checkpoint folder (config.json + safetensors) as a nestlm Decoder. A packed FP8 /
    NVFP4 folder (a `quantization_config` in config.json) is dequantized."""
    return open_folder(path, check_weights=False).load(dtype, device)


def load_elastic(path: str | Path):
    """-> (model, router, manifest) from an elastic checkpoint folder written by `elastify` / `export` (packed
    or not). Raises CheckpointError naming the file for a missing, unreadable or mismatched manifest or router."""
    folder = open_folder(path, elastic=True, check_weights=False)
    model = folder.load()
    return model, folder.router(), folder.manifest


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Decoder:
    """A packed checkpoint (written by export_quantized / slice_quantized / quantize) as a Decoder whose
    quantized weights are dequantized to `dtype`; CheckpointError for a plain folder."""
    format_of(read_config(path), Path(path))  # refuses a plain folder, saying so
    return from_hf(path, dtype, device)


def convert_folder(src: str | Path, dst: str | Path, overwrite: bool = False) -> tuple[Path, str]:
    """`nestlm convert`: the checkpoint folder `src` read into nestlm and written back to `dst` as an HF checkpoint
    in its stored dtype, tokenizer files copied (a packed folder: a dequantized copy). `dst` is checked (new, or
    overwrite; never an input) before anything is read. -> (dst, what was written, in words)."""
    from nestlm.convert import to_hf

    check_output(dst, src, overwrite=overwrite)  # before reading
    folder = open_folder(src, check_weights=False)
    model = folder.load(folder.dtype)
    out = to_hf(model, dst, overwrite=overwrite)
    qc = folder.hf.get("quantization_config")
    note = f": a dequantized copy of the {qc.get('quant_algo', 'quantized')} packed checkpoint " \
        "(nestlm quantize packs it again)" if qc else ""
    return out, f"({count_params(model.cfg):,} parameters, {str(folder.dtype).removeprefix('torch.')}){note}"
