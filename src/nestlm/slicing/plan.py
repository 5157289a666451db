"""The streaming plan of a cut: every output tensor of a submodel with its HF name, shape, dtype and the
source reads behind it, from nestlm.model.layout's cuts (the one slicing rule) and the family converter's
HF names. Nothing is read but headers; nestlm.slicing.write and nestlm.quant.packed execute plans.

    path, cfg, src, manifest = open_source("path/hf")   # config, weights and manifest checked together
    for t in plan(src, cfg, SubArch(hidden=448)): t.name, t.shape, t.pieces
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from nestlm.arch import SubArch, sliced_config
from nestlm.convert import FAMILIES, folder_config, moe, nemotron_h
from nestlm.elastic.artifact import (
    check_manifest,
    read_manifest,
)
from nestlm.errors import CheckpointError, UnsupportedArchitecture
from nestlm.io.safetensors import (
    Source,
    read_config,
)
from nestlm.model.config import ModelConfig
from nestlm.model.layout import Cut, is_stacked, model_cuts

__all__ = ["OutTensor", "Piece", "open_source", "plan"]


def open_source(path: str | Path) -> tuple[Path, ModelConfig, Source, dict | None]:
    """(path, config, tensors, manifest or None), with config/weights/manifest checked against each other."""
    path = Path(path)
    hf = read_config(path)
    cfg = folder_config(path)
    src = Source(path)
    if "quantization_config" not in hf:  # a packed folder's shapes are checked by nestlm.quant's loader
        cfg = _check_weights(path, cfg, src)
    manifest = read_manifest(path)
    if manifest is not None:
        check_manifest(path, cfg, manifest)
    return path, cfg, src, manifest


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for the on-disk layout that nestlm.to_hf writes for `cfg`."""
    from nestlm.model.decoder import Decoder

    with torch.device("meta"):
        sd = Decoder(cfg).state_dict()
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: tuple(v.shape) for k, v in FAMILIES[cfg.family].state_to_hf(sd, cfg).items()}


def _check_weights(path: Path, cfg: ModelConfig, src: Source) -> ModelConfig:
    have = {k for k in src.keys() if not k.startswith("mtp.") and "rotary_emb" not in k}
    if cfg.family == "nemotron_h" and any(k.startswith("model.") for k in have):
        raise UnsupportedArchitecture(f"{path}: nemotron_h tensors named model.* (transformers' in-memory "
                                      "layout); re-export with nestlm.to_hf(nestlm.from_hf(path), new_dir)")
    fused = ("experts.gate_up_proj", "experts.down_proj")
    if cfg.family in moe.EXPERT_NAMES and any(k.endswith(fused) for k in have):
        raise UnsupportedArchitecture(f"{path}: {cfg.family} experts stored fused (experts.gate_up_proj: "
                                      "transformers' in-memory layout); re-export with "
                                      "nestlm.to_hf(nestlm.from_hf(path), new_dir)")
    if cfg.family == "nemotron_h" and cfg.tie_embeddings and nemotron_h.runs_own_lm_head(src):
        cfg = dataclasses.replace(cfg, tie_embeddings=False)  # as load_hf_state: the file's own head runs
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
    return cfg


@dataclass
class Piece:
    src: str  # source tensor name
    idx: tuple  # one slice per dim


@dataclass
class OutTensor:
    name: str
    pieces: list[Piece]
    dim: int  # the pieces are concatenated along this dim
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _out_tensor(src, name: str, src_name: str, c: Cut) -> OutTensor:
    """Output `name` = source `src_name` cut to `c`: prefix dims sliced, and at most one dim of several runs
    (the first heads of each group) read run by run and concatenated along it."""
    shape = list(src.shape(src_name))
    c = tuple(c) + (None,) * (len(shape) - len(c))
    runs = [r if r is not None else ((0, shape[d]),) for d, r in enumerate(c)]
    multi = [d for d, r in enumerate(runs) if len(r) > 1 or r[0][0] != 0]
    if len(multi) > 1:
        raise ValueError(f"{src_name}: cut along several dims at once ({multi})")
    dim = multi[0] if multi else 0
    pieces = [Piece(src_name, tuple(slice(a, b) if d == dim else slice(0, runs[d][0][1])
                                    for d in range(len(shape)))) for a, b in runs[dim]]
    out_shape = tuple(sum(b - a for a, b in r) for r in runs)
    return OutTensor(name, pieces, dim, out_shape, src.dtype(src_name))


def plan(src: Source, cfg: ModelConfig, sub: SubArch | None) -> list[OutTensor]:
    """Every output tensor of the submodel `sub`: its HF name, shape, dtype and the source reads behind it.
    The cuts are nestlm.model.layout's (the sliced forward's); the HF names are the family converter's."""
    s = (sub or SubArch()).resolve(cfg)
    small = sliced_config(cfg, s)
    fam = FAMILIES[cfg.family]
    out = []
    for name, (src_name, c) in model_cuts(cfg, s).items():
        if is_stacked(src_name):  # one tensor per expert on disk: the kept experts, each cut on (out, in)
            kept = range(cfg.n_experts) if c[0] is None else [j for a, b in c[0] for j in range(a, b)]
            out += [_out_tensor(src, fam.hf_name(name, small, new_j), fam.hf_name(src_name, cfg, j), c[1:])
                    for new_j, j in enumerate(kept)]
        else:
            out.append(_out_tensor(src, fam.hf_name(name, small), fam.hf_name(src_name, cfg), c))
    if getattr(fam, "WRITES_LM_HEAD", False) and not any(t.name == "lm_head.weight" for t in out):
        emb = fam.hf_name("embeddings.weight", cfg)  # a tied source: the head is the embedding matrix
        head = "lm_head.weight" if "lm_head.weight" in src else emb
        out.append(_out_tensor(src, "lm_head.weight", head, model_cuts(cfg, s)["embeddings.weight"][1]))
    return out
