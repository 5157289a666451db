"""nestlm.quant: number formats against slow scalar references, fake quantization (STE, nesting), width
checks, calibration, packed export / load / slicing round trips, and a tiny QAD run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import randomize_
from safetensors.torch import load_file

import nestlm
from nestlm.arch import SubArch
from nestlm.convert import FAMILIES
from nestlm.elastic.artifact import MANIFEST
from nestlm.elastic.config import ElasticConfig
from nestlm.info import quantized_bytes
from nestlm.load import load_quantized
from nestlm.model.config import ConfigError
from nestlm.model.extract import extract, sliced_state_dict
from nestlm.quant import (
    calibrate,
    check_elastic,
    check_subarch,
    fake_quant_disabled,
    fake_quantize_,
    latent_state_dict,
    quantized_weights,
    remove_fake_quant_,
    weight_scales,
)
from nestlm.quant.formats import (
    E2M1_VALUES,
    e2m1_codes,
    e2m1_values,
    fake_fp8,
    fake_nvfp4,
    fp8_dequantize,
    fp8_quantize,
    nvfp4_dequantize,
    nvfp4_quantize,
    nvfp4_tensor_scale,
    pack_nibbles,
    to_e4m3,
    unpack_nibbles,
)
from nestlm.quantize import quantize
from nestlm.slicing import export_quantized, slice_quantized

VOCAB = 259  # the byte tokenizer's: quantize() calibrates on its text


def hybrid_config(**over) -> nestlm.ModelConfig:
    """A Nemotron-H hybrid whose quantized input widths are multiples of 16 (conftest's are 8-wide heads)."""
    kw = dict(family="nemotron_h", vocab_size=VOCAB, hidden_size=64, pattern="M-*EM-", tie_embeddings=True,
              num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96, mamba_heads=4, mamba_head_dim=16,
              mamba_groups=2, ssm_state=8, chunk_size=8, n_experts=4, top_k=2, moe_intermediate_size=32,
              shared_intermediate_size=32)
    kw.update(over)
    return nestlm.ModelConfig(**kw)


def llama_config() -> nestlm.ModelConfig:
    return nestlm.ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=64, pattern="*-*-", num_heads=4,
                              num_kv_heads=2, head_dim=16, rope_theta=10000.0, intermediate_size=96,
                              mlp_act="swiglu", norm_eps=1e-5)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def qwen3_moe_config() -> nestlm.ModelConfig:
    """SwiGLU experts: stacked gate_proj / up_proj share one scale per expert (vLLM fuses them as w13)."""
    if "qwen3_moe" not in FAMILIES:
        pytest.skip("this nestlm has no qwen3_moe converter")
    return nestlm.ModelConfig(family="qwen3_moe", vocab_size=VOCAB, hidden_size=64, pattern="*E*E", num_heads=4,
                              num_kv_heads=2, head_dim=16, rope_theta=1e6, qk_norm=True, intermediate_size=64,
                              mlp_act="swiglu", n_experts=4, top_k=2, moe_intermediate_size=32,
                              moe_router="softmax", moe_act="swiglu", norm_eps=1e-6)


CONFIGS = {"nemotron_h": hybrid_config, "llama": llama_config, "qwen3_moe": qwen3_moe_config}


def model_of(cfg, seed=0):
    return randomize_(nestlm.Decoder(cfg), seed).eval()


SUB = SubArch(hidden=48, ffn=64, moe_ffn=16, shared_ffn=16, mamba_heads_per_group=1, attn_heads_per_group=1,
              experts=3)
SUB_DEPTH = SubArch(hidden=32, ffn=32, experts=2, layers=(0, 1, 3, 5))


# ---------------------------------------------------------------------------------------------- references
def _e4m3_table() -> list[tuple[float, int]]:
    """Every finite non-negative E4M3 (fn) value with its 3-bit mantissa, from the bit layout."""
    out = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN
            out.append(((m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7), m))
    return out


E4M3 = _e4m3_table()


