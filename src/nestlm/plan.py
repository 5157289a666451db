"""A memory plan for elastic training, before any weight is read: does teacher + student + optimizer fit?

    p = plan(ElasticConfig.load("elastic.yaml"), "path/to/hf", gpus=8, parallel="fsdp2", gpu_memory=80 * 2**30)
    print(format_plan(p))            # nestlm plan elastic.yaml --model path/to/hf --gpus 8 --parallel fsdp2

Only config.json is read. Per GPU, in bytes, for the recipe nestlm.elastify runs (nestlm.elastic.train):
- teacher: the frozen parent in the compute dtype (bf16: 2 bytes per weight, fp32: 4);
- student: fp32 weights (the master copy under bf16 autocast), gradients fp32, AdamW state (exp_avg and
  exp_avg_sq fp32, one fp32 step counter per tensor: fused AdamW); FSDP2 divides all four by the GPUs;
- router: its weights, gradients and AdamW state (replicated, tiny);
- bf16 weight copies: autocast casts every matmul weight to bf16 once per forward and keeps it for the
  backward (single process and DDP); FSDP2 all-gathers bf16 blocks instead (about two blocks live at once);
- activations of one micro-batch (batch / GPUs rows of the longest seq_len): what autograd keeps for the
  backward, counted per block kind from the code's saved tensors (estimates within ~25% of the measured
  ones, see tests/test_plan.py), plus the fp32 teacher logits and the logits' gradient. With activation
  checkpointing: each block's input, plus one block recomputed at a time.
Parameter counts come from nestlm.arch (count_params) and the model's own shapes (a Decoder on the meta
device, no memory); the router from the Router itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nestlm.arch import count_params
from nestlm.elastic.config import DEPTH, ElasticConfig
from nestlm.elastic.parallel import MODES
from nestlm.errors import ConfigError
from nestlm.model.config import ModelConfig

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
ROWS = ("teacher", "student", "gradients", "optimizer", "router", "weight_copies", "logits", "activations")


@dataclass
class Plan:
    """Bytes per GPU of each part (ROWS), and what they assume."""

    parts: dict[str, int]
    activations_checkpointed: int  # the `activations` row with activation checkpointing
    checkpointing: bool  # whether the config turns activation checkpointing on (which total counts)
    gpus: int
    parallel: str | None
    dtype: str
    rows_per_gpu: int  # micro-batch rows on one GPU
    seq_len: int
    params: int
    gpu_memory: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.total_with(self.checkpointing)

    def total_with(self, checkpointing: bool) -> int:
        acts = self.activations_checkpointed if checkpointing else self.parts["activations"]
        return sum(v for k, v in self.parts.items() if k != "activations") + acts

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def check(self) -> None:
        """ConfigError, with what would make it fit, when the plan needs more than gpu_memory."""
        if self.fits is False:
            need = "turn on activation_checkpointing" if not self.checkpointing and \
                self.total_with(True) <= self.gpu_memory else \
                "use more GPUs with parallel='fsdp2', or a smaller batch or seq_len"
            raise ConfigError(f"the plan needs {self.total / 2**30:.2f} GiB per GPU, more than gpu_memory "
                              f"{self.gpu_memory / 2**30:.2f} GiB; {need}")


def parse_bytes(text: str | float) -> int:
    """'80e9', '80GB', '80GiB', '81920MiB' (or a number) -> bytes, positive."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "b": 1, "": 1}
    t = str(text).strip().lower()
    num = t.rstrip("kmgtib")
    try:
        n = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        raise ConfigError(f"gpu_memory {text!r}: give bytes, e.g. 80e9, 80GB or 80GiB") from None
    if n <= 0:
        raise ConfigError(f"gpu_memory {text!r}: must be positive")
    return int(n)


def _model_config(model: str | Path | ModelConfig) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    from nestlm.convert import config_from_hf
    from nestlm.io.safetensors import read_config

    return config_from_hf(read_config(model))


def _shapes(cfg: ModelConfig):
    """The Decoder on the meta device: its parameter shapes, no memory."""
    from nestlm.model.decoder import Decoder

    with torch.device("meta"):
        return Decoder(cfg)


