"""Bad input to elastic training and to elastic checkpoints: each case raises the repo's error type with a
message naming the culprit, and leaves the file system exactly as it was (no output folder, no half-written
file, an existing run untouched). Plus: nothing is ever unpickled beyond plain data, and nothing runs a
model's remote code.

Cases: corrupt / truncated safetensors (parent, elastic model, router, training checkpoints), configs that
don't match the weights, budgets outside (0, 1] or out of order, choices that break GQA, Mamba-group, channel
alignment or NVFP4-block divisibility, empty or tiny calibration data, a tokenizer that doesn't match the
model, a resume under another config, and bad `parallel` options."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import randomize_, snapshot, tiny_hybrid_config

import nestlm
from nestlm import ConfigError, ElasticConfig
from nestlm.convert import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parents[1]


def parent(**over):
    return randomize_(nestlm.Decoder(tiny_hybrid_config(**over)), seed=0)


def stream(n=2000, hi=64):
    return torch.randint(0, hi, (n,), generator=torch.Generator().manual_seed(0))


def run_config(**over):
    kw = dict(budgets=[1.0, 0.75], choices={"hidden": [1.0, 0.75, 0.5], "ffn": [1.0, 0.5]}, steps=4, batch=2,
              seq_len=16, router_hidden=16, calib_batches=1, checkpoint_every=2, seed=0)
    kw.update(over)
    return ElasticConfig(**kw)


def fails_cleanly(root: Path, exc, fn) -> str:
    """Run fn, expect `exc`; the tree under `root` must be byte for byte what it was. -> the message."""
    before = snapshot(root)
    with pytest.raises(exc) as ei:
        fn()
    assert snapshot(root) == before, "something was written"
    return str(ei.value)


def train(tmp_path, model=None, data=None, config=None, **kw):
    """elastify into tmp_path/out (a fresh folder unless a test made it)."""
    return lambda: nestlm.elastify(config if config is not None else run_config(),
                                   model if model is not None else parent(),
                                   data if data is not None else stream(), tmp_path / "out", progress=False, **kw)


# ---------------------------------------------------------------------------------------------- the parent model
@pytest.fixture(scope="module")
def hf_parent(tmp_path_factory):
    return nestlm.to_hf(parent(), tmp_path_factory.mktemp("hf") / "parent")


@pytest.fixture
def hf_copy(hf_parent, tmp_path):
    return Path(shutil.copytree(hf_parent, tmp_path / "parent"))


def test_the_intact_parent_trains(hf_copy, tmp_path):
    """The control for the damaged copies below."""
    nestlm.elastify(run_config(steps=1), hf_copy, stream(), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "nestlm_elastic.json").is_file()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header only"])
def test_corrupt_parent_safetensors(hf_copy, tmp_path, damage):
    f = hf_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"garbage": bytes(range(256)) * 4, "truncated": data[: len(data) // 2],
                   "header only": data[:12]}[damage])
    msg = fails_cleanly(tmp_path, CheckpointError, train(tmp_path, model=hf_copy))
    assert str(f) in msg and not (tmp_path / "out").exists()


def test_parent_config_that_does_not_match_its_weights(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["hidden_size"] = 48
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    msg = fails_cleanly(tmp_path, CheckpointError, train(tmp_path, model=hf_copy))
    assert "config.json" in msg and "(64, 32)" in msg and "(64, 48)" in msg


# ---------------------------------------------------------------------------------------------- the elastic config
@pytest.mark.parametrize("budgets, match", [
    ("[1.0, 1.5]", r"budgets must be in \(0, 1\], got \[1.0, 1.5\]"),
    ("[1.0, 0.0]", r"budgets must be in \(0, 1\]"),
    ("[1.0, -0.5]", r"budgets must be in \(0, 1\]"),
    ("[0.5, 1.0]", r"budgets must be strictly decreasing, got \[0.5, 1.0\]"),
    ("[1.0, 0.5, 0.5]", r"budgets must be strictly decreasing"),
    ("[]", r"budgets must be a non-empty list"),
])
def test_budgets_outside_0_1_or_not_ordered(tmp_path, budgets, match):
    yaml = tmp_path / "elastic.yaml"
    yaml.write_text(f"budgets: {budgets}\nsteps: 2\n")
    msg = fails_cleanly(tmp_path, ConfigError, train(tmp_path, config=yaml))
    assert re.search(match, msg), msg


@pytest.mark.parametrize("choices, match", [
    # GQA: 4 query heads over 2 KV groups = 2 per group; a choice must keep whole heads in every group
    ({"attn_heads_per_group": [1.0, 0.75]}, r"choices\['attn_heads_per_group'\] value 0.75 gives 1.5 of 2: not a "
                                            r"whole number"),
    ({"attn_heads_per_group": [3, 1]}, r"choices\['attn_heads_per_group'\] value 3 gives width 3, outside 1..2"),
    # Mamba: 8 heads in 2 groups = 4 per group
    ({"mamba_heads_per_group": [1.0, 0.3]}, r"choices\['mamba_heads_per_group'\] value 0.3 gives 1.2 of 4: not a "
                                            r"whole number"),
    ({"hidden": [1.0, 0.875]}, r"choices\['hidden'\] value 0.875 gives 28 channels \(of 32\): not a multiple of "
                               r"align=8"),
    ({"experts": [1.0, 0.25]}, r"choices\['experts'\] value 0.25 keeps 1 experts, fewer than top_k=2"),
])
def test_choices_that_break_divisibility(tmp_path, choices, match):
    msg = fails_cleanly(tmp_path, ConfigError, train(tmp_path, config=run_config(choices=choices)))
    assert re.search(match, msg), msg


def test_elastic_axes_the_model_does_not_have(tmp_path):
    ecfg = run_config(axes=["experts"], choices={"experts": [1.0, 0.5]})
    msg = fails_cleanly(tmp_path, ConfigError, train(tmp_path, model=parent(pattern="M*-"), config=ecfg))
    assert "axes ['experts'] are elastic but the model has no such width (pattern 'M*-')" in msg


def test_choices_that_break_nvfp4_blocks(tmp_path):
    quant = pytest.importorskip("nestlm.quant")
    if not hasattr(quant, "check_elastic"):
        pytest.skip("nestlm.quant has no check_elastic yet")
    # every full width of this parent is whole NVFP4 blocks of 16; hidden 0.75 -> 24 channels is not
    model = parent(mamba_head_dim=8, shared_intermediate_size=32)
    ecfg = run_config(quant="nvfp4", choices={"hidden": [1.0, 0.75], "ffn": [1.0, 2 / 3]})
    msg = fails_cleanly(tmp_path, ConfigError, train(tmp_path, model=model, config=ecfg))
    assert "choices['hidden']" in msg and "24" in msg and "16" in msg, msg


# ---------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("data, exc, match", [
    (torch.tensor([], dtype=torch.long), ValueError, r"^data: 0 tokens are too few for one window of seq_len 16"),
    (stream(10), ValueError, r"^data: 10 tokens are too few for one window of seq_len 16 \(need at least 17\)$"),
    ([], ValueError, r"^data: the list of batches is empty$"),
    ([torch.zeros(2, 0, dtype=torch.long)], ValueError, r"^data\[0\]: expected a non-empty \[batch, seq_len\] tensor"),
    ([torch.zeros(0, 16, dtype=torch.long)], ValueError, r"^data\[0\]: expected a non-empty \[batch, seq_len\]"),
    (stream().float(), ValueError, r"^data: expected integer token ids, got torch.float32$"),
    (stream().view(-1, 16), ValueError, r"^data: a token tensor must be a 1-D stream of ids, got shape \(125, 16\)"),
    (lambda pos, b, t: torch.zeros(b, 0, dtype=torch.long), ValueError, r"^data\(0, 2, 16\): expected a non-empty"),
])
def test_empty_or_tiny_calibration_data(tmp_path, data, exc, match):
    msg = fails_cleanly(tmp_path, exc, train(tmp_path, data=data))
    assert re.search(match, msg), msg


def test_no_calibration_batches(tmp_path):
    msg = fails_cleanly(tmp_path, ConfigError, train(tmp_path, config=run_config(calib_batches=0)))
    assert msg == "ElasticConfig: calib_batches must be >= 1 to sort by importance, got 0"


def test_importance_without_batches():
    from nestlm.elastic.importance import importance

    with pytest.raises(ValueError, match="importance needs at least one calibration batch"):
        importance(parent(), [], progress=False)


@pytest.mark.parametrize("batch, exc, match", [
    (torch.zeros(0, 16, dtype=torch.long), ValueError, r"calibration batch 0: expected a non-empty \[batch, seq_len\]"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, r"calibration batch 0: expected a non-empty \[batch, seq_len\]"),
    (torch.zeros(2, 16), ValueError, r"calibration batch 0: expected .* token ids"),
    (torch.full((2, 16), 100), ConfigError, r"calibration batch 0: token id 100 is outside the model's vocabulary"),
])
def test_importance_rejects_empty_or_foreign_batches(batch, exc, match):
    from nestlm.elastic.importance import importance

    with pytest.raises(exc, match=match):
        importance(parent(), [batch], progress=False)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokens_from_another_tokenizer(tmp_path):
    """Ids past the model's vocabulary: text tokenized for another model."""
    msg = fails_cleanly(tmp_path, ConfigError, train(tmp_path, data=stream(hi=100)))
    assert msg.startswith("data: token id 99 is outside the model's vocabulary (vocab_size 64)"), msg
    msg = fails_cleanly(tmp_path, ConfigError, train(tmp_path, data=[torch.full((2, 16), -1)]))
    assert msg.startswith("data[0]: token id -1 is outside the model's vocabulary"), msg


