"""Bad input gives one clear error: the right exception type, a message naming the culprit, no chained
traceback from deep inside a library; and writes are atomic (nothing half-written is ever left behind)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import randomize_, snapshot
from torch.testing import assert_close

import nestlm
import nestlm.io.safetensors as nio
from nestlm import ConfigError, ModelConfig
from nestlm.convert import hf_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "vocab_size": 64,
    "hidden_size": 16,
    "pattern": "ME*-",
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 4,
    "intermediate_size": 24,
    "mamba_heads": 4,
    "mamba_head_dim": 4,
    "mamba_groups": 2,
    "ssm_state": 4,
    "chunk_size": 4,
    "n_experts": 4,
    "top_k": 2,
    "moe_intermediate_size": 8,
    "shared_intermediate_size": 8,
    "dt_min": 1e-3,
}


def single_error(excinfo) -> str:
    """The exception stands alone (raised `from None` or directly), and its message."""
    e = excinfo.value
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), repr(e.__context__)
    return str(e)


@pytest.fixture(scope="module")
def model():
    return randomize_(nestlm.Decoder(ModelConfig(**TINY)), seed=0).eval()


@pytest.fixture(scope="module")
def good(model, tmp_path_factory):
    """A valid nemotron_h checkpoint folder (never modified: tests copy it)."""
    return nestlm.to_hf(model, tmp_path_factory.mktemp("good") / "ckpt")


@pytest.fixture
def ckpt(good, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(good, d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_good_checkpoint_loads(ckpt, model):
    """The control for every damaged copy below."""
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(nestlm.from_hf(ckpt)(ids), model(ids), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ configs
def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768})
    )
    with pytest.raises(nestlm.UnsupportedArchitecture) as ei:
        nestlm.from_hf(tmp_path)
    assert "gpt2" in single_error(ei)


@pytest.mark.parametrize(
    ("over", "msg"),
    [
        ({"num_heads": 6, "num_kv_heads": 4}, r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"),
        (
            {"mamba_heads": 6, "mamba_groups": 4},
            r"mamba_heads \(6\) must be a multiple of mamba_groups \(4\)",
        ),
        ({"top_k": 5}, r"top_k \(5\) must be in 1..n_experts \(4\)"),
        ({"n_expert_groups": 3}, r"n_experts \(4\) must be a multiple of n_expert_groups \(3\)"),
        ({"pattern": "M*X"}, "unknown block characters"),
        ({"pattern": ""}, "pattern is empty"),
        ({"intermediate_size": 0}, "intermediate_size"),
        ({"mlp_act": "gelu"}, "mlp_act"),
    ],
)
def test_model_config_widths_that_dont_fit(over, msg):
    with pytest.raises(ConfigError, match=msg) as ei:
        ModelConfig(**TINY | over)
    single_error(ei)


def test_hf_config_with_indivisible_heads(ckpt):
    edit_config(ckpt, num_attention_heads=3)  # 3 query heads over 2 KV heads
    with pytest.raises(ConfigError, match=r"num_heads \(3\) must be a multiple of num_kv_heads \(2\)") as ei:
        nestlm.from_hf(ckpt)
    single_error(ei)


def test_hf_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(nestlm.CheckpointError, match="config.json") as ei:
        nestlm.from_hf(ckpt)
    assert "not valid JSON" in single_error(ei)


def test_hf_config_missing_key(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["vocab_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(nestlm.CheckpointError, match="vocab_size") as ei:
        nestlm.from_hf(ckpt)
    single_error(ei)


# ------------------------------------------------------------------------------------------ weights
def test_config_only(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(nestlm.CheckpointError, match="safetensors") as ei:
        nestlm.from_hf(ckpt)
    assert str(ckpt) in single_error(ei)


@pytest.mark.parametrize("keep", ["half", "header"])
def test_truncated_safetensors(ckpt, keep):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if keep == "half" else data[:20])
    with pytest.raises(nestlm.CheckpointError) as ei:
        nestlm.from_hf(ckpt)
    assert str(f) in single_error(ei)


def test_garbage_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(nestlm.CheckpointError) as ei:
        nestlm.from_hf(ckpt)
    assert str(f) in single_error(ei)


@pytest.fixture
def sharded(model, tmp_path):
    """The same model written in several shards with an index."""
    hf, tensors = hf_tensors(model)
    out = nio.write_checkpoint(tmp_path / "sharded", hf, tensors, max_shard_bytes=4096)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    return out


def test_sharded_checkpoint_loads(sharded, model):
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(nestlm.from_hf(sharded)(ids), model(ids), atol=0, rtol=0)


def test_index_names_a_missing_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded / shard).unlink()
    with pytest.raises(nestlm.CheckpointError, match="missing") as ei:
        nestlm.from_hf(sharded)
    assert shard in single_error(ei)


def test_index_names_a_tensor_no_shard_has(sharded):
    path = sharded / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["backbone.layers.9.mixer.D"] = next(iter(index["weight_map"].values()))
    path.write_text(json.dumps(index))
    with pytest.raises(nestlm.CheckpointError) as ei:
        nestlm.from_hf(sharded)
    assert "backbone.layers.9.mixer.D" in single_error(ei)


def test_shapes_dont_match_config(ckpt):
    edit_config(ckpt, hidden_size=24)
    with pytest.raises(nestlm.CheckpointError, match="config.json") as ei:
        nestlm.from_hf(ckpt)
    msg = single_error(ei)
    assert "embeddings.weight" in msg and "(64, 16)" in msg and "(64, 24)" in msg


def test_tensor_missing_from_the_file(ckpt):
    from safetensors.torch import load_file, save_file

    sd = load_file(ckpt / "model.safetensors")
    del sd["backbone.layers.0.mixer.dt_bias"]
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(nestlm.CheckpointError) as ei:
        nestlm.from_hf(ckpt)
    assert "layers.0.mixer.dt_bias" in single_error(ei)


@pytest.mark.parametrize("what", ["file", "nothing"])
def test_not_a_directory(ckpt, what):
    path = ckpt / "config.json" if what == "file" else ckpt / "no_such_dir"
    with pytest.raises(nestlm.CheckpointError, match="not a directory" if what == "file" else "no such folder") as ei:
        nestlm.from_hf(path)
    assert str(path) in single_error(ei)


# ------------------------------------------------------------------------------------------ writing
def test_to_hf_into_existing_directory(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="out") as ei:
        nestlm.to_hf(model, out)
    single_error(ei)
    assert snapshot(tmp_path) == before


def test_to_hf_overwrite_replaces(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier checkpoint: replaced whole, its stale shard too
    (out / "model-00002-of-00002.safetensors").write_text("old")
    nestlm.to_hf(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_nothing_behind(model, tmp_path, monkeypatch, existing):
    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nio, "save_file", broken_save_file)
    out = tmp_path / "out"
    if existing:  # overwrite=True must not destroy the old checkpoint before the new one is complete
        out.mkdir()
        (out / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        nestlm.to_hf(model, out, overwrite=existing)
    assert snapshot(tmp_path) == before  # no partial out dir, no temporary sibling
    assert out.exists() == existing