def ref_e4m3(x: float) -> float:
    """Nearest E4M3 value, ties to the even mantissa, saturating at 448."""
    a = min(abs(x), 448.0)
    best = min(abs(a - v) for v, _ in E4M3)
    cands = [(v, m) for v, m in E4M3 if abs(a - v) == best]
    v = next((v for v, m in cands if m % 2 == 0), cands[0][0])
    return math.copysign(v, x) if v else 0.0


def ref_e2m1(x: float) -> int:
    """E2M1 code: nearest magnitude, ties to the even code, saturating at 6; bit 3 = sign of x."""
    a = min(abs(x), 6.0)
    best = min(abs(a - v) for v in E2M1_VALUES)
    code = next(c for c, v in enumerate(E2M1_VALUES) if abs(a - v) == best and
                (c % 2 == 0 or sum(abs(a - w) == best for w in E2M1_VALUES) == 1))
    return code | (8 if x < 0 else 0)


def ref_nvfp4(w: torch.Tensor) -> tuple[list[list[int]], list[list[float]], float]:
    """Codes, block scales and tensor scale of w [out, in], one block and one element at a time."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)
    scale2 = f32(float(w.abs().max())) / f32(2688.0)
    codes, scales = [], []
    for row in w.tolist():
        crow, srow = [], []
        for b in range(0, len(row), 16):
            block = row[b:b + 16]
            s = ref_e4m3(float(f32(max(abs(v) for v in block)) / (f32(6.0) * scale2))) or 1.0
            srow.append(s)
            crow += [ref_e2m1(float(f32(v) / (f32(s) * scale2))) for v in block]
        codes.append(crow)
        scales.append(srow)
    return codes, scales, float(scale2)


# ---------------------------------------------------------------------------------------------- formats
def _probe_values():
    g = torch.Generator().manual_seed(0)
    mids = [(a + b) / 2 for a, b in zip(E2M1_VALUES, E2M1_VALUES[1:], strict=False)]
    base = torch.tensor(list(E2M1_VALUES) + mids + [7.0, 100.0, 1e-3, 0.1, 0.26, 2.49])
    return torch.cat([base, -base, torch.rand(2000, generator=g) * 16 - 8])


def test_e2m1_codes_match_scalar_reference():
    x = _probe_values()
    assert e2m1_codes(x).tolist() == [ref_e2m1(v) for v in x.tolist()]
    vals = e2m1_values(e2m1_codes(x))
    ref = [math.copysign(E2M1_VALUES[ref_e2m1(v) & 7], v) for v in x.tolist()]
    torch.testing.assert_close(vals, torch.tensor(ref), rtol=0, atol=0)


def test_e4m3_matches_scalar_reference():
    g = torch.Generator().manual_seed(1)
    pos = [v for v, _ in E4M3]
    mids = [(a + b) / 2 for a, b in zip(pos, pos[1:], strict=False)]  # every tie
    x = torch.tensor(pos + mids + [500.0, 1e4])
    x = torch.cat([x, -x, torch.randn(3000, generator=g) * 40, torch.rand(500, generator=g) * 0.03])
    got = to_e4m3(x).float().tolist()
    assert got == [ref_e4m3(v) for v in x.float().tolist()]


def test_nvfp4_matches_slow_reference():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 64, generator=g) * torch.logspace(-3, 1, 64)  # blocks of very different ranges
    w[2, 16:32] = 0.0  # an all-zero block: scale 1.0 by convention
    scale2 = nvfp4_tensor_scale(w.abs().amax())
    packed, block = nvfp4_quantize(w, scale2)
    codes, scales, ref_scale2 = ref_nvfp4(w)
    assert float(scale2) == ref_scale2
    assert unpack_nibbles(packed).tolist() == codes
    assert block.float().tolist() == scales
    assert packed.dtype == torch.uint8 and packed.shape == (6, 32)
    assert block.dtype == torch.float8_e4m3fn and block.shape == (6, 4)


def test_nibble_order_and_round_trip():
    codes = torch.arange(16, dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [c0 | (c1 << 4) for c0, c1 in zip(range(0, 16, 2), range(1, 16, 2), strict=True)]
    assert packed[0].item() == 0x10  # element 0 in the low nibble
    assert torch.equal(unpack_nibbles(packed), codes)


def test_representable_values_round_trip_exactly():
    g = torch.Generator().manual_seed(3)
    scale2 = torch.tensor(2.0 ** -9)
    block = torch.tensor([v for v, _ in E4M3 if 0.05 < v])[torch.randint(0, 80, (4, 8), generator=g)]
    block[0, 0] = 448.0  # the tensor's amax block: amax = 6 * 448 * scale2
    codes = torch.randint(0, 16, (4, 128), generator=g, dtype=torch.uint8)
    codes[:, ::16] = 7  # every block holds a 6: its amax gives back its scale
    w = e2m1_values(codes) * block.repeat_interleave(16, 1) * scale2
    s2 = nvfp4_tensor_scale(w.abs().amax())
    assert s2 == scale2
    packed, got_block = nvfp4_quantize(w, s2)
    assert torch.equal(got_block.float(), block)
    assert torch.equal(nvfp4_dequantize(packed, got_block, s2), w)
    assert torch.equal(fake_nvfp4(w, s2), w)
    # FP8: E4M3 values times a power of two, with 448 present
    v = torch.tensor([x for x, _ in E4M3])
    w8 = torch.cat([v, -v]) * 2.0 ** -5
    s = w8.abs().amax() / 448.0
    assert torch.equal(fp8_dequantize(fp8_quantize(w8[None], s), s)[0], w8)
    assert torch.equal(fake_fp8(w8, s), w8)


@pytest.mark.parametrize("fake", ["nvfp4", "fp8"])
def test_straight_through_gradient_is_identity(fake):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 32, generator=g, requires_grad=True)
    s = nvfp4_tensor_scale(w.detach().abs().amax()) if fake == "nvfp4" else w.detach().abs().amax() / 448
    q = fake_nvfp4(w, s) if fake == "nvfp4" else fake_fp8(w, s)
    assert not torch.equal(q, w)  # it does quantize
    up = torch.randn(8, 32, generator=g)
    q.backward(up)
    assert torch.equal(w.grad, up)


def test_optional_modelopt_bit_patterns():
    nv = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 64, generator=g)
    qt, block, scale2 = nv.NVFP4QTensor.quantize(w.clone(), 16)
    packed, ours = nvfp4_quantize(w, nvfp4_tensor_scale(w.abs().amax()))
    assert torch.equal(qt._quantized_data, packed)
    assert same_bits(block, ours)


# ---------------------------------------------------------------------------------------------- fake quant
def test_fake_quant_weights_and_ste_in_a_model():
    m = model_of(hybrid_config())
    ids = torch.randint(0, VOCAB, (2, 16))
    ref = m(ids)
    latent = {q.name: q.latent().detach().clone() for q in quantized_weights(m)}
    assert {q.leaf for q in quantized_weights(m)} == {"in_proj", "out_proj", "up_proj", "down_proj", "q_proj",
                                                      "k_proj", "v_proj", "o_proj"}
    fake_quantize_(m, "nvfp4")
    scales = weight_scales(m, "nvfp4")
    # q/k/v share one per-tensor scale (vLLM fuses them); the stacked experts have one per expert
    assert scales["layers.2.mixer.q_proj.weight"] == scales["layers.2.mixer.v_proj.weight"]
    assert scales["layers.3.mixer.up_proj"].shape == (4,)
    w = m.layers[2].mixer.q_proj.weight
    qkv = torch.cat([latent[f"layers.2.mixer.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(w, fake_nvfp4(latent["layers.2.mixer.q_proj.weight"], nvfp4_tensor_scale(qkv.abs().amax())))
    out = m(ids)
    assert not torch.equal(out, ref) and torch.isfinite(out).all()
    # the latent weights get the gradient of a plain model holding the fake-quantized values (identity STE)
    out.logsumexp(-1).mean().backward()
    baked = remove_fake_quant_(copy.deepcopy(m), bake=True)
    baked(ids).logsumexp(-1).mean().backward()
    orig = m.layers[2].mixer.q_proj.parametrizations.weight.original
    torch.testing.assert_close(orig.grad, baked.layers[2].mixer.q_proj.weight.grad)
    torch.testing.assert_close(m.layers[3].mixer.parametrizations.up_proj.original.grad,
                               baked.layers[3].mixer.up_proj.grad)
    assert orig.grad.abs().sum() > 0
    assert torch.equal(m(ids), out)  # removing the copy's fake quantization left the original's in place
    remove_fake_quant_(m)
    assert all(torch.equal(q.latent(), latent[q.name]) for q in quantized_weights(m))
    assert torch.equal(m(ids), ref) and not m._forward_pre_hooks and not m._forward_hooks


def test_remove_fake_quant_bake_keeps_quantized_values():
    m = fake_quantize_(model_of(hybrid_config()), "nvfp4")
    fq = {n: t.clone() for n, t in sliced_state_dict(m, None).items()}
    remove_fake_quant_(m, bake=True)
    assert all(torch.equal(t, fq[n]) for n, t in sliced_state_dict(m, None).items())


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_sliced_fake_quant_equals_quantizing_the_slice_with_parent_scales(fmt):
    m = fake_quantize_(model_of(hybrid_config()), fmt)
    parent = weight_scales(m, fmt)
    fq = sliced_state_dict(m, SUB)  # the forward's weights: slices of q(full tensor)
    with fake_quant_disabled(m):
        lat = sliced_state_dict(m, SUB)
    quant = fake_nvfp4 if fmt == "nvfp4" else fake_fp8
    small = quantized_weights(extract(m, SUB))
    assert len(small) == len(parent)
    for q in small:
        s = parent[q.name][: SUB.experts] if q.stacked else parent[q.name]
        assert torch.equal(fq[q.name], quant(lat[q.name], s)), q.name


def test_elastic_forward_is_the_sliced_fake_quant_model():
    m = fake_quantize_(model_of(hybrid_config()), "nvfp4")
    ids = torch.randint(0, VOCAB, (2, 16))
    small = extract(m, SUB)  # a plain Decoder holding the sliced fake-quantized weights
    torch.testing.assert_close(small(ids), m(ids, sub=SUB), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- checks
def test_width_checks_name_axis_and_width():
    cfg = hybrid_config()
    check_subarch(cfg, SUB)
    ok = ElasticConfig(budgets=[1.0, 0.5], quant="nvfp4", align=16,
                       choices={"hidden": [64, 48, 32], "ffn": [96, 64], "attn_heads_per_group": [2, 1]})
    check_elastic(cfg, ok)
    bad = ElasticConfig(budgets=[1.0, 0.5], quant="nvfp4", align=8, choices={"ffn": [96, 72]})
    with pytest.raises(ConfigError, match=r"choices\['ffn'\] width 72.*MLP down_proj"):
        check_elastic(cfg, bad)
    check_elastic(cfg, bad, fmt="fp8")  # FP8 scales have no blocks
    with pytest.raises(ConfigError, match=r"hidden=40"):
        check_subarch(cfg, SubArch(hidden=40))
    # attention with head_dim 8: keeping one head of a group makes o_proj read 8-wide runs
    small_heads = hybrid_config(head_dim=8, num_heads=8)
    with pytest.raises(ConfigError, match=r"choices\['attn_heads_per_group'\] width 1 .*o_proj"):
        check_elastic(small_heads, ElasticConfig(budgets=[1.0, 0.5], quant="nvfp4",
                                                 choices={"attn_heads_per_group": [4, 1]}))
    with pytest.raises(ConfigError, match="mamba_heads_per_group=1 .*out_proj"):
        check_subarch(hybrid_config(mamba_head_dim=8, mamba_heads=8), SubArch(mamba_heads_per_group=1))
    with pytest.raises(ConfigError, match="hidden=40"):
        fake_quantize_(model_of(hybrid_config(hidden_size=40)), "nvfp4")


# ---------------------------------------------------------------------------------------------- calibration
def test_calibration_amax_is_the_inputs_max():
    m = model_of(hybrid_config())
    batches = [torch.randint(0, VOCAB, (2, 16)) for _ in range(2)]
    normed = []  # independent: the pre-mixer norm outputs of block 0 (Mamba in_proj's input)
    h = m.layers[0].norm.register_forward_hook(lambda mod, a, out: normed.append(out.abs().max()))
    amax = calibrate(m, batches, [None, SUB], progress=False)
    h.remove()
    assert len(amax) == len(quantized_weights(m))
    assert all(torch.isfinite(a).all() and (a > 0).all() for a in amax.values())
    assert amax["layers.0.mixer.in_proj.weight"] == max(normed)
    assert amax["layers.3.mixer.down_proj"].shape == (4,)
    assert m.layers[0].mixer.probe is None and not m.layers[0].mixer._forward_pre_hooks


# ---------------------------------------------------------------------------------------------- export
def _baked(model):
    with torch.no_grad():
        return {n: t.clone() for n, t in sliced_state_dict(model, None).items()}


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "fp8_channel"])
@pytest.mark.parametrize("family", ["nemotron_h", "llama", "qwen3_moe"])
def test_export_load_round_trip(tmp_path, fmt, family):
    m = fake_quantize_(model_of(CONFIGS[family]()), fmt)
    ids = torch.randint(0, VOCAB, (2, 16))
    amax = calibrate(m, [ids], progress=False)
    out = export_quantized(m, tmp_path / "q", fmt, input_amax=amax)
    back = load_quantized(out)
    want = _baked(m)
    got = sliced_state_dict(back, None)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(back(ids), m(ids))
    # the layout vLLM reads
    t = load_file(out / "model.safetensors")
    hq = json.loads((out / "hf_quant_config.json").read_text())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    algo = {"nvfp4": "NVFP4", "fp8": "FP8", "fp8_channel": "FP8_PER_CHANNEL_PER_TOKEN"}[fmt]
    assert hq["quantization"]["quant_algo"] == qc["quant_algo"] == algo and qc["quant_method"] == "modelopt"
    excl = set(hq["quantization"]["exclude_modules"])
    assert excl == set(qc["ignore"])
    if family == "nemotron_h":
        w = "backbone.layers.3.mixer.experts.1.up_proj."
        assert {"backbone.embeddings", "lm_head", "backbone.layers.0.mixer.conv1d", "backbone.layers.3.mixer.gate",
                "backbone.norm_f", "backbone.layers.0.mixer.norm"} <= excl
    else:
        w = "model.layers.0.self_attn.q_proj."
        assert {"model.embed_tokens", "lm_head", "model.norm", "model.layers.0.input_layernorm"} <= excl
    if family == "qwen3_moe":
        assert "model.layers.0.mlp.gate" in excl
        e1 = "model.layers.1.mlp.experts.1."
        if fmt != "fp8_channel":  # gate and up of one expert share the per-tensor scale (vLLM's w13)
            comp = "weight_scale_2" if fmt == "nvfp4" else "weight_scale"
            assert torch.equal(t[e1 + "gate_proj." + comp], t[e1 + "up_proj." + comp])
    assert not any(k.removesuffix(".weight") in excl for k in t if k.endswith(".weight_scale"))
    out_dim, in_dim = want["layers.3.mixer.up_proj" if family == "nemotron_h" else "layers.0.mixer.q_proj.weight"].shape[-2:]
    if fmt == "nvfp4":
        assert t[w + "weight"].dtype == torch.uint8 and t[w + "weight"].shape == (out_dim, in_dim // 2)
        assert t[w + "weight_scale"].dtype == torch.float8_e4m3fn and t[w + "weight_scale"].shape == (out_dim, in_dim // 16)
        assert t[w + "weight_scale_2"].shape == () and t[w + "input_scale"].shape == ()
        assert hq["quantization"]["group_size"] == qc["group_size"] == 16
    else:
        assert t[w + "weight"].dtype == torch.float8_e4m3fn and t[w + "weight"].shape == (out_dim, in_dim)
        assert t[w + "weight_scale"].shape == ((out_dim,) if fmt == "fp8_channel" else ())
        assert (w + "input_scale" in t) == (fmt == "fp8")


def test_nvfp4_bytes_per_quantized_parameter(tmp_path):
    m = fake_quantize_(model_of(hybrid_config(hidden_size=128, intermediate_size=256)), "nvfp4")
    out = export_quantized(m, tmp_path / "q", "nvfp4", dtype=torch.bfloat16)  # no calibration: weight-only
    hf = json.loads((out / "config.json").read_text())
    assert hf["quantization_config"]["quant_algo"] == "W4A16_NVFP4" and hf["dtype"] == "bfloat16"
    assert load_file(out / "model.safetensors")["backbone.embeddings.weight"].dtype == torch.bfloat16
    b = quantized_bytes(out)
    n = sum(q.latent().numel() for q in quantized_weights(m))
    assert b["quantized_params"] == n
    assert 0.5625 <= b["bytes_per_quantized_param"] <= 0.57
    with pytest.raises(ValueError, match="fp8 stores a static activation scale"):
        export_quantized(m, tmp_path / "q8", "fp8")


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8_channel"])
@pytest.mark.parametrize("sub", [SUB, SUB_DEPTH], ids=["width", "depth"])
def test_slice_quantized_equals_quantizing_the_slice(tmp_path, fmt, sub):
    m = fake_quantize_(model_of(hybrid_config()), fmt)
    ids = torch.randint(0, VOCAB, (2, 16))
    amax = calibrate(m, [ids], progress=False)
    full = export_quantized(m, tmp_path / "full", fmt, input_amax=amax)
    sl = slice_quantized(full, tmp_path / "sl", sub)
    # dequantized: the elastic fake-quantized weights at `sub`, bit for bit
    want = sliced_state_dict(m, sub)
    got = sliced_state_dict(load_quantized(sl), None)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    torch.testing.assert_close(load_quantized(sl)(ids), m(ids, sub=sub), rtol=1e-5, atol=1e-5)
    # packed bytes: the budget's latent weights quantized with the parent's per-tensor scales
    assert export_quantized(m, tmp_path / "direct", fmt, sub=sub, input_amax=amax)
    a, b = load_file(sl / "model.safetensors"), load_file(tmp_path / "direct" / "model.safetensors")
    assert set(a) == set(b) and all(same_bits(a[k], b[k]) for k in a)
    if sub is SUB and fmt == "nvfp4":  # independently: quantize the extracted latent submodel's weights
        parent = weight_scales(m, fmt)
        with fake_quant_disabled(m):
            small = extract(m, sub)
        fam = FAMILIES["nemotron_h"]
        for q in quantized_weights(small):
            s2 = parent[q.name][: sub.experts] if q.stacked else parent[q.name]
            packed, block = nvfp4_quantize(q.latent(), s2)
            for comp, v in (("weight", packed), ("weight_scale", block), ("weight_scale_2", s2)):
                names = fam.state_to_hf({q.name: v, "lm_head.weight": torch.empty(0)}, small.cfg)
                for k, t in names.items():
                    if k != "lm_head.weight":
                        assert same_bits(a[k.removesuffix("weight") + comp], t), k
    if fmt == "nvfp4":
        with pytest.raises(ConfigError, match="hidden=40"):
            slice_quantized(full, tmp_path / "bad", SubArch(hidden=40))


# ---------------------------------------------------------------------------------------------- elastic, QAD
def _elastic_config(steps, **over) -> ElasticConfig:
    kw = dict(budgets=[1.0, 0.6], align=16, sort=False, router_hidden=8, steps=steps, batch=2, seq_len=32,
              checkpoint_every=steps, lr_model=1e-3, lr_router=0.03, seed=0,
              choices={"hidden": [64, 48, 32], "ffn": [96, 64, 32], "moe_ffn": [32, 16], "experts": [4, 3, 2],
                       "mamba_heads_per_group": [2, 1], "attn_heads_per_group": [2, 1]})
    kw.update(over)
    return ElasticConfig(**kw)


@pytest.fixture(scope="module")
def elastic_dir(tmp_path_factory):
    """A tiny elastic checkpoint (2 elastify steps) with the byte tokenizer, for quantize() and QAD."""
    from nestlm.data import ByteTokenizer

    d = tmp_path_factory.mktemp("elastic")
    data = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(0))
    nestlm.elastify(_elastic_config(2), model_of(hybrid_config()), data, d / "el", progress=False)
    ByteTokenizer().save(d / "el")
    return d / "el"


def test_quantize_elastic_checkpoint_and_budget_slices(tmp_path, elastic_dir):
    manifest = json.loads((elastic_dir / MANIFEST).read_text())
    budget = next(n for n in manifest["budgets"] if n != "full")
    out = quantize(str(elastic_dir), str(tmp_path / "q"), "nvfp4", calib_tokens=256, seq_len=64, progress=False)
    assert (out / MANIFEST).is_file() and (out / "router.safetensors").is_file()
    assert (out / "nestlm_tokenizer.json").is_file()
    sl = slice_quantized(out, tmp_path / "sl", budget)
    direct = quantize(str(elastic_dir), str(tmp_path / "b"), "nvfp4", budget=budget, calib_tokens=256, seq_len=64,
                      progress=False)
    a, b = load_file(sl / "model.safetensors"), load_file(direct / "model.safetensors")
    assert set(a) == set(b) and all(same_bits(a[k], b[k]) for k in a)
    sub = SubArch.from_dict(manifest["budgets"][budget]["sub"])
    ref = fake_quantize_(nestlm.from_hf(elastic_dir), "nvfp4")
    ids = torch.randint(0, VOCAB, (1, 16))
    torch.testing.assert_close(load_quantized(direct)(ids), ref(ids, sub=sub), rtol=1e-5, atol=1e-5)
    with pytest.raises(nestlm.CheckpointError, match="already quantized"):
        quantize(str(out), str(tmp_path / "again"))
    with pytest.raises(nestlm.CheckpointError, match="no ModelOpt quantization_config"):
        load_quantized(elastic_dir)


def test_tiny_qad_run_trains_and_exports(tmp_path, elastic_dir):
    """elastify with quant="nvfp4": a frozen full-precision teacher, a fake-quantized student, all budgets."""
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    ecfg = _elastic_config(12, quant="nvfp4", p_full=0.5, lr_model=3e-3)
    qad = nestlm.elastify(ecfg, str(elastic_dir), [ids], tmp_path / "qad", progress=False)
    log = [json.loads(x) for x in (qad / "train" / "log.jsonl").read_text().splitlines()]
    kd = {n: [r["kd"] for r in log if r["budget"] == n] for n in ("full", "60%")}
    assert all(math.isfinite(v) and v > 0 for r in log for v in (r["kd"],))
    assert kd["full"][-1] < kd["full"][0]  # one repeated batch: the quantized student moves to the teacher
    # elastify exported the student's latent weights (what `quantize` packs exactly as training saw them)
    student = fake_quantize_(nestlm.from_hf(elastic_dir), "nvfp4")
    state = torch.load(qad / "train" / "checkpoint.pt", weights_only=True)["model"]
    student.load_state_dict(state)
    latent = latent_state_dict(state)
    assert "layers.3.mixer.up_proj" in latent and not any("parametrizations" in k for k in latent)
    exported = sliced_state_dict(nestlm.from_hf(qad), None)
    assert set(exported) == set(latent) and all(torch.equal(exported[k], v) for k, v in latent.items())
    baked = _baked(student)
    assert any(not torch.equal(exported[k], v) for k, v in baked.items())  # latent, not fake-quantized
    # the packed export of the trained latent weights loads back to the same model
    out = export_quantized(student, tmp_path / "packed", "nvfp4", input_amax=calibrate(student, [ids], progress=False))
    assert torch.equal(load_quantized(out)(ids), student(ids))