@pytest.mark.parametrize("tokenizer", ["none", "bytes"])
def test_cli_tokenizer_that_does_not_match_the_model(hf_copy, tmp_path, capsys, tokenizer):
    """`nestlm elastify`: a folder without a tokenizer whose vocabulary isn't the byte tokenizer's, or with a
    tokenizer (259 byte ids) larger than the model's 64-token vocabulary."""
    from nestlm.cli import main
    from nestlm.data import ByteTokenizer

    if tokenizer == "bytes":
        ByteTokenizer().save(hf_copy)
    run_config().save(tmp_path / "elastic.yaml")
    (tmp_path / "text.txt").write_text("In the beginning God created the heaven and the earth. " * 40)
    args = ["elastify", str(tmp_path / "elastic.yaml"), "--model", str(hf_copy), "--text",
            str(tmp_path / "text.txt"), "--out", str(tmp_path / "out")]
    assert fails_cleanly(tmp_path, SystemExit, lambda: main(args)) == "2"  # the exit status of a user error
    err = capsys.readouterr().err
    want = "its vocabulary (64) is not the byte tokenizer's" if tokenizer == "none" else "vocab_size 64"
    assert err.startswith("nestlm: error: ") and want in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- resuming
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after 2 steps (checkpoint.pt written), to resume under bad conditions."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    nestlm.elastify(run_config(), parent(), stream(), out, progress=False, max_steps=2)
    return out


