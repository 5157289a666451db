"""What a nested submodel costs (parameters, active parameters, memory), the searches that pick widths or
layers for a budget, and the axis vocabulary. SubArch itself lives in nestlm.model.subarch (re-exported here).
"""

from __future__ import annotations

from nestlm.errors import ConfigError
from nestlm.model.config import ModelConfig
from nestlm.model.subarch import SubArch, sliced_config

__all__ = ["SubArch", "count_active_params", "count_memory", "count_params", "depth_subarch", "depth_units", "human_bytes",
           "sliced_config", "unit_order", "width_subarch"]


# -------------------------------------------------------------------- counting
def _block_params(c: ModelConfig, kind: str, active: bool) -> int:
    """Parameters of one block of `kind` in the (already sliced) config `c`, its pre-norm included."""
    d = c.hidden_size
    n = d  # pre-norm weight
    if kind == "*":
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        n += d * q + 2 * d * kv + q * d
        if c.attn_bias:
            n += q + 2 * kv + d
        if c.qk_norm:
            n += 2 * c.head_dim
    elif kind == "-":
        mats = 3 if c.mlp_act == "swiglu" else 2
        n += mats * d * c.intermediate_size
        if c.mlp_bias:
            n += (mats - 1) * c.intermediate_size + d
    elif kind == "M":
        h, g, s = c.mamba_heads, c.mamba_groups, c.ssm_state
        inner = c.mamba_inner
        proj = 2 * inner + 2 * g * s + h
        n += d * proj + (proj if c.mamba_bias else 0)  # in_proj
        n += c.mamba_conv_dim * c.conv_kernel + (c.mamba_conv_dim if c.conv_bias else 0)  # conv1d
        n += 3 * h + inner  # dt_bias, A_log, D, gated norm
        n += inner * d + (d if c.mamba_bias else 0)  # out_proj
    elif kind == "E":
        n_used = c.top_k if active else c.n_experts
        n += c.n_experts * d  # router rows
        if c.moe_router == "sigmoid":
            n += c.n_experts  # correction bias
        n += n_used * (3 if c.moe_act == "swiglu" else 2) * d * c.moe_intermediate_size
        if c.shared_intermediate_size:
            n += 2 * d * c.shared_intermediate_size
            if c.mlp_bias:
                n += c.shared_intermediate_size + d
    return n


def count_params(cfg: ModelConfig, sub: SubArch | None = None, active: bool = False) -> int:
    """Parameters of the submodel (all of them, or those one token touches when `active`), embeddings included."""
    c = sliced_config(cfg, sub)
    n = c.vocab_size * c.hidden_size  # embedding
    n += sum(_block_params(c, k, active) for k in c.pattern)
    n += c.hidden_size  # final norm
    if not c.tie_embeddings:
        n += c.vocab_size * c.hidden_size
    return n


def count_active_params(cfg: ModelConfig, sub: SubArch | None = None) -> int:
    return count_params(cfg, sub, active=True)


def count_memory(cfg: ModelConfig, sub: SubArch | None = None, *, seq_len: int = 4096, batch: int = 1,
                 weight_bytes: float = 2.0, kv_bytes: float = 2.0, state_bytes: float = 4.0) -> dict:
    """Bytes needed to run the submodel: weights + attention KV cache + Mamba conv and SSM state.

    Defaults: bf16 weights and KV cache, fp32 SSM state (as Nemotron-H keeps it).
    """
    c = sliced_config(cfg, sub)
    weights = count_params(cfg, sub) * weight_bytes
    n_attn, n_mamba = c.pattern.count("*"), c.pattern.count("M")
    kv = n_attn * 2 * batch * seq_len * c.num_kv_heads * c.head_dim * kv_bytes
    ssm = n_mamba * batch * c.mamba_heads * c.mamba_head_dim * c.ssm_state * state_bytes
    conv = n_mamba * batch * c.mamba_conv_dim * max(c.conv_kernel - 1, 0) * kv_bytes
    total = weights + kv + ssm + conv
    return {"weights": int(weights), "kv_cache": int(kv), "ssm_state": int(ssm + conv), "total": int(total)}


def human_bytes(n: float) -> str:
    """Bytes in decimal units, the one way nestlm prints sizes (info, info --sub, search, slice, quantize):
    '153.33 KB', '4.40 MB', '63.17 GB'. (`nestlm plan` prints GPU memory in GiB, as --gpu-memory is given.)"""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


