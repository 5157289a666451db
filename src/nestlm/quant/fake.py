"""Which weights are quantized, fake quantization of a Decoder in place, width checks, and calibration.

    fake_quantize_(model, "nvfp4")      # model.<mixer>.q_proj.weight now returns q(weight), gradient straight through
    remove_fake_quant_(model)           # back to the latent (trained) weights; bake=True keeps q(weight)
    check_elastic(model.cfg, ecfg)      # every budget's quantized input widths are whole blocks of 16
    amax = calibrate(model, batches)    # {weight name: amax of its input}, for the exported input_scale

Quantized: the Linear weights inside mixers, found by their name (QUANTIZED); stacked MoE experts
([experts, out, in] parameters) are quantized per expert. Everything else stays in full precision: embeddings,
lm_head, norms, conv1d, the MoE router `gate`, biases, Mamba's A_log / D / dt_bias.

The parametrization quantizes the FULL tensor and the sliced forward then takes prefixes. NVFP4 blocks run
along the input dim and every budget's input widths are whole blocks (check_elastic), and the per-tensor
scale is the full tensor's, so the slice of q(W) is exactly q(slice of W) with the parent's tensor scale.
The per-tensor scale is recomputed from the current latent weights at every forward (QAD trains them);
weights that read the same input and that vLLM fuses into one GEMM (q/k/v, gate/up: FUSED) share it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from nestlm.arch import SubArch
from nestlm.errors import ConfigError
from nestlm.model import layout
from nestlm.model.config import ModelConfig
from nestlm.model.layers import MLP, Attention, Mamba2, MoE
from nestlm.quant.formats import (
    Format,
    fake_fp8,
    fake_nvfp4,
    fp8_scale,
    get_format,
    nvfp4_tensor_scale,
)

# ---------------------------------------------------------------------------------------------- the table
# Names (in their mixer) of the quantized weights: an nn.Linear child, or a stacked [experts, out, in]
# parameter named like the Linear it stacks. A new weight name: add it here (and to FUSED / CALIB_INPUTS).
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "out_proj")
# Weights of one mixer that read the same input and are fused into one GEMM by vLLM share the per-tensor scale
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Calibration: where each mixer's quantized weights see their input. "input": the mixer's input (a forward
# pre-hook); any other key: the name under which the mixer passes the tensor to its `probe`.
CALIB_INPUTS = {
    Attention: {"input": ("q_proj", "k_proj", "v_proj"), "heads": ("o_proj",)},
    MLP: {"input": ("gate_proj", "up_proj"), "ffn": ("down_proj",)},
    Mamba2: {"input": ("in_proj",), "heads": ("out_proj",)},
    MoE: {"input": ("gate_proj", "up_proj"), "expert": ("down_proj",)},  # "expert": per expert
}


@dataclass
class QWeight:
    name: str  # state-dict name: "layers.2.mixer.q_proj.weight", or "layers.1.mixer.up_proj" (stacked)
    mixer: nn.Module  # the module that has `leaf` (the mixer, or an MLP inside a MoE)
    leaf: str  # q_proj, up_proj, ...
    owner: nn.Module  # the module holding the tensor: the Linear, or `mixer` for a stacked parameter
    attr: str  # "weight", or `leaf` for a stacked parameter
    group: str  # weights with the same group share their per-tensor scale

    @property
    def stacked(self) -> bool:
        return self.owner is self.mixer

    def latent(self) -> torch.Tensor:
        """The trained tensor, without fake quantization."""
        if parametrize.is_parametrized(self.owner, self.attr):
            return self.owner.parametrizations[self.attr].original
        return getattr(self.owner, self.attr)


def quantized_weights(model: nn.Module) -> list[QWeight]:
    """Every quantized weight of `model`, in module order."""
    out = []
    for mname, mod in model.named_modules():
        for leaf in QUANTIZED:
            child = mod._modules.get(leaf)
            if isinstance(child, nn.Linear):
                owner, attr, name = child, "weight", f"{mname}.{leaf}.weight"
            elif mod._parameters.get(leaf) is not None or parametrize.is_parametrized(mod, leaf):
                owner, attr, name = mod, leaf, f"{mname}.{leaf}"
            else:
                continue
            fused = next((i for i, g in enumerate(FUSED) if leaf in g), None)
            group = f"{mname}/{leaf if fused is None else f'fused{fused}'}"
            out.append(QWeight(name, mod, leaf, owner, attr, group))
    return out


def latent_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fake-quantized model's state dict (X.parametrizations.weight.original) -> plain names (X.weight)."""
    return {re.sub(r"parametrizations\.([^.]+)\.original$", r"\1", k): v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------- scales
def _amax(fmt: Format, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor formats: the max |w| over the group, per leading (expert) index -> [] or [e].
    Per-channel FP8: the max |w| of each row of the single tensor -> [..., out]."""
    if fmt.name == "fp8_channel":
        return tensors[0].detach().abs().amax(-1).float()
    return torch.stack([t.detach().abs().amax(dim=(-2, -1)).float() for t in tensors]).amax(0)


def _scale(fmt: Format, amax: torch.Tensor) -> torch.Tensor:
    return nvfp4_tensor_scale(amax) if fmt.block > 1 else fp8_scale(amax)


def _scale_group(q: QWeight, fmt: Format) -> str:
    """Weights with the same key share a scale: the FUSED group, except for per-channel scales."""
    return q.name if fmt.name == "fp8_channel" else q.group


def weight_scales(model: nn.Module, fmt: str | Format) -> dict[str, torch.Tensor]:
    """{weight name: per-tensor scale} from the current latent weights: NVFP4 weight_scale_2 = amax / (6*448),
    FP8 weight_scale = amax / 448 (shared within a FUSED group; per row for fp8_channel). [] or [experts]."""
    fmt = get_format(fmt)
    qws = quantized_weights(model)
    groups = defaultdict(list)
    for q in qws:
        groups[_scale_group(q, fmt)].append(q.latent())
    return {q.name: _scale(fmt, _amax(fmt, groups[_scale_group(q, fmt)])) for q in qws}


# ---------------------------------------------------------------------------------------------- fake quant
class FakeQuant(nn.Module):
    """Parametrization: w -> dequantize(quantize(w)) with a straight-through gradient. The per-tensor scale
    comes from the latent tensors of `group` (this weight and those sharing its scale), read at each call.

    Within one forward of the model (see _begin_forward) the result is computed once and reused, since the
    MoE reads its stacked expert weights once per expert."""

    def __init__(self, fmt: Format, group: list[tuple[nn.Module, str]]):
        super().__init__()
        self.fmt = fmt
        self.group = group  # [(owner, attr)]: a plain list, so the modules are not registered as children
        self.enabled = True
        self.caching = False
        self.cached: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.caching and self.cached is not None:
            return self.cached
        members = [o.parametrizations[a].original if parametrize.is_parametrized(o, a) else getattr(o, a)
                   for o, a in self.group]
        scale = _scale(self.fmt, _amax(self.fmt, members))
        q = fake_nvfp4(w, scale) if self.fmt.block > 1 else fake_fp8(w, scale)
        if self.caching:
            self.cached = q
        return q


def _fake_quants(model: nn.Module) -> list[FakeQuant]:
    return [m for m in model.modules() if isinstance(m, FakeQuant)]


def _begin_forward(model, args):
    for fq in _fake_quants(model):
        fq.caching, fq.cached = True, None


def _end_forward(model, args, output):
    for fq in _fake_quants(model):
        fq.caching, fq.cached = False, None


def is_fake_quantized(model: nn.Module) -> bool:
    return bool(_fake_quants(model))


def fake_quantize_(model: nn.Module, fmt: str | Format = "nvfp4") -> nn.Module:
    """Fake-quantize every quantized weight of `model` in place (torch.nn.utils.parametrize): reading
    `module.weight` returns q(weight) with a straight-through gradient; the optimizer trains the latent
    weights (`module.parametrizations.weight.original`). Raises ConfigError if an input width of the full
    model is not a whole number of blocks. Returns the model."""
    fmt = get_format(fmt)
    if is_fake_quantized(model):
        raise ValueError("the model is already fake-quantized; call remove_fake_quant_(model) first")
    check_subarch(model.cfg, None, fmt)
    qws = quantized_weights(model)
    groups: dict[str, list] = defaultdict(list)
    for q in qws:
        groups[_scale_group(q, fmt)].append((q.owner, q.attr))
    for q in qws:
        parametrize.register_parametrization(q.owner, q.attr, FakeQuant(fmt, groups[_scale_group(q, fmt)]))
    pre = model.register_forward_pre_hook(_begin_forward)
    post = model.register_forward_hook(_end_forward, always_call=True)
    model._fake_quant_hooks = (pre.id, post.id)  # ids, not handles: they stay valid in a deepcopy
    return model


def remove_fake_quant_(model: nn.Module, bake: bool = False) -> nn.Module:
    """Undo fake_quantize_: the parameters are the latent weights again (bake=True: the fake-quantized
    values, i.e. the weights a packed export dequantizes to). Returns the model."""
    qws = [q for q in quantized_weights(model) if parametrize.is_parametrized(q.owner, q.attr)]
    baked = {}
    if bake:  # all values first: a weight's scale reads its group's latent tensors
        with torch.no_grad():
            baked = {q.name: getattr(q.owner, q.attr).detach().clone() for q in qws}
    for owner in {id(q.owner): q.owner for q in qws}.values():
        _own_class_(owner)
    for q in qws:
        parametrize.remove_parametrizations(q.owner, q.attr, leave_parametrized=False)
        if bake:
            with torch.no_grad():
                getattr(q.owner, q.attr).copy_(baked[q.name])
    for hid in getattr(model, "_fake_quant_hooks", ()):
        model._forward_pre_hooks.pop(hid, None)
        model._forward_hooks.pop(hid, None)
        model._forward_hooks_always_called.pop(hid, None)
    model.__dict__.pop("_fake_quant_hooks", None)
    return model


def _own_class_(module: nn.Module) -> None:
    """A deepcopy of a parametrized module shares torch's generated class with the original, and removing a
    parametrization deletes the property from that class: give the module a copy of the class first."""
    cls = type(module)
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


@contextlib.contextmanager
def fake_quant_disabled(model: nn.Module):
    """Within the block, the fake-quantized weights read as their latent values."""
    fqs = _fake_quants(model)
    saved = [fq.enabled for fq in fqs]
    for fq in fqs:
        fq.enabled = False
    try:
        yield model
    finally:
        for fq, e in zip(fqs, saved, strict=True):
            fq.enabled = e


# ---------------------------------------------------------------------------------------------- width checks
_GROUP_WIDTH = {"q_heads": ("head_dim", "KV group"), "mamba": ("mamba_head_dim", "Mamba group")}
_OWNER = {"-": "MLP ", "E": "expert "}


def _input_widths(cfg: ModelConfig, s: SubArch) -> list[tuple[str, int, int, str]]:
    """(axis, its value, input width, which weights) for every quantized input width of the submodel s, read
    off the layout's declaration of each quantized weight's input (last) dim: each kept run, and for
    grouped heads the stride between groups, is a whole number of blocks or the packed prefix breaks."""
    v = layout.axis_values(s)
    out: dict[tuple, str] = {}
    for kind in dict.fromkeys(cfg.pattern[i] for i in s.layers):
        for name, dims in layout.block_tensors(cfg, kind).items():
            leaf = name.removesuffix(".weight").rpartition(".")[2]
            if leaf not in QUANTIZED or len(dims) < 2:  # biases, norms, the router
                continue
            owner = "shared expert " if name.startswith("shared.") else _OWNER.get(kind, "")
            for seg in dims[max(dims)]:  # the input dim
                if seg.axis is None:
                    continue
                ax = layout.AXIS[seg.axis]
                field, keep = ax.field, (v[seg.axis][-1] if ax.within else v[seg.axis])
                if seg.axis == "hidden":
                    out.setdefault(("hidden", keep, keep), "q/k/v, in_proj, up/gate_proj input (hidden channels)")
                elif seg.axis in _GROUP_WIDTH:
                    width_name, group = _GROUP_WIDTH[seg.axis]
                    per = seg.units // seg.groups
                    out.setdefault((field, keep, keep * seg.width), f"{leaf} input of each {group} ({keep} heads "
                                   f"x {width_name} {seg.width})")
                    out.setdefault((width_name, seg.width, per * seg.width),
                                   f"{leaf} input stride of a {group} ({per} heads)")
                else:
                    out.setdefault((field, keep, keep * seg.width), f"{owner}{leaf} input")
    hidden_first = sorted(out.items(), key=lambda kv: kv[0][0] != "hidden")
    return [(*k, what) for k, what in hidden_first]


def _bad_widths(cfg: ModelConfig, s: SubArch, fmt: Format):
    return [w for w in _input_widths(cfg, s) if w[2] % fmt.block]


def check_subarch(cfg: ModelConfig, sub: SubArch | None = None, fmt: str | Format = "nvfp4") -> None:
    """Raise ConfigError if a quantized layer of the submodel `sub` (None: the full model) has an input
    width that is not a whole number of `fmt`'s blocks (16 for NVFP4; FP8 has no blocks)."""
    fmt = get_format(fmt)
    s = (sub or SubArch()).resolve(cfg)
    bad = _bad_widths(cfg, s, fmt)
    if bad:
        axis, value, width, what = bad[0]
        raise ConfigError(f"{fmt.name} quantizes blocks of {fmt.block} input channels: {axis}={value} makes the "
                          f"{what} {width} wide, not a multiple of {fmt.block}")


def check_elastic(cfg: ModelConfig, ecfg, fmt: str | Format | None = None) -> None:
    """Raise ConfigError naming the axis and width if any choice of the ElasticConfig `ecfg` gives a
    quantized layer an input width that is not a whole number of blocks. fmt: default ecfg.quant."""
    fmt = fmt if fmt is not None else ecfg.quant
    if fmt is None:
        return
    fmt = get_format(fmt)
    check_subarch(cfg, None, fmt)
    full = SubArch.full(cfg)
    for axis, widths in ecfg.resolve_choices(cfg).items():
        for w in widths:
            for ax, value, width, what in _bad_widths(cfg, dataclasses.replace(full, **{axis: w}), fmt):
                if ax == axis:
                    raise ConfigError(f"ElasticConfig: choices[{axis!r}] width {value} makes the {what} {width} "
                                      f"wide: {fmt.name} needs multiples of {fmt.block} (its block size)")


# ---------------------------------------------------------------------------------------------- calibration
@torch.no_grad()
def calibrate(model: nn.Module, batches, subs: list[SubArch | None] | None = None,
              progress: bool = True) -> dict[str, torch.Tensor]:
    """Forward passes only: {weight name: max |input| of that weight} over `batches` ([b, t] token ids),
    run at each SubArch of `subs` (default: the full model); [] per weight, [experts] for stacked experts.
    Routed experts that got no token take the largest amax of their weight's other experts."""
    subs = subs or [None]
    batches = list(batches)
    qws = {(id(q.mixer), q.leaf): q for q in quantized_weights(model)}
    amax = {q.name: torch.zeros(q.latent().shape[:-2] if q.stacked else ()) for q in qws.values()}

    def record(mixer, leaves, x, expert=None):
        a = x.detach().abs().amax().float().cpu()
        for leaf in leaves:
            q = qws.get((id(mixer), leaf))
            if q is None:
                continue
            if expert is None:
                amax[q.name] = torch.maximum(amax[q.name], a)
            else:
                amax[q.name][expert] = torch.maximum(amax[q.name][expert], a)

    def make_probe(mixer, table, old):
        def probe(kind, payload):
            if kind == "expert":  # (expert id, its down_proj input [n, f], output, weights)
                record(mixer, table.get(kind, ()), payload[1], expert=payload[0])
            else:
                record(mixer, table.get(kind, ()), payload)
            if old is not None:
                old(kind, payload)
        return probe

    handles, saved = [], []
    for m in model.modules():
        table = next((t for cls, t in CALIB_INPUTS.items() if isinstance(m, cls)), None)
        if table is None:
            continue
        handles.append(m.register_forward_pre_hook(
            lambda mod, args, leaves=table["input"]: record(mod, leaves, args[0])))
        saved.append((m, m.probe))
        m.probe = make_probe(m, table, m.probe)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(subs) * len(batches), desc="calibrate", disable=not progress) as bar:
            for sub in subs:
                for ids in batches:
                    model(ids, sub=sub)
                    bar.update(1)
    finally:
        for h in handles:
            h.remove()
        for m, old in saved:
            m.probe = old
        model.train(was_training)
    for q in qws.values():  # experts that no calibration token reached
        a = amax[q.name]
        if q.stacked and (a == 0).any():
            amax[q.name] = torch.where(a == 0, a.max(), a)
    return amax