@pytest.fixture
def stopped(stopped_run, tmp_path):
    shutil.copytree(stopped_run, tmp_path / "out")
    return tmp_path / "out"


def test_resume_under_another_config(stopped, tmp_path):
    ecfg = run_config(lr_model=3e-4, choices={"hidden": [1.0, 0.5], "ffn": [1.0, 0.5]})
    msg = fails_cleanly(tmp_path, ConfigError, train(tmp_path, config=ecfg))
    assert msg == (f"{stopped / 'train' / 'checkpoint.pt'} was written with another ElasticConfig (it differs in "
                   "['choices', 'lr_model']); resume with the same config, or pass resume=False to start over")
    nestlm.elastify(run_config(steps=3), parent(), stream(), stopped, progress=False)  # `steps` may change


def test_resume_from_another_parent(stopped, tmp_path):
    other = randomize_(nestlm.Decoder(tiny_hybrid_config()), seed=1)
    msg = fails_cleanly(tmp_path, ConfigError, train(tmp_path, model=other))
    assert "was trained from another parent model" in msg


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_resume_from_a_corrupt_checkpoint(stopped, tmp_path, damage):
    f = stopped / "train" / "checkpoint.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 10)
    msg = fails_cleanly(tmp_path, CheckpointError, train(tmp_path))
    assert msg.startswith(f"{f}: unreadable training checkpoint (") and msg.endswith(
        "delete it or pass resume=False to start over"), msg


class Payload:
    """Unpickling this would create a file: proof that the loader ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_the_checkpoint_is_never_run(stopped, tmp_path):
    f = stopped / "train" / "checkpoint.pt"
    marker = tmp_path / "pwned"
    state = torch.load(f, weights_only=True)
    torch.save({**state, "extra": Payload(marker)}, f)
    msg = fails_cleanly(tmp_path, CheckpointError, train(tmp_path))
    assert msg == (f"{f}: unreadable training checkpoint (it holds a pickled object that is not plain data "
                   "(refused: loaded with weights_only=True)); delete it or pass resume=False to start over")
    assert not marker.exists()


def test_the_distributed_checkpoint_loader_never_runs_a_pickle(tmp_path):
    """DCP stores non-tensor values as pickles and its default planner loads them with weights_only=False;
    ours checks each with weights_only=True first."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from nestlm.elastic.checkpoint import _safe_load_planner

    marker = tmp_path / "pwned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP says it runs in one process
        dcp.save({"w": torch.ones(2), "obj": Payload(marker)}, checkpoint_id=str(tmp_path / "ck"))
        with pytest.raises(CheckpointException) as ei:
            dcp.load({"w": torch.zeros(2), "obj": None}, checkpoint_id=str(tmp_path / "ck"),
                     planner=_safe_load_planner())
        assert isinstance(ei.value.failures[0][0], pickle.UnpicklingError)
        assert not marker.exists()
        dcp.load({"w": torch.zeros(2), "obj": None}, checkpoint_id=str(tmp_path / "ck"))  # DCP's default: runs it
    assert marker.exists()