# -------------------------------------------------------------------- choosing a SubArch for a budget
WIDTH_AXES = ("hidden", "attn_heads_per_group", "mamba_heads_per_group", "ffn", "moe_ffn", "shared_ffn", "experts")


def _round_width(v: float, full: int, align: int, minimum: int = 1) -> int:
    if full <= align:
        return max(minimum, min(full, round(v)))
    return max(max(minimum, align), min(full, int(round(v / align)) * align))


def width_subarch(cfg: ModelConfig, frac: float, axes: tuple[str, ...] = WIDTH_AXES, align: int = 8,
                  metric: str = "params") -> SubArch:
    """Shrink the chosen width axes by one common factor so the submodel's parameter count (or active
    parameters, metric="active") is as close as possible to `frac` of the full model's, from below.

    Channel axes are rounded to multiples of `align`; head/expert counts stay >= 1 (experts >= top_k)."""
    if not 0 < frac <= 1:
        raise ConfigError(f"budget fraction must be in (0, 1], got {frac}")
    full = SubArch.full(cfg)
    count = count_active_params if metric == "active" else count_params
    target = frac * count(cfg)

    def at(alpha: float) -> SubArch:
        kw = {}
        for ax in axes:
            f = getattr(full, ax)
            if not f:
                continue
            if ax in ("hidden", "ffn", "moe_ffn", "shared_ffn"):
                kw[ax] = _round_width(alpha * f, f, align)
            elif ax == "experts":
                kw[ax] = max(min(cfg.top_k, f), min(f, round(alpha * f)))
            else:
                kw[ax] = max(1, min(f, round(alpha * f)))
        return SubArch(**kw)

    lo, hi = 0.0, 1.0
    best = at(1.0) if count(cfg, at(1.0)) <= target else None
    for _ in range(40):
        mid = (lo + hi) / 2
        s = at(mid)
        if count(cfg, s) <= target:
            lo, best = mid, s
        else:
            hi = mid
    return best if best is not None else at(0.0)


# families whose HF layer is two of our blocks (attention, then MLP or MoE): depth drops both
PAIRED_FAMILIES = ("llama", "qwen3", "qwen3_moe", "mixtral")


def depth_units(cfg: ModelConfig) -> list[list[int]]:
    """Blocks that are dropped together: single blocks for hybrids, (attention, MLP/MoE) pairs for
    Llama/Qwen3/Qwen3-MoE/Mixtral."""
    if cfg.family in PAIRED_FAMILIES:
        return [[2 * j, 2 * j + 1] for j in range(cfg.n_blocks // 2)]
    return [[i] for i in range(cfg.n_blocks)]


def unit_order(cfg: ModelConfig, layer_scores) -> list[int]:
    """Depth unit indices (see `depth_units`), least important first: the order depth pruning drops them.
    `layer_scores`: per-block importance (`importance(...)["layers"]`), higher = keep; a unit scores the sum
    of its blocks. Ties keep the unit order (a stable sort)."""
    units = depth_units(cfg)
    if len(layer_scores) != cfg.n_blocks:
        raise ConfigError(f"layer_scores has {len(layer_scores)} entries for {cfg.n_blocks} blocks")
    scores = [float(sum(layer_scores[i] for i in u)) for u in units]
    return sorted(range(len(units)), key=lambda j: scores[j])


def depth_subarch(cfg: ModelConfig, layer_scores, frac: float, metric: str = "params") -> SubArch:
    """Drop the least important depth units (blocks; paired families: attention+MLP pairs) until the parameter
    count is at most `frac` of the full model's. `layer_scores`: per-block importance, higher = keep."""
    if not 0 < frac <= 1:
        raise ConfigError(f"budget fraction must be in (0, 1], got {frac}")
    count = count_active_params if metric == "active" else count_params
    target = frac * count(cfg)
    units = depth_units(cfg)
    kept = set(range(cfg.n_blocks))
    for ui in unit_order(cfg, layer_scores):
        if count(cfg, SubArch(layers=tuple(sorted(kept)))) <= target:
            break
        if len(kept) <= len(units[ui]):
            break
        kept -= set(units[ui])
    return SubArch(layers=tuple(sorted(kept)))
