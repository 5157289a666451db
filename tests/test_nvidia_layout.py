"""NVIDIA's elastic release layout (NVIDIA-Nemotron-Labs-3-Elastic-30B-A3B, model type nemotron_h) at toy size.

The fixtures are written here, tensor by tensor, from the facts in shared/REFERENCE.md (names, dtypes, the
ModelOpt FP8 / NVFP4 layout, NVIDIA's NVFP4 exclude list), not by nestlm's exporters: a Nano-v3-shaped hybrid
(pattern "MEMEM*EMEM*E": Mamba/MoE alternating, attention after a Mamba layer; MoE with a shared expert and a
correction bias, relu2, 2 KV heads, Mamba in 8 groups, untied head, fp32 router) in

    bf16   plain HF folder, config.json as NVIDIA writes it (hybrid_override_pattern, torch_dtype, auto_map)
    fp8    ModelOpt FP8: e4m3 weights, fp32 scalar weight_scale / input_scale, FP8 KV cache (k_scale, v_scale)
    nvfp4  ModelOpt NVFP4 with NVIDIA's mixed precision: attention q/k/v/o and the Mamba in/out_proj just
           before each attention layer stay bf16 (exclude_modules), conv1d bf16, router fp32

Checks: the bf16 cut runs in plain transformers with the logits of nestlm's nested forward; packed cuts are
byte-equal prefixes of the source tensors with scalar scales unchanged, and their configs and
hf_quant_config.json agree (the exclude list renumbered when layers are dropped); dequantized cuts give the
nested forward of the dequantized source; bad cuts are refused by name before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.testing import assert_close

import nestlm
from nestlm import ConfigError, SubArch
from nestlm.load import load_quantized
from nestlm.quant.formats import fp8_quantize, nvfp4_quantize, nvfp4_tensor_scale
from nestlm.slicing import slice as slice_

pytestmark = pytest.mark.usefixtures("one_thread")

PATTERN = "MEMEM*EMEM*E"  # Nano v3's first period ("MEMEM*E" then "MEMEM*E"...), shortened
ATTN = [i for i, c in enumerate(PATTERN) if c == "*"]  # 5, 10
FEEDS_ATTN = [i - 1 for i in ATTN]  # 4, 9: the Mamba layers NVIDIA keeps in bf16 in its NVFP4 release
# Nano v3 / 21 in width: hidden 2688 -> 128, experts 128 x 1856 -> 8 x 64, shared 3712 -> 128,
# Mamba 64 heads x 64 in 8 groups -> 32 heads x 16 in 8 groups, attention 32/2 x 128 -> 8/2 x 16
NANO = dict(hidden_size=128, vocab_size=256, mamba_num_heads=32, mamba_head_dim=16, n_groups=8, ssm_state_size=16,
            conv_kernel=4, chunk_size=8, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
            moe_shared_expert_intermediate_size=128)

# cuts in NVIDIA's style: hidden and expert FFN width (REFERENCE: the 23B / 12B differ in exactly these)
SUB_23 = SubArch(hidden=96, moe_ffn=48)
SUB_12 = SubArch(hidden=80, moe_ffn=32)
KEEP = (0, 1, 2, 3, 5, 6, 7, 8, 11)  # drops Mamba 4 and 9 (excluded in NVFP4) and attention 10
SUB_DEPTH = SubArch(hidden=96, moe_ffn=48, shared_ffn=96, experts=6, layers=KEEP)
CUTS = {"23b-like": SUB_23, "12b-like": SUB_12, "depth": SUB_DEPTH}
TOL = {"atol": 1e-4, "rtol": 1e-4}


# ---------------------------------------------------------------------------------------------- fixtures
def nano_config() -> dict:
    """config.json as NVIDIA's nemotron_h releases write it (custom-code keys included)."""
    return {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
            "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                         "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"},
            "hybrid_override_pattern": PATTERN, "num_hidden_layers": len(PATTERN), **NANO,
            "mamba_hidden_act": "silu", "mlp_hidden_act": "relu2", "use_conv_bias": True, "use_bias": False,
            "attention_bias": False, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
            "routed_scaling_factor": 2.5, "tie_word_embeddings": False, "layer_norm_epsilon": 1e-5,
            "residual_in_fp32": False, "rescale_prenorm_residual": True, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def nano_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the toy parent by its HF name, fp32 values (router in fp32 on disk, the rest bf16)."""
    g = torch.Generator().manual_seed(seed)
    c = NANO
    d, v = c["hidden_size"], c["vocab_size"]
    h, p, ng, n = c["mamba_num_heads"], c["mamba_head_dim"], c["n_groups"], c["ssm_state_size"]
    e, f, fs = c["n_routed_experts"], c["moe_intermediate_size"], c["moe_shared_expert_intermediate_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]

    def w(rows, cols):
        return torch.randn(rows, cols, generator=g) / math.sqrt(cols)

    def vec(size, mean=0.0, std=0.1):
        return mean + std * torch.randn(size, generator=g)

    t = {"backbone.embeddings.weight": torch.randn(v, d, generator=g)}
    for i, kind in enumerate(PATTERN):
        pre = f"backbone.layers.{i}."
        t[pre + "norm.weight"] = vec(d, 1.0, 0.2)
        m = pre + "mixer."
        if kind == "M":
            conv = h * p + 2 * ng * n  # [x | B | C]
            t[m + "in_proj.weight"] = w(2 * h * p + 2 * ng * n + h, d)  # [z | x | B | C | dt]
            t[m + "conv1d.weight"] = torch.randn(conv, 1, c["conv_kernel"], generator=g) * 0.5
            t[m + "conv1d.bias"] = vec(conv)
            t[m + "dt_bias"] = torch.rand(h, generator=g) * 2 - 1
            t[m + "A_log"] = torch.rand(h, generator=g) * 1.5
            t[m + "D"] = vec(h, 0.0, 1.0)
            t[m + "norm.weight"] = vec(h * p, 1.0, 0.2)
            t[m + "out_proj.weight"] = w(d, h * p)
        elif kind == "*":
            t[m + "q_proj.weight"], t[m + "k_proj.weight"] = w(q, d), w(kv, d)
            t[m + "v_proj.weight"], t[m + "o_proj.weight"] = w(kv, d), w(d, q)
        else:
            t[m + "gate.weight"] = w(e, d)
            t[m + "gate.e_score_correction_bias"] = vec(e)
            for j in range(e):
                t[m + f"experts.{j}.up_proj.weight"] = w(f, d)
                t[m + f"experts.{j}.down_proj.weight"] = w(d, f)
            t[m + "shared_experts.up_proj.weight"] = w(fs, d)
            t[m + "shared_experts.down_proj.weight"] = w(d, fs)
    t["backbone.norm_f.weight"] = vec(d, 1.0, 0.2)
    t["lm_head.weight"] = w(v, d)
    return t


LINEAR = re.compile(r".*\.(in_proj|out_proj|[qkvo]_proj|up_proj|down_proj)\.weight$|lm_head\.weight$")


def stored_dtype(name: str) -> torch.dtype:
    return torch.float32 if ".gate." in name else torch.bfloat16  # NVIDIA's router (and its bias) is fp32


def nvfp4_excluded() -> list[str]:
    """NVIDIA's NVFP4 exclude list, as REFERENCE.md gives it: lm_head, the attention projections, and the
    Mamba in/out_proj of the layers that feed attention."""
    out = ["lm_head"]
    for a, mb in zip(ATTN, FEEDS_ATTN, strict=True):
        out += [f"backbone.layers.{mb}.mixer.{x}" for x in ("in_proj", "out_proj")]
        out += [f"backbone.layers.{a}.mixer.{x}_proj" for x in "qkvo"]
    return out


def write_folder(root: Path, fmt: str) -> Path:
    """The toy parent as NVIDIA ships it: fmt "bf16", "fp8" or "nvfp4" (ModelOpt layout)."""
    g = torch.Generator().manual_seed(7)
    src = nano_tensors()
    hf = nano_config()
    out: dict[str, torch.Tensor] = {}
    excluded = ["lm_head"] if fmt == "fp8" else nvfp4_excluded()
    for name, x in src.items():
        module = name.removesuffix(".weight")
        if fmt == "bf16" or not LINEAR.match(name) or module in excluded:
            out[name] = x.to(stored_dtype(name))
            continue
        amax = x.abs().amax()
        if fmt == "fp8":  # per-tensor: weight_scale = amax / 448
            s = amax / 448.0
            out[name], out[module + ".weight_scale"] = fp8_quantize(x, s), s
        else:  # NVFP4: codes [out, in/2], e4m3 block scales [out, in/16], weight_scale_2 = amax / (6 * 448)
            s2 = nvfp4_tensor_scale(amax)
            out[name], out[module + ".weight_scale"] = nvfp4_quantize(x, s2)
            out[module + ".weight_scale_2"] = s2
        out[module + ".input_scale"] = 0.01 + torch.rand((), generator=g)
    if fmt != "bf16":
        for a in ATTN:  # FP8 KV cache: one scale per K and V projection
            for x in "kv":
                out[f"backbone.layers.{a}.mixer.{x}_proj.{x}_scale"] = 0.005 + torch.rand((), generator=g)
        algo = "FP8" if fmt == "fp8" else "NVFP4"
        quant = {"quant_algo": algo, "kv_cache_quant_algo": "FP8", "exclude_modules": excluded}
        if fmt == "nvfp4":
            quant["group_size"] = 16
        producer = {"name": "modelopt", "version": "0.37.0"}
        hf["quantization_config"] = {"quant_method": "modelopt", "producer": producer, **quant}
    folder = root / fmt
    folder.mkdir(parents=True)
    names = sorted(out)  # two shards with an index, as the release is sharded
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: out[k].contiguous() for k in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(x.numel() * x.element_size() for x in out.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    if fmt != "bf16":
        (folder / "hf_quant_config.json").write_text(json.dumps(
            {"producer": hf["quantization_config"]["producer"], "quantization": quant}, indent=2))
    return folder


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    root = tmp_path_factory.mktemp("nano")
    return {fmt: write_folder(root, fmt) for fmt in ("bf16", "fp8", "nvfp4")}


# ---------------------------------------------------------------------------------------------- helpers
def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def source_name(name: str, layers: tuple[int, ...]) -> str:
    """The source tensor an output tensor is cut from: block i of the cut is block layers[i] of the parent."""
    m = re.match(r"backbone\.layers\.(\d+)\.(.*)", name)
    return f"backbone.layers.{layers[int(m[1])]}.{m[2]}" if m else name


def renumbered(modules: list[str], layers: tuple[int, ...]) -> list[str]:
    """An exclude list after a depth cut, computed here: entries of dropped blocks go, the rest renumber."""
    new = {old: i for i, old in enumerate(layers)}
    out = []
    for mod in modules:
        m = re.match(r"backbone\.layers\.(\d+)\.(.*)", mod)
        if not m:
            out.append(mod)
        elif int(m[1]) in new:
            out.append(f"backbone.layers.{new[int(m[1])]}.{m[2]}")
    return out


def ids_(b=2, t=12, seed=0):
    return torch.randint(0, NANO["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- bf16
def test_fixture_is_what_transformers_and_nestlm_both_run(nano):
    """The hand-written parent is a coherent nemotron_h checkpoint: plain transformers and nestlm agree."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(nano["bf16"], dtype=torch.float32).eval()
    ours = nestlm.from_hf(nano["bf16"])
    assert ours.cfg.pattern == PATTERN and not ours.cfg.tie_embeddings and ours.cfg.mamba_groups == 8
    with torch.no_grad():
        assert_close(hf(ids_()).logits, ours(ids_()), **TOL)


@pytest.mark.parametrize("cut", list(CUTS))
def test_bf16_cut_runs_in_transformers_as_the_nested_forward(nano, cut, tmp_path):
    from transformers import AutoModelForCausalLM

    sub = CUTS[cut]
    out = slice_(nano["bf16"], sub, tmp_path / cut)
    parent = nestlm.from_hf(nano["bf16"])  # fp32 copy of the bf16 values
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close(hf(ids_()).logits, parent(ids_(), sub=sub), **TOL)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == sub.hidden and cfg["moe_intermediate_size"] == sub.moe_ffn
    assert cfg["dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is False
    got, src = read_all(out), read_all(nano["bf16"])
    layers = sub.resolve(parent.cfg).layers
    for k, x in got.items():  # dtypes as NVIDIA stores them, values the corner prefix of the parent's tensor
        s = src[source_name(k, layers)]
        assert x.dtype == s.dtype == stored_dtype(k), k
        if ".experts." not in k or int(k.split(".experts.")[1].split(".")[0]) < (sub.experts or 8):
            assert torch.equal(x, s[tuple(slice(0, n) for n in x.shape)]), k


# ---------------------------------------------------------------------------------------------- packed
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("cut", list(CUTS))
def test_packed_cut_is_byte_prefixes_with_consistent_configs(nano, fmt, cut, tmp_path):
    sub = CUTS[cut]
    src_dir = nano[fmt]
    out = slice_(src_dir, sub, tmp_path / cut)
    src, got = read_all(src_dir), read_all(out)
    cfg = nestlm.convert.config_from_hf(json.loads((src_dir / "config.json").read_text()))
    s = sub.resolve(cfg)
    layers = s.layers

    # names: every source tensor of a kept block (first `experts` experts), renumbered; nothing else
    def kept(name):
        m = re.match(r"backbone\.layers\.(\d+)\.(.*)", name)
        if m and int(m[1]) not in layers:
            return None
        e = re.search(r"\.experts\.(\d+)\.", name)
        if e and int(e[1]) >= s.experts:
            return None
        return f"backbone.layers.{layers.index(int(m[1]))}.{m[2]}" if m else name

    want_names = {kept(k) for k in src} - {None}
    assert set(got) == want_names

    for k, x in got.items():
        sx = src[source_name(k, layers)]
        assert x.dtype == sx.dtype, k
        if x.dim() == 0:  # per-tensor scales (weight_scale, weight_scale_2, input_scale, k/v_scale): unchanged
            assert torch.equal(raw(x), raw(sx)), k
        else:  # codes, block scales and bf16 tensors: byte-equal corner prefixes of the parent's
            assert torch.equal(raw(x), raw(sx[tuple(slice(0, n) for n in x.shape)])), k
    # widths: NVFP4 codes hold two inputs a byte, block scales one per 16
    up = "backbone.layers.1.mixer.experts.0.up_proj."
    per_byte = 2 if fmt == "nvfp4" else 1
    assert tuple(got[up + "weight"].shape) == (s.moe_ffn, s.hidden // per_byte)
    if fmt == "nvfp4":
        assert tuple(got[up + "weight_scale"].shape) == (s.moe_ffn, s.hidden // 16)

    # configs: the source's quantization settings, the exclude list renumbered for the kept blocks
    src_hq = json.loads((src_dir / "hf_quant_config.json").read_text())
    hq = json.loads((out / "hf_quant_config.json").read_text())
    excl = renumbered(src_hq["quantization"]["exclude_modules"], layers)
    assert hq["quantization"] == src_hq["quantization"] | {"exclude_modules": excl}
    assert hq["producer"] == src_hq["producer"]
    hf = json.loads((out / "config.json").read_text())
    src_qc = json.loads((src_dir / "config.json").read_text())["quantization_config"]
    assert hf["quantization_config"] == src_qc | {"exclude_modules": excl}
    assert hf["hidden_size"] == s.hidden and hf["moe_intermediate_size"] == s.moe_ffn
    assert hf["n_routed_experts"] == s.experts and hf["dtype"] == "bfloat16"
    assert "".join("M" if t == "linear_attention" else "*" if t == "full_attention" else "E"
                   for t in hf["layers_block_type"]) == "".join(PATTERN[i] for i in layers)
    # every linear weight is either quantized (has a weight_scale) or excluded, never both
    for k in got:
        if LINEAR.match(k):
            module = k.removesuffix(".weight")
            assert (module + ".weight_scale" in got) != (module in excl), k
    if cut == "depth" and fmt == "nvfp4":  # layer 5's attention is block 4 of the cut; 9 and 10 are gone
        assert "backbone.layers.4.mixer.q_proj" in excl and len(excl) == 1 + 4


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_dequantized_cut_is_the_nested_forward_of_the_dequantized_parent(nano, fmt, tmp_path):
    parent = load_quantized(nano[fmt])
    ids = ids_()
    for name, sub in CUTS.items():
        small = load_quantized(slice_(nano[fmt], sub, tmp_path / name))
        with torch.no_grad():
            assert_close(small(ids), parent(ids, sub=sub), **TOL)
    # and the dequantization is the source's own: a bf16 tensor passes through, a quantized one is scaled
    bf = read_all(nano["bf16"])
    w = parent.layers[1].mixer.up_proj[0]  # expert 0 of block 1, [f, d]
    err = (w - bf["backbone.layers.1.mixer.experts.0.up_proj.weight"].float()).abs().max()
    assert 0 < err < (0.1 if fmt == "fp8" else 0.5)
    if fmt == "nvfp4":  # attention stayed bf16 (excluded)
        assert torch.equal(parent.layers[5].mixer.q_proj.weight, bf["backbone.layers.5.mixer.q_proj.weight"].float())


def test_folder_described_only_by_hf_quant_config(nano, tmp_path):
    """Older ModelOpt exports put no quantization_config in config.json: hf_quant_config.json alone marks
    the folder as packed. The cut and the dequantized model are those of the folder that has both."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(nano["nvfp4"], bare)
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["quantization_config"]
    (bare / "config.json").write_text(json.dumps(cfg))
    a = read_all(slice_(bare, SUB_DEPTH, tmp_path / "a"))
    b = read_all(slice_(nano["nvfp4"], SUB_DEPTH, tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(raw(a[k]), raw(b[k])) for k in a)
    assert (json.loads((tmp_path / "a" / "hf_quant_config.json").read_text())
            == json.loads((tmp_path / "b" / "hf_quant_config.json").read_text()))
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4" and qc["kv_cache_quant_algo"] == "FP8"
    with torch.no_grad():
        assert torch.equal(nestlm.from_hf(bare)(ids_()), load_quantized(nano["nvfp4"])(ids_()))


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("fmt, sub, match", [
    ("nvfp4", SubArch(hidden=88), r"hidden=88 .*multiple of 16"),  # an NVFP4 block of 16 broken
    ("nvfp4", SubArch(moe_ffn=40), r"moe_ffn=40 .*multiple of 16"),
    ("nvfp4", SubArch(shared_ffn=72), r"shared_ffn=72 .*multiple of 16"),
    ("bf16", SubArch(hidden=160), r"hidden=160 is outside 1\.\.128"),  # wider than the source
    ("fp8", SubArch(moe_ffn=65), r"moe_ffn=65 is outside 1\.\.64"),
    ("nvfp4", SubArch(mamba_heads_per_group=5), r"mamba_heads_per_group=5 is outside 1\.\.4"),
    ("bf16", SubArch(attn_heads_per_group=5), r"attn_heads_per_group=5 is outside 1\.\.4"),
    ("fp8", SubArch(attn_kv_heads=3), r"attn_kv_heads=3 is outside 1\.\.2"),
])
def test_bad_cuts_are_refused_by_name_before_writing(nano, fmt, sub, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        slice_(nano[fmt], sub, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_group_breaking_and_unknown_keys_are_refused(nano):
    """Total head counts that split a KV group or a Mamba group, and unknown keys, are refused by name."""
    from nestlm.elastic.artifact import parse_sub

    cfg = nestlm.convert.config_from_hf(json.loads((nano["bf16"] / "config.json").read_text()))
    assert parse_sub("hidden=96,moe_ffn=48", cfg) == SUB_23
    assert parse_sub("attn_heads=4,mamba_heads=16", cfg) == SubArch(attn_heads_per_group=2, mamba_heads_per_group=2)
    with pytest.raises(ConfigError, match=r"attn_heads=5 .*2 KV groups"):
        parse_sub("attn_heads=5", cfg)
    with pytest.raises(ConfigError, match=r"mamba_heads=20 .*8 Mamba groups"):
        parse_sub("mamba_heads=20", cfg)
    with pytest.raises(ConfigError, match=r"unknown key 'hidden_size'.*hidden, "):
        parse_sub("hidden_size=96", cfg)
    with pytest.raises(ConfigError, match="unknown SubArch keys"):
        SubArch.from_dict({"hiden": 96})
    with pytest.raises(ConfigError, match=r"hidden=160 is outside"):
        parse_sub("hidden=160", cfg)


# ---------------------------------------------------------------------------------------------- command line
def payload(folder: Path) -> tuple[int, int]:
    """(parameters, bytes) stored in a folder's safetensors, read from the headers: parameters count the
    elements of unpacked tensors (two per NVFP4 byte, none for scales)."""
    params = nbytes = 0
    for f in folder.glob("model*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                x = h.get_slice(k)
                n, dt = math.prod(x.get_shape()), x.get_dtype()
                nbytes += n * {"BF16": 2, "F32": 4, "U8": 1, "F8_E4M3": 1}[dt]
                if not k.endswith(("_scale", "_scale_2")):
                    params += 2 * n if dt == "U8" else n
    return params, nbytes


def test_cli_slice_sub_matches_the_python_api(nano, tmp_path, capsys):
    from nestlm.cli import main

    for fmt in ("bf16", "nvfp4"):
        assert main(["slice", str(nano[fmt]), "--sub", "hidden=96,moe_ffn=48", "-o", str(tmp_path / f"cli_{fmt}")]) == 0
        api = read_all(slice_(nano[fmt], SUB_23, tmp_path / f"api_{fmt}"))
        cli = read_all(tmp_path / f"cli_{fmt}")
        assert cli.keys() == api.keys() and all(torch.equal(raw(cli[k]), raw(api[k])) for k in api)
    assert "wrote" in capsys.readouterr().out
    spec = tmp_path / "cut.yaml"  # a file: layers as a list, head totals as HF configs count them
    spec.write_text("hidden: 96\nmoe_ffn: 48\nshared_ffn: 96\nexperts: 6\nlayers: [0, 1, 2, 3, 5, 6, 7, 8, 11]\n")
    assert main(["slice", str(nano["fp8"]), "--sub", str(spec), "-o", str(tmp_path / "file")]) == 0
    a, b = read_all(tmp_path / "file"), read_all(slice_(nano["fp8"], SUB_DEPTH, tmp_path / "api_depth"))
    assert a.keys() == b.keys() and all(torch.equal(raw(a[k]), raw(b[k])) for k in a)


@pytest.mark.parametrize("fmt", ["bf16", "nvfp4"])
def test_cli_search_ranks_cuts_whose_figures_match_the_written_folders(nano, fmt, tmp_path, capsys):
    from nestlm.cli import main

    full_params, full_bytes = payload(nano[fmt])
    target = 0.7 * full_params
    assert main(["search", str(nano[fmt]), "--params", f"{target:.6g}", "--tol", "0.03", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "grid SubArchs within 3%" in out and "| 1 " in out
    from nestlm.cli import search

    d = search(str(nano[fmt]), params=target, tol=0.03, top=5)["rows"]
    assert 1 <= len(d) <= 5
    devs = [abs(r["deviation"]) for r in d]
    assert devs == sorted(devs) and devs[-1] <= 0.03
    for i, r in enumerate(d[:2]):  # the listed figures are those of the folder `nestlm slice` writes
        sub = SubArch(**{k: tuple(v) if k == "layers" else v for k, v in r["sub"].items()})
        got_params, got_bytes = payload(slice_(nano[fmt], sub, tmp_path / f"r{i}"))
        assert got_params == r["params"] and got_bytes == r["bytes"]
        assert abs(got_params / target - 1) <= 0.03
    # NVFP4 keeps only widths that are whole blocks of 16; plain bf16 takes any
    grid = tmp_path / "grid.yaml"
    grid.write_text("choices:\n  hidden: [128, 120, 104]\n  moe_ffn: [64, 56, 48]\n")
    r = search(str(nano[fmt]), params=full_params, tol=0.5, top=20, choices=str(grid))
    widths = {(x["sub"].get("hidden", 128), x["sub"].get("moe_ffn", 64)) for x in r["rows"]}
    assert widths == ({(h, f) for h in (128, 120, 104) for f in (64, 56, 48)} if fmt == "bf16"
                      else {(128, 64), (128, 48)})
    # active parameters and memory targets
    act = search(str(nano[fmt]), active=0.8 * d[0]["active_params"], tol=0.05)
    assert act["rows"] and all(abs(x["active_params"] / act["target"] - 1) <= 0.05 for x in act["rows"])
    mem = search(str(nano[fmt]), memory=0.8 * r["rows"][0]["memory"], seq_len=256, tol=0.05)
    assert mem["rows"] and all(abs(x["memory"] / mem["target"] - 1) <= 0.05 for x in mem["rows"])


def test_cli_info_sub_gives_the_cut_figures(nano, tmp_path, capsys):
    from nestlm.cli import info, main

    assert main(["info", str(nano["nvfp4"]), "--sub", "hidden=80,moe_ffn=32"]) == 0
    out = capsys.readouterr().out
    assert "| source " in out and "| cut " in out and "hidden=80, moe_ffn=32" in out and "NVFP4" in out
    d = info(str(nano["nvfp4"]), sub="hidden=80,moe_ffn=32", seq_len=512)
    src, cut = d["rows"]
    assert (src["params"], src["bytes"]) == payload(nano["nvfp4"])
    assert (cut["params"], cut["bytes"]) == payload(slice_(nano["nvfp4"], SUB_12, tmp_path / "c"))
    assert cut["memory"] > cut["bytes"] and cut["memory"] < src["memory"]


def test_cli_slice_sub_on_another_family(tmp_path, capsys):
    """--sub and search work on every converted family: a Llama folder cut by head totals runs in plain
    transformers with the logits of nestlm's nested forward."""
    from conftest import saved_hf_pair, tiny_llama_config
    from transformers import AutoModelForCausalLM

    from nestlm.cli import main, search

    _, src, ours = saved_hf_pair(tiny_llama_config, {}, tmp_path / "llama")
    assert main(["slice", str(src), "--sub", "hidden=24,attn_heads=2,ffn=20", "-o", str(tmp_path / "cut")]) == 0
    sub = SubArch(hidden=24, attn_heads_per_group=1, ffn=20)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "cut", dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(hf(ids).logits, ours(ids, sub=sub), **TOL)
    with pytest.raises(SystemExit):
        main(["slice", str(src), "--sub", "mamba_heads=4", "-o", str(tmp_path / "x")])
    assert "the model has no Mamba heads" in capsys.readouterr().err
    rows = search(str(src), params=0.6 * payload(src)[0], tol=0.1)["rows"]
    assert rows and all(abs(r["deviation"]) <= 0.1 for r in rows)


@pytest.mark.parametrize("fmt, args, match", [
    ("nvfp4", ["--sub", "hidden=88"], r"hidden=88 makes .* not a multiple of 16"),
    ("bf16", ["--sub", "attn_heads=5"], r"attn_heads=5 breaks the model's 2 KV groups"),
    ("fp8", ["--sub", "mamba_heads=20"], r"mamba_heads=20 breaks the model's 8 Mamba groups"),
    ("bf16", ["--sub", "hidden=160"], r"hidden=160 is outside 1\.\.128"),
    ("nvfp4", ["--sub", "hidden_size=96"], r"unknown key 'hidden_size'"),
    ("bf16", ["--sub", "hidden"], r"'hidden' is not key=value"),
    ("bf16", ["--sub", "hidden=9.5"], r"hidden='9.5': not a whole number"),
    ("bf16", ["--sub", "missing.yaml"], r"missing.yaml: no such file"),
])
def test_cli_refuses_bad_cuts_in_one_line_before_writing(nano, fmt, args, match, tmp_path, capsys):
    from nestlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["slice", str(nano[fmt]), *args, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("nestlm: error:")
    assert re.search(match, err), err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as e:  # the same refusal from info --sub
        main(["info", str(nano[fmt]), *args])
    assert e.value.code == 2 and re.search(match, capsys.readouterr().err)


def test_cli_usage_errors(nano, tmp_path, capsys):
    from nestlm.cli import main

    for argv in (["slice", str(nano["bf16"]), "--sub", "hidden=96", "--budget", "full", "-o", str(tmp_path / "o")],
                 ["slice", str(nano["bf16"]), "-o", str(tmp_path / "o")],
                 ["search", str(nano["bf16"])],
                 ["search", str(nano["bf16"]), "--params", "1e6", "--active", "1e6"],
                 ["search", str(nano["bf16"]), "--params", "1e6", "--choices", str(tmp_path / "none.yaml")],
                 ["search", str(nano["bf16"]), "--params", "1e6", "--choices", "hidden=96"],
                 ["search", str(nano["nvfp4"]), "--params", "-5"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert "no such file" in err and "give a .yaml / .json file" in err and "target must be > 0" in err
    assert not (tmp_path / "o").exists()


SUB_HEADS = SubArch(hidden=96, moe_ffn=48, mamba_heads_per_group=2, attn_heads_per_group=2)


def reference_file(folder: Path, sub: SubArch) -> tuple[bytes, list]:
    """The bytes a cut's model.safetensors must have, the plain way: every source tensor loaded whole with
    safetensors, indexed by the plan's pieces, concatenated, and laid out after the writer's header."""
    from nestlm.convert import config_from_hf
    from nestlm.io.safetensors import Source, read_config
    from nestlm.load import open_folder
    from nestlm.quant.packed import format_of
    from nestlm.slicing.packed import packed_plan
    from nestlm.slicing.plan import plan
    from nestlm.slicing.write import _header

    hf = read_config(folder)
    if "quantization_config" in hf:
        cfg = config_from_hf(hf)
        src = Source(folder)
        tensors = packed_plan(src, cfg, sub.resolve(cfg), format_of(hf, folder)[0])
    else:
        opened = open_folder(folder)
        cfg, src = opened.cfg, opened.src
        tensors = plan(src, cfg, sub)
    whole = read_all(folder)
    body = []
    for t in tensors:
        parts = [whole[pc.src][pc.idx] for pc in t.pieces]
        body.append(raw(torch.cat(parts, dim=t.dim) if len(parts) > 1 else parts[0]).numpy().tobytes())
    return _header(tensors) + b"".join(body), tensors


@pytest.mark.parametrize("fmt", ["bf16", "nvfp4"])
def test_kernel_copies_and_gathers_write_the_reference_bytes(nano, fmt, tmp_path, monkeypatch):
    """The writer copies whole-row spans with os.copy_file_range and gathers rows cut along another dim from
    short-lived memory maps: its file is byte-identical to the plain reference (load, index, concatenate),
    for cuts along dim 0 (one span, or one per group), along dim 1 (strided rows, one piece or one per
    group interleaved in each row) and packed NVFP4 codes and block scales; also with chunks of a few rows
    (pieces split across chunks, a map per chunk), without copy_file_range (the read + write fallback),
    with writes cut short inside a run, and without libc's writev (one write per run)."""
    import os

    import nestlm.slicing.write as slicing

    want, tensors = reference_file(nano[fmt], SUB_HEADS)
    kinds = {(t.dim, len(t.pieces) > 1) for t in tensors if t.shape}
    assert {(0, False), (0, True), (1, True)} <= kinds  # one piece, groups along dim 0, groups along dim 1
    assert any(len(t.shape) == 2 and t.pieces[0].idx[1].stop < nano_width(nano[fmt], t.pieces[0].src)
               for t in tensors)  # rows cut along dim 1: strided in the source
    if fmt == "nvfp4":
        assert any(t.dtype == torch.uint8 for t in tensors) and any(t.dtype == torch.float8_e4m3fn for t in tensors)
    got = (slice_(nano[fmt], SUB_HEADS, tmp_path / "a") / "model.safetensors").read_bytes()
    assert got == want
    copies = []
    cfr = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: copies.append(a[2]) or cfr(*a))
    monkeypatch.setattr(slicing, "CHUNK_BYTES", 512)
    assert (slice_(nano[fmt], SUB_HEADS, tmp_path / "b") / "model.safetensors").read_bytes() == want
    assert copies  # the kernel copied the whole-row spans

    def unsupported(*a):
        import errno

        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    assert (slice_(nano[fmt], SUB_HEADS, tmp_path / "c") / "model.safetensors").read_bytes() == want

    def short_writev(fd, runs):  # a short write that ends inside a run: the writer goes on from there
        import ctypes

        p, n = runs[0]
        return os.write(fd, ctypes.string_at(int(p), min(int(n), 37)))

    monkeypatch.setattr(slicing, "_writev", short_writev)
    assert (slice_(nano[fmt], SUB_HEADS, tmp_path / "d") / "model.safetensors").read_bytes() == want
    monkeypatch.undo()
    monkeypatch.setitem(slicing._LIBC, "writev", None)
    assert (slice_(nano[fmt], SUB_HEADS, tmp_path / "e") / "model.safetensors").read_bytes() == want


def nano_width(folder: Path, name: str) -> int:
    """The last-dim size of a source tensor of the fixture folder."""
    from nestlm.io.safetensors import Source

    return Source(folder).shape(name)[-1]