def test_resume_from_a_corrupt_distributed_checkpoint(tmp_path, one_rank_group):
    nestlm.elastify(run_config(), parent(), stream(), tmp_path / "out", progress=False, max_steps=2)
    shard = tmp_path / "out" / "train" / "checkpoint" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    msg = fails_cleanly(tmp_path, CheckpointError, train(tmp_path))
    assert msg == f"{shard.parent}: unreadable distributed checkpoint (rank 0: EOFError)", msg


# ---------------------------------------------------------------------------------------------- elastic checkpoints
@pytest.fixture(scope="module")
def elastic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic") / "out"
    nestlm.elastify(run_config(steps=1), parent(), stream(), out, progress=False)
    return out


@pytest.fixture
def elastic(elastic_dir, tmp_path):
    return Path(shutil.copytree(elastic_dir, tmp_path / "elastic"))


def test_the_intact_elastic_checkpoint_loads(elastic):
    nestlm.load_elastic(elastic)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_router_safetensors(elastic, tmp_path, damage):
    f = elastic / "router.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 40] if damage == "truncated" else b"\x00" * 64)
    msg = fails_cleanly(tmp_path, CheckpointError, lambda: nestlm.load_elastic(elastic))
    assert msg.startswith(str(f)), msg


def test_truncated_elastic_weights(elastic, tmp_path):
    f = elastic / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    msg = fails_cleanly(tmp_path, CheckpointError, lambda: nestlm.load_elastic(elastic))
    assert str(f) in msg and "truncated" in msg


def test_router_that_does_not_match_the_manifest(elastic, tmp_path):
    mf = elastic / "nestlm_elastic.json"
    manifest = json.loads(mf.read_text())
    manifest["elastic"]["router_hidden"] = 24
    mf.write_text(json.dumps(manifest))
    msg = fails_cleanly(tmp_path, CheckpointError, lambda: nestlm.load_elastic(elastic))
    assert "the router weights don't match the manifest's elastic config" in msg
    assert "w1: file (2, 16, 2), config (2, 24, 2)" in msg, msg


def test_manifest_that_is_not_json(elastic, tmp_path):
    (elastic / "nestlm_elastic.json").write_text("{budgets: ")
    msg = fails_cleanly(tmp_path, CheckpointError, lambda: nestlm.load_elastic(elastic))
    assert "nestlm_elastic.json: not valid JSON" in msg


# ---------------------------------------------------------------------------------------------- options
def test_bad_parallel_options(tmp_path, monkeypatch):
    msg = fails_cleanly(tmp_path, ConfigError, train(tmp_path, parallel="tp"))
    assert msg == "parallel must be one of ('ddp', 'fsdp2') (or None: automatic), got 'tp'"
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    msg = fails_cleanly(tmp_path, ConfigError, train(tmp_path, parallel="fsdp2"))
    assert msg.startswith("parallel='fsdp2' needs a torchrun launch")


def test_batches_that_do_not_split_over_the_processes():
    from nestlm.elastic.train import check_data

    with pytest.raises(ConfigError, match=r"^data\[1\]: 3 rows don't split over 2 processes$"):
        check_data([torch.zeros(2, 16, dtype=torch.long), torch.zeros(3, 16, dtype=torch.long)], run_config(),
                   64, world=2)


# ---------------------------------------------------------------------------------------------- no pickles, no remote code
def calls(tree, name: str):
    """Calls of `name` (e.g. torch.load, from_pretrained) in an AST."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == name.split(".")[-1]
                    and (len(name.split(".")) == 1 or (isinstance(f.value, ast.Name) and f.value.id == name.split(".")[0]))):
                yield node


def test_no_pickle_loading_and_no_remote_code():
    """Every torch.load passes weights_only=True; no pickle.load / np.load(allow_pickle=True); trust_remote_code
    is never set to True (transformers' default, False, applies unless a user passes it on)."""
    files = sorted([*(ROOT / "src" / "nestlm").rglob("*.py"), *(ROOT / "recipes").glob("*.py")])
    assert len(files) > 20
    loads = 0
    for f in files:
        tree = ast.parse(f.read_text())
        for node in calls(tree, "torch.load"):
            kw = {k.arg: k.value for k in node.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                f"{f}:{node.lineno}: torch.load without weights_only=True"
            loads += 1
        for name in ("pickle.load", "pickle.loads"):
            assert not list(calls(tree, name)), f"{f}: {name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg in ("trust_remote_code", "allow_pickle"):
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), \
                    f"{f}:{node.value.lineno}: {node.arg}=True"
    assert loads >= 2  # the scan sees the loads that exist (elastify's checkpoint, the DCP planner)