def _router_params(cfg: ModelConfig, ecfg: ElasticConfig) -> tuple[int, int]:
    """(parameters, tensors) of the router this config trains."""
    from nestlm.arch import depth_units
    from nestlm.elastic.router import Router

    if ecfg.depth_axis and ecfg.depth_order is None:  # the order elastify scores does not change the shapes
        ecfg = dataclasses.replace(ecfg, depth_order=list(range(len(depth_units(cfg)))))
    r = Router(cfg, ecfg)
    return sum(p.numel() for p in r.parameters()), len(list(r.parameters()))


# ---------------------------------------------------------------------------------------------- activations
def block_activations(cfg: ModelConfig, kind: str, lo: int) -> float:
    """Bytes autograd keeps per token for one block of `kind` (its pre-norm included). lo: bytes of what the
    matmuls see (4 fp32, 2 under bf16 autocast); the residual stream, norms, the SSD scan and the MoE router
    stay fp32 (4). Counted from the saved tensors of nestlm.model.layers (an estimate: see the module doc)."""
    d = cfg.hidden_size
    hi = 4
    n = hi * (2 * d + 1)  # the block input and its RMSNorm (normed output, 1/rms)
    if kind == "-":
        f = cfg.intermediate_size
        n += lo * ((2 * d + 4 * f) if cfg.mlp_act == "swiglu" else (d + 2 * f))  # inputs, activation, down input
    elif kind == "*":
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        n += lo * (2 * d + 2 * q + 2 * kv) + hi * cfg.num_heads  # q/k/v inputs, SDPA's q, k, v, out; logsumexp
    elif kind == "M":
        h, p, g, s, L = cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_groups, cfg.ssm_state, cfg.chunk_size
        hp, gn, conv = h * p, g * s, cfg.mamba_conv_dim
        proj = 2 * hp + 2 * gn + h
        n += lo * (d + proj + 2 * conv + hp)  # in_proj input and output, conv input and output, out_proj input
        # the SSD scan (fp32): dt, x, the intra-chunk decay and CB matrices, chunk states, the output terms
        n += hi * (3 * h + 7 * hp + 2 * h * L + g * L + 4 * gn + h * p * s / L)
        n += hi * (5 * hp + g)  # the gated RMSNorm (y, silu(z), their product, statistics, normed y)
    else:  # "E": routed experts (top_k copies of each token), router, shared expert
        e, k, f = cfg.n_experts, cfg.top_k, cfg.moe_intermediate_size
        n += hi * (d + e + 2 * k) + 16 * k  # fp32 router input and scores, weights; expert ids, grouping order
        act = 4 * f if cfg.moe_act == "swiglu" else 2 * f
        n += k * (lo * (2 * d + act) + hi * (d + 1) + 8)  # per (token, expert): input, activation, output, weight
        if cfg.shared_intermediate_size:
            n += lo * (d + 2 * cfg.shared_intermediate_size)
    return n


def head_activations(cfg: ModelConfig, lo: int) -> float:
    """Bytes per token outside the blocks: token ids, the final norm, the lm_head input, the router gate, and
    the KD loss's fp32 log-probabilities (student log_softmax and teacher probabilities)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    return 8 + 4 * (2 * d + 1) + 4 * d + lo * d + 2 * 4 * v


def activations(cfg: ModelConfig, tokens: int, lo: int, checkpointing: bool = False) -> int:
    """Bytes autograd keeps for one micro-batch of `tokens` tokens through the full student. Checkpointing
    keeps each block's input (fp32) and recomputes one block at a time in the backward."""
    blocks = [block_activations(cfg, kind, lo) for kind in cfg.pattern]
    if checkpointing:
        per_token = 4 * cfg.hidden_size * len(blocks) + max(blocks)
    else:
        per_token = sum(blocks)
    return int(tokens * (per_token + head_activations(cfg, lo)))


