"""Zero-shot slicing streamed from safetensors (nestlm.slicing): every streamed tensor equals the in-memory
reference (`hf_tensors`, i.e. model/slice.py), plain transformers runs the result with the elastic model's
logits, memory stays bounded, errors leave nothing behind; `info`'s storage figures against real folders;
`evaluate` against the sliced checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_llama_config, tiny_nemotron_h_config, tiny_qwen3_config
from safetensors import safe_open
from torch.testing import assert_close

import nestlm
import nestlm.slicing.write
from nestlm import ConfigError, ElasticConfig, SubArch
from nestlm.convert import CheckpointError, UnsupportedArchitecture, hf_tensors
from nestlm.data import ByteTokenizer
from nestlm.elastic.artifact import MANIFEST, export, manifest_for
from nestlm.elastic.router import Router
from nestlm.errors import BudgetError
from nestlm.evaluate import evaluate, format_table
from nestlm.info import format_info, info
from nestlm.slicing import slice as slice_

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"atol": 2e-5, "rtol": 1e-4}
VOCAB = 259  # ByteTokenizer's: evaluate() can tokenize the KJV for these models

CHOICES = {"hidden": [1.0, 0.75, 0.5], "ffn": [1.0, 0.5], "attn_heads_per_group": [1.0, 0.5]}
NH_CHOICES = CHOICES | {"mamba_heads_per_group": [1.0, 0.5], "experts": [1.0, 0.5], "moe_ffn": [1.0, 0.5]}

# explicit SubArchs per family: every axis cut, plus depth
SUBS = {
    "nemotron_h": {
        "widths": SubArch(hidden=24, attn_kv_heads=1, attn_heads_per_group=1, mamba_heads_per_group=2, ffn=20,
                          moe_ffn=8, shared_ffn=16, experts=3),
        "depth": SubArch(layers=(0, 1, 2, 4, 5)),
        "width+depth": SubArch(hidden=16, attn_heads_per_group=1, mamba_heads_per_group=3, experts=2,
                               layers=(0, 2, 3, 5)),
    },
    "llama": {
        "widths": SubArch(hidden=24, attn_kv_heads=1, attn_heads_per_group=1, ffn=20),
        "width+depth": SubArch(hidden=16, attn_heads_per_group=1, ffn=24, layers=(0, 1, 4, 5)),
    },
    "qwen3": {
        "widths": SubArch(hidden=24, attn_heads_per_group=1, ffn=40),
        "width+depth": SubArch(hidden=24, attn_kv_heads=1, layers=(2, 3, 4, 5)),
    },
}
CONFIGS = {"nemotron_h": tiny_nemotron_h_config, "llama": tiny_llama_config, "qwen3": tiny_qwen3_config}
# the manifest budgets written into each elastic fixture (an untrained router; the SubArchs are set by hand)
BUDGETS = {
    "nemotron_h": {"80%": SUBS["nemotron_h"]["widths"], "50%": SUBS["nemotron_h"]["width+depth"]},
    "llama": {"80%": SUBS["llama"]["widths"], "50%": SUBS["llama"]["width+depth"]},
    "qwen3": {"80%": SUBS["qwen3"]["widths"], "50%": SUBS["qwen3"]["width+depth"]},
}


def make_elastic(root: Path, family: str) -> Path:
    """An elastic checkpoint folder: a random HF model of `family`, exported with a router and a manifest
    whose budgets are BUDGETS[family], plus byte-tokenizer files."""
    from transformers import AutoModelForCausalLM

    hf = randomize_(AutoModelForCausalLM.from_config(CONFIGS[family](vocab_size=VOCAB)), seed=1)
    hf.save_pretrained(root / f"{family}_hf")
    model = nestlm.from_hf(root / f"{family}_hf")
    choices = NH_CHOICES if family == "nemotron_h" else CHOICES
    ecfg = ElasticConfig(budgets=[1.0, 0.8, 0.5], choices=choices)
    torch.manual_seed(0)
    router = Router(model.cfg, ecfg)
    out = export(model, router, ecfg, root / family)
    man = manifest_for(model, router, ecfg)
    for name, sub in BUDGETS[family].items():
        man["budgets"][name].update(sub=sub.to_dict(), params=nestlm.count_params(model.cfg, sub),
                                    active_params=nestlm.count_active_params(model.cfg, sub))
    (out / MANIFEST).write_text(json.dumps(man, indent=2))
    ByteTokenizer().save(out)
    return out


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    cache = {}

    def get(family):
        if family not in cache:
            d = make_elastic(root, family)
            cache[family] = (d, nestlm.from_hf(d))
        return cache[family]

    return get


def ids_(b=2, t=13, seed=0):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def read_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("model*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def header_bytes(d: Path) -> int:
    """Bytes of the safetensors headers (8-byte length + JSON) in folder d."""
    return sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in d.glob("model*.safetensors"))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- exactness
CASES = [(fam, name) for fam, subs in SUBS.items() for name in subs]


@pytest.mark.parametrize("family, name", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_streamed_slice_equals_in_memory_and_runs_in_transformers(elastic, family, name, tmp_path):
    from transformers import AutoModelForCausalLM

    src, model = elastic(family)
    sub = SUBS[family][name]
    out = slice_(src, sub, tmp_path / "out")
    want_cfg, want = hf_tensors(model, sub)
    got = read_dir(out)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    got_cfg = json.loads((out / "config.json").read_text())
    assert got_cfg == json.loads(json.dumps(want_cfg))
    assert (out / "tokenizer.json").is_file() and (out / "nestlm_tokenizer.json").is_file()
    assert not (out / "router.safetensors").exists() and not (out / MANIFEST).exists()
    assert json.loads((out / "nestlm_slice.json").read_text())["sub"] == sub.resolve(model.cfg).to_dict()

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = ids_()
    with torch.no_grad():
        assert_close(hf(ids).logits, model(ids, sub=sub), **TOL)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("family", ["nemotron_h", "llama"])
def test_budgets_by_name_fraction_and_interpolation(elastic, family, tmp_path):
    src, model = elastic(family)
    man = json.loads((src / MANIFEST).read_text())
    ref = read_dir(slice_(src, BUDGETS[family]["80%"], tmp_path / "explicit"))
    for i, b in enumerate(["80%", 0.8, "0.8"]):
        d = read_dir(slice_(src, b, tmp_path / f"b{i}"))
        assert d.keys() == ref.keys() and all(torch.equal(d[k], ref[k]) for k in ref)
    full = read_dir(slice_(src, 1.0, tmp_path / "full"))
    assert full.keys() == read_dir(src).keys() - {"router.weight"}  # the parent itself
    # between trained budgets: the router's interpolation
    router = Router(model.cfg, ElasticConfig.from_dict(man["elastic"]))
    from safetensors.torch import load_file
    router.load_state_dict(load_file(str(src / "router.safetensors")))
    sub = router.interpolate(0.65, router.ecfg.landing_tolerance)  # what slice uses for fractions
    d = read_dir(slice_(src, 0.65, tmp_path / "interp"))
    want = hf_tensors(model, sub)[1]
    assert d.keys() == want.keys() and all(torch.equal(d[k], want[k]) for k in want)
    assert "interpolated" in json.loads((tmp_path / "interp" / "nestlm_slice.json").read_text())["budget"]


def test_sharded_output_and_bounded_memory(elastic, tmp_path, monkeypatch):
    """Small shards: several files + an index. Memory: an independent count of the source bytes mapped at
    once (every memory map the writer opens is tracked until closed) never exceeds the largest source
    tensor, and the bytes copied from the source
    (kernel copies + gathers) equal the bytes written (only the kept prefixes are copied)."""
    import mmap
    import os

    from transformers import AutoModelForCausalLM

    src, model = elastic("nemotron_h")
    sub = SUBS["nemotron_h"]["width+depth"]
    alive, track = [0], {"peak": 0, "copied": 0}

    class Tracked(mmap.mmap):
        def __init__(self, *a, **k):
            alive[0] += len(self)
            track["peak"] = max(track["peak"], alive[0])

        def close(self):
            if not self.closed:
                alive[0] -= len(self)
            super().close()

    cfr, gather = os.copy_file_range, nestlm.slicing.write._runs

    def copy_file_range(*a):
        n = cfr(*a)
        track["copied"] += n
        return n

    def runs(*a):
        x = gather(*a)
        track["copied"] += int(x[..., 1].sum())
        return x

    monkeypatch.setattr(nestlm.slicing.write.mmap, "mmap", Tracked)
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    monkeypatch.setattr(nestlm.slicing.write, "_runs", runs)
    stats = {}
    out = slice_(src, sub, tmp_path / "out", max_shard_bytes=4096, stats=stats)
    monkeypatch.undo()
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    want = hf_tensors(model, sub)[1]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    got = read_dir(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    largest = max(t.numel() * t.element_size() for t in want.values())
    parent = sum(f.stat().st_size for f in src.glob("model*.safetensors"))
    largest_src = max(t.numel() * t.element_size() for t in read_dir(src).values())
    assert track["peak"] > 0 and alive[0] == 0  # every map closed
    assert stats["peak_bytes"] <= track["peak"] <= largest_src + mmap.ALLOCATIONGRANULARITY and largest < parent / 4
    assert track["copied"] == stats["bytes_written"] == index["metadata"]["total_size"]
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert_close(hf(ids_()).logits, model(ids_(), sub=sub), **TOL)


# ---------------------------------------------------------------------------------------------- errors
def test_errors_are_clear_and_leave_nothing(elastic, tmp_path, monkeypatch):
    src, _ = elastic("nemotron_h")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        slice_(src, "80%", out)
    slice_(src, "80%", out, overwrite=True)
    assert (out / "model.safetensors").is_file()
    with pytest.raises(BudgetError, match=r"no budget 'tiny'.*\['full', '80%', '50%'\]"):
        slice_(src, "tiny", tmp_path / "a")
    with pytest.raises(BudgetError, match=r"outside the trained range.*\['full', '80%', '50%'\]"):
        slice_(src, 0.3, tmp_path / "a")
    with pytest.raises(ConfigError, match="hidden=64 is outside"):
        slice_(src, SubArch(hidden=64), tmp_path / "a")
    with pytest.raises(TypeError, match="budget must be"):
        slice_(src, [0.5], tmp_path / "a")

    # a failure while writing: no output folder, no temporary folder
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(nestlm.slicing.write, "_write_shard", boom)
    with pytest.raises(OSError, match="disk full"):
        slice_(src, "80%", tmp_path / "a")
    with pytest.raises(OSError, match="disk full"):  # overwrite: the old folder survives a failed rewrite
        slice_(src, "50%", out, overwrite=True)
    monkeypatch.undo()
    assert not (tmp_path / "a").exists() and leftovers(tmp_path) == []
    assert read_dir(out).keys() == read_dir(slice_(src, "80%", tmp_path / "b")).keys()


def copy_of(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints_are_rejected(elastic, tmp_path):
    from safetensors.torch import load_file, save_file

    src, _ = elastic("nemotron_h")
    # truncated weights
    d = copy_of(src, tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="trunc/model.safetensors: (truncated|not a readable)"):
        slice_(d, "80%", tmp_path / "o1")
    # corrupt header
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        slice_(d, "80%", tmp_path / "o1")
    # weights that don't match config.json
    d = copy_of(src, tmp_path / "missing")
    sd = load_file(str(d / "model.safetensors"))
    del sd["backbone.layers.1.mixer.experts.3.up_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*experts.3.up_proj"):
        slice_(d, "80%", tmp_path / "o1")
    d = copy_of(src, tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 40}))
    with pytest.raises(CheckpointError, match="layers.3.mixer.up_proj.weight has shape"):
        slice_(d, SubArch(), tmp_path / "o1")
    # a manifest from another model
    d = copy_of(src, tmp_path / "manifest")
    man = json.loads((d / MANIFEST).read_text())
    man["budgets"]["80%"]["params"] += 1
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="budget '80%' lists .* parameters"):
        slice_(d, "80%", tmp_path / "o1")
    man["budgets"]["80%"]["sub"]["hidden"] = 48
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="budget '80%' doesn't fit"):
        slice_(d, "80%", tmp_path / "o1")
    (d / MANIFEST).write_text(json.dumps(json.loads((src / MANIFEST).read_text()) | {"family": "llama"}))
    with pytest.raises(CheckpointError, match="family 'llama' but the weights are 'nemotron_h'"):
        slice_(d, "80%", tmp_path / "o1")
    # not elastic: fractions need a manifest
    with pytest.raises(BudgetError, match="not an elastic checkpoint"):
        slice_(src.parent / "nemotron_h_hf", 0.8, tmp_path / "o1")
    assert not (tmp_path / "o1").exists() and leftovers(tmp_path) == []


def test_llama_depth_must_drop_whole_layers(elastic, tmp_path):
    src, _ = elastic("llama")
    with pytest.raises(UnsupportedArchitecture, match="drop whole layers"):
        slice_(src, SubArch(layers=(0, 1, 2, 4, 5)), tmp_path / "o")
    with pytest.raises(UnsupportedArchitecture, match="not a multiple of the number of attention heads"):
        slice_(src, SubArch(hidden=18), tmp_path / "o")  # 4 heads
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- info
@pytest.mark.parametrize("family", ["nemotron_h", "qwen3"])
def test_info_storage_matches_real_folders(elastic, family, tmp_path):
    src, model = elastic(family)
    d = info(src)
    assert d["family"] == family and d["elastic"] and [r["name"] for r in d["budgets"]] == ["full", "80%", "50%"]
    assert d["params"] == nestlm.count_params(model.cfg)
    weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))  # model + router
    assert d["storage"]["elastic_bytes"] == weights
    actual, headers = 0, 0
    for r in d["budgets"]:
        sub = SubArch.from_dict(BUDGETS[family][r["name"]].to_dict()) if r["name"] != "full" else SubArch()
        assert r["params"] == nestlm.count_params(model.cfg, sub)
        assert r["active_params"] == nestlm.count_active_params(model.cfg, sub)
        out = slice_(src, r["name"], tmp_path / r["name"].replace("%", ""))
        size = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
        assert size - header_bytes(out) == r["bytes"]  # the computed figure is exact, headers aside
        actual += size
        headers += header_bytes(out)
        assert info(out)["sliced_from"]["budget"] == r["name"]
    assert actual - d["storage"]["separate_bytes"] == headers  # safetensors headers: all that isn't counted
    assert d["storage"]["separate_bytes"] > d["storage"]["elastic_bytes"]
    text = format_info(d)
    assert "80%" in text and "separate checkpoints" in text and "computed" in text
    assert "(full)" in text and "layers=" in text


def test_info_of_a_plain_folder(elastic):
    src, model = elastic("llama")
    d = info(src.parent / "llama_hf")
    assert not d["elastic"] and [r["name"] for r in d["budgets"]] == ["full"]
    assert d["budgets"][0]["bytes"] == nestlm.count_params(model.cfg) * 4
    assert "safetensors on disk" in format_info(d)


# ---------------------------------------------------------------------------------------------- evaluate
def test_evaluate_parent_and_budgets_match_sliced_checkpoints(elastic, tmp_path):
    from nestlm.data import perplexity
    from nestlm.evaluate import default_text

    src, model = elastic("nemotron_h")
    rows = evaluate(src, seq_len=32, max_windows=4)
    assert [r["name"] for r in rows] == ["parent", "80%", "50%"]
    ids = ByteTokenizer().encode_tensor(default_text()[:200])
    assert default_text().startswith("THE GOSPEL ACCORDING TO ST. MATTHEW")
    assert rows[0]["ppl"] == pytest.approx(perplexity(model, ids, 32, max_windows=4), rel=1e-6)
    assert all(r["tokens"] == 128 and math.isfinite(r["ppl"]) for r in rows)
    for r in rows[1:]:  # the elastic model at a budget == the sliced checkpoint run on its own
        out = slice_(src, r["name"], tmp_path / r["name"].replace("%", ""))
        assert evaluate(out, seq_len=32, max_windows=4)[0]["ppl"] == pytest.approx(r["ppl"], rel=1e-4)
    table = format_table(rows)
    assert "| parent |" in table and "| 50% |" in table

    txt = tmp_path / "t.txt"
    txt.write_text("In the beginning was the Word. " * 40)
    rows = evaluate(src, txt, seq_len=16, max_windows=None, budgets=["50%", 0.65])
    assert [r["name"] for r in rows] == ["parent", "50%", "65% (interpolated)"]
    assert rows[0]["tokens"] == (len(txt.read_text()) - 1) // 16 * 16


# ---------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_smollm2_width_and_depth_slice(tmp_path):
    from nestlm.data.pretrained import has_smollm2, smollm2_135m_dir

    if not has_smollm2():
        pytest.skip("SmolLM2-135M not installed")
    from transformers import AutoModelForCausalLM

    src = smollm2_135m_dir()
    model = nestlm.from_hf(src)
    keep = tuple(i for j in range(30) if j not in (5, 11, 17, 23) for i in (2 * j, 2 * j + 1))
    sub = SubArch(hidden=432, attn_heads_per_group=2, ffn=1024, layers=keep)  # 6 heads: 432 % 6 == 0
    stats = {}
    out = slice_(src, sub, tmp_path / "smol", stats=stats)
    want = hf_tensors(model, sub)[1]
    got = read_dir(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    parent = (src / "model.safetensors").stat().st_size
    largest = max(t.numel() * t.element_size() for t in want.values())  # the sliced embedding, 85 MB
    assert stats["peak_bytes"] <= largest < parent / 4
    assert (out / "tokenizer.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(hf(ids).logits, model(ids, sub=sub), atol=2e-4, rtol=1e-4)