# ---------------------------------------------------------------------------------------------- the plan
def plan(ecfg: ElasticConfig, model: str | Path | ModelConfig, gpus: int = 1, parallel: str | None = None,
         gpu_memory: int | str | None = None, dtype: str = "bf16") -> Plan:
    """The memory plan per GPU (see the module doc). model: an HF folder (only config.json is read) or a
    ModelConfig. parallel: None (one GPU, or DDP when gpus > 1), "ddp" or "fsdp2". gpu_memory: bytes, or a
    size such as "80GB" / "80GiB" (parse_bytes); Plan.check says whether it fits. dtype: the compute dtype,
    "bf16" (autocast, the default on GPUs) or "fp32"."""
    if isinstance(gpu_memory, str):
        gpu_memory = parse_bytes(gpu_memory)
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"plan: dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if parallel not in (None, *MODES):
        raise ConfigError(f"plan: parallel must be one of {MODES} (or None), got {parallel!r}")
    if not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"plan: gpus must be an int >= 1, got {gpus!r}")
    if gpu_memory is not None and gpu_memory <= 0:
        raise ConfigError(f"plan: gpu_memory must be a positive number of bytes, got {gpu_memory}")
    parallel = parallel or ("ddp" if gpus > 1 else None)
    if ecfg.batch % gpus:
        raise ConfigError(f"plan: batch {ecfg.batch} doesn't split over {gpus} GPUs")
    cfg = _model_config(model)
    ecfg.resolve_choices(cfg)  # the config must fit the model
    shapes = _shapes(cfg)
    params = count_params(cfg)  # weights and the MoE correction-bias buffers
    trainable = sum(p.numel() for p in shapes.parameters())
    n_tensors = len(list(shapes.parameters()))
    shard = gpus if parallel == "fsdp2" else 1
    lo = DTYPE_BYTES[dtype]

    def sharded(n: float) -> int:
        return int(-(-n // shard))

    r_params, r_tensors = _router_params(cfg, ecfg)
    if dtype == "fp32":
        copies = 0
    elif parallel == "fsdp2":  # bf16 all-gathers: the block in use and the one prefetched
        biggest = max(sum(p.numel() for p in b.parameters()) for b in shapes.layers)
        copies = 2 * 2 * biggest
    else:  # autocast's bf16 copy of every matmul weight (the embedding table is looked up, not multiplied)
        emb = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size
        copies = 2 * (trainable - emb)
    rows = ecfg.batch // gpus
    seq = max(ecfg.seq_len, ecfg.stage2_seq_len or 0)
    tokens = rows * seq
    parts = {
        "teacher": sharded(params * lo),
        "student": sharded(params * 4),
        "gradients": sharded(trainable * 4),
        "optimizer": sharded(trainable * 8) + n_tensors * 4,
        "router": r_params * 16 + r_tensors * 4,
        "weight_copies": copies,
        "logits": tokens * cfg.vocab_size * 4 * 2,  # the teacher's fp32 logits, the student logits' gradient
        "activations": activations(cfg, tokens, lo),
    }
    notes = []
    if DEPTH in ecfg.choices or ecfg.mode == "soft":
        notes.append("activations are counted for the full model (the largest step)")
    return Plan(parts, activations(cfg, tokens, lo, checkpointing=True), ecfg.activation_checkpointing, gpus,
                parallel, dtype, rows, seq, params, gpu_memory, notes)


def _size(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def format_plan(p: Plan) -> str:
    """A table of the plan, one row per part, the totals with and without checkpointing, and the verdict."""
    where = f"{p.gpus} GPU(s)" + (f", {p.parallel}" if p.parallel else "")
    lines = [f"memory plan per GPU: {p.params:,} parameters, {where}, {p.dtype}, micro-batch {p.rows_per_gpu} "
             f"x {p.seq_len} tokens"]
    label = {"teacher": f"teacher ({p.dtype}, frozen)", "student": "student weights (fp32)",
             "gradients": "gradients (fp32)", "optimizer": "AdamW state (fp32)", "router": "router (all of it)",
             "weight_copies": "bf16 weight copies", "logits": "logits (teacher, gradient)",
             "activations": "activations"}
    w = max(len(v) for v in label.values()) + 2
    for k in ROWS:
        lines.append(f"  {label[k].ljust(w)}{_size(p.parts[k]):>12}")
    lines.append(f"  {'activations, checkpointed'.ljust(w)}{_size(p.activations_checkpointed):>12}")
    for ck in (False, True):
        mark = " <- the config's" if ck == p.checkpointing else ""
        lines.append(f"  {('total, ' + ('with' if ck else 'without') + ' checkpointing').ljust(w)}"
                     f"{_size(p.total_with(ck)):>12}{mark}")
    if p.gpu_memory is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"{verdict} in {_size(p.gpu_memory)} per GPU")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
