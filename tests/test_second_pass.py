"""Issue 27, a new user's second pass, item by item: --overwrite replaces only what nestlm wrote (the user's
files hashed before and after), one line instead of a traceback on bad inputs, --threads on every computing
command, the shipped demo YAML, one size unit, and the think display. Runs the CLI in this process
(cli_world.run) on the folders of cli_world.make_world."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from cli_world import run, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(cli_world):
    return cli_world


def hashes(root: Path) -> dict:
    """Every file under root -> sha256 of its bytes."""
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def one_line_error(argv: list, *words: str) -> str:
    code, out, err = run(argv)
    assert code == 2, (argv, out, err)
    assert err.startswith("nestlm") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


# ------------------------------------------------------------------------------------ 1. --overwrite
@pytest.mark.parametrize("command", ["slice", "convert", "quantize"])
def test_overwrite_refuses_a_folder_of_the_users_own_files(world, tmp_path, command):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes, not a checkpoint\n")
    (mine / "data").mkdir()
    (mine / "data" / "table.csv").write_text("a,b\n1,2\n")
    before = hashes(tmp_path)
    argv = {"slice": ["slice", world["elastic"], "--budget", "60%", "-o", mine, "--overwrite"],
            "convert": ["convert", world["hf"], mine, "--overwrite"],
            "quantize": ["quantize", world["slice"], "-o", mine, "--calib-tokens", "0", "--overwrite"]}[command]
    one_line_error(argv, "is not a checkpoint folder", "notes.txt", "data/")
    assert hashes(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("command", ["slice", "convert"])
def test_overwrite_keeps_a_users_file_beside_a_checkpoint_and_replaces_a_clean_one(world, tmp_path, command):
    argv = {"slice": ["slice", world["elastic"], "--budget", "60%", "-o"],
            "convert": ["convert", world["hf"]]}[command]
    out = tmp_path / "out"
    assert run([*argv, out])[0] == 0
    (out / "notes.txt").write_text("mine")
    before = hashes(tmp_path)
    one_line_error([*argv, out, "--overwrite"], "nestlm did not write", "notes.txt")
    assert hashes(tmp_path) == before
    (out / "notes.txt").unlink()
    code, _, err = run([*argv, out, "--overwrite"])  # nestlm's own output: replaced
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_demo_and_elastify_use_the_same_rule(world, tmp_path):
    from nestlm.demo import clear_demo_dir
    from nestlm.elastic.train import check_out_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for check, what in ((clear_demo_dir, "a demo output"), (check_out_dir, "an elastify output to resume")):
        with pytest.raises(FileExistsError, match=f"is not empty and is not {what} \\(it holds notes.txt\\)"):
            check(mine)
    assert (mine / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------ 2. one line, not a traceback
def test_importance_onto_an_existing_folder_is_one_line_before_scoring_and_leaves_nothing(world, tmp_path):
    d = tmp_path / "scores"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    one_line_error(["importance", world["hf"], "--text", world["text"], "--out", d, "--overwrite", "--seq-len", "16",
                    "--batches", "1", "--batch-size", "2"], "is a folder")
    assert snapshot(tmp_path) == before  # no scores.tmp beside it


def test_scores_save_leaves_no_temporary_file_when_it_fails(tmp_path):
    import torch

    from nestlm.elastic.importance import Scores

    (tmp_path / "s").mkdir()
    with pytest.raises(OSError):
        Scores({"layers": torch.ones(2)}, {}).save(tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


@pytest.mark.parametrize("command", ["elastify", "plan"])
def test_a_binary_config_file_is_one_line(world, tmp_path, command):
    binary = tmp_path / "config.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    argv = {"elastify": ["elastify", binary, "--model", world["hf"], "--text", world["text"], "--out", tmp_path / "e"],
            "plan": ["plan", binary, "--model", world["hf"]]}[command]
    one_line_error(argv, "config.yaml is not a YAML text file")
    assert not (tmp_path / "e").exists()


def test_a_binary_lm_eval_file_is_one_line_before_any_work(world, tmp_path, monkeypatch):
    import nestlm.evaluate
    import nestlm.load

    monkeypatch.setattr(nestlm.evaluate, "has_lm_eval", lambda: True)  # the check comes first, lm-eval or not

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the items file was checked")

    monkeypatch.setattr(nestlm.load, "from_hf", no_work)
    items = tmp_path / "items.jsonl"
    items.write_bytes(b"\xff\xfe\x00binary" * 100)
    one_line_error(["eval", world["hf"], "--text", world["text"], "--seq-len", "16", "--max-windows", "1",
                    "--lm-eval", items], "items.jsonl: not UTF-8 text")


@pytest.mark.parametrize("command", ["generate", "think_budget", "think"])
def test_a_prompt_that_is_not_utf8_is_one_line(world, command):
    bad = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")  # what Python makes of such bytes in argv
    argv = {"generate": ["generate", world["slice"], "--prompt", bad, "--max-new-tokens", "2"],
            "think_budget": ["generate", world["elastic"], "--prompt", bad, "--think-budget", "60%"],
            "think": ["think", "--think-url", "http://127.0.0.1:9/v1", "--think-model", "s", "--answer-url",
                      "http://127.0.0.1:9/v1", "--answer-model", "l", "--prompt", bad]}[command]
    one_line_error(argv, "--prompt is not valid UTF-8")


def test_tokenizer_encode_refuses_text_no_encoding_has(world):
    import nestlm
    from nestlm.io.tokenizer import load_tokenizer

    tok = load_tokenizer(world["slice"], 259)
    with pytest.raises(nestlm.ConfigError, match="not valid UTF-8"):
        tok.encode("a\udcffb")


@pytest.mark.parametrize("argv", [["info"], ["info", "--sub", "hidden=32"], ["eval", "--max-windows", "1"],
                                  ["slice", "--sub", "hidden=32", "-o", "OUT"], ["convert", "OUT"]])
def test_a_config_value_of_the_wrong_type_is_one_line(world, tmp_path, argv):
    bad = tmp_path / "bad"
    shutil.copytree(world["hf"], bad)
    hf = json.loads((bad / "config.json").read_text())
    hf["hidden_size"] = "abc"
    (bad / "config.json").write_text(json.dumps(hf))
    argv = [argv[0], bad, *[tmp_path / "o" if a == "OUT" else a for a in argv[1:]]]
    if argv[0] == "eval":
        argv += ["--text", world["text"], "--seq-len", "16"]
    one_line_error(argv, "hidden_size must be an integer, got 'abc'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_model_config_checks_every_fields_type():
    from conftest import tiny_hybrid_config

    import nestlm

    d = tiny_hybrid_config().to_dict()
    for key, value in (("hidden_size", "abc"), ("num_heads", 2.5), ("tie_embeddings", "yes"), ("norm_eps", True),
                       ("pattern", 3), ("rope_theta", "big")):
        with pytest.raises(nestlm.ConfigError, match=f"^{key} must be"):
            nestlm.ModelConfig(**{**d, key: value})
    assert nestlm.ModelConfig(**{**d, "rope_theta": None, "norm_eps": 1}).norm_eps == 1  # an int is a number


# ------------------------------------------------------------------------------------ 3. --threads
class Recorded(Exception):
    """Raised by a stand-in for a command's work: carries torch's thread count at that moment."""


@pytest.mark.parametrize("command", ["eval", "generate", "importance", "elastify", "quantize", "demo"])
@pytest.mark.parametrize("threads", [None, 3])
def test_every_computing_command_runs_under_the_one_thread_rule(world, tmp_path, monkeypatch, command, threads):
    import torch

    import nestlm
    import nestlm.demo
    import nestlm.device
    import nestlm.elastic.train
    import nestlm.evaluate
    import nestlm.load
    import nestlm.quantize

    def record(*a, **k):
        raise Recorded(torch.get_num_threads())

    where = {"eval": (nestlm.evaluate, "evaluate"), "generate": (nestlm.load, "from_hf"),
             "importance": (nestlm.load, "open_folder"), "elastify": (nestlm.elastic.train, "elastify"),
             "quantize": (nestlm.quantize, "quantize"), "demo": (nestlm.demo, "_demo")}[command]
    monkeypatch.setattr(*where, record)
    monkeypatch.setattr(nestlm.device, "default_threads", lambda: 2)  # what the machine's load would give
    hf, text = world["hf"], world["text"]
    argv = {"eval": ["eval", hf, "--text", text], "generate": ["generate", hf, "--prompt", "In the"],
            "importance": ["importance", hf, "--text", text, "--out", tmp_path / "s.safetensors"],
            "elastify": ["elastify", world["yaml"], "--model", hf, "--text", text, "--out", tmp_path / "e"],
            "quantize": ["quantize", hf, "-o", tmp_path / "q"], "demo": ["demo", "--out", tmp_path / "d"]}[command]
    try:
        with pytest.raises(Recorded) as got:
            run(argv + ([] if threads is None else ["--threads", threads]))
        assert torch.get_num_threads() == 1  # main restores the caller's count: in-process runs don't leak it
    finally:
        torch.set_num_threads(1)
    assert got.value.args[0] == (2 if threads is None else threads)


def test_default_threads_counts_the_cores_other_processes_leave_idle(monkeypatch):
    import os

    import torch

    import nestlm
    from nestlm.device import default_threads, set_threads, torch_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for load, want in ((0.0, 4), (0.4, 4), (1.6, 2), (3.5, 1), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert default_threads() == want, load
    try:
        assert set_threads(3) == 3 and torch.get_num_threads() == 3
        with torch_threads(2) as n:
            assert n == 2 and torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3
        for bad in (0, -1, 1.5, True):
            with pytest.raises(nestlm.ConfigError, match="--threads"):
                set_threads(bad)
    finally:
        torch.set_num_threads(1)


def test_threads_below_one_is_a_usage_error(world):
    one_line_error(["eval", world["hf"], "--threads", "0"], "--threads must be >= 1")
    one_line_error(["quantize", world["hf"], "-o", "unused", "--threads", "-2"], "--threads must be >= 1")


ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ 5. one size rule in info
@pytest.mark.parametrize("folder", ["hf", "slice", "packed"])
def test_info_and_info_sub_give_the_same_sizes_in_the_same_units(world, folder):
    import re

    from safetensors import safe_open

    path = world[folder]
    code, plain, err = run(["info", path, "--seq-len", "256"])
    assert code == 0, err
    code, table, err = run(["info", path, "--seq-len", "256", "--sub", "hidden=16"])
    assert code == 0, err
    source = next(ln for ln in table.splitlines() if ln.startswith("| source"))
    weights, memory = re.findall(r"([\d.]+ [KMG]?B)", source)[:2]
    line = next(ln for ln in plain.splitlines() if ln.startswith("memory @ 256 tokens"))
    assert line.split()[4:6] == memory.split() and f"weights {weights} (" in line, (line, source)
    assert "MiB" not in plain and "GiB" not in plain
    payload = 0  # the stored tensors' bytes, read from the files: the reference both must agree with
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            payload += sum(_nbytes(h, k) for k in h.keys())
    from nestlm.info import config_info

    assert config_info(path, 256)["memory"]["weights"] == payload


def _nbytes(h, k) -> int:
    import math

    from nestlm.io.safetensors import DTYPES

    sl = h.get_slice(k)
    return math.prod(sl.get_shape()) * DTYPES[sl.get_dtype()].itemsize


# ------------------------------------------------------------------------------------ 4. the shipped demo YAML
def test_the_demo_yaml_exports_what_it_trained_without_a_quality_warning():
    """Why the demo YAML warned "router choice ... check its quality": with sample_tolerance off, training samples
    each axis on its own and the per-axis argmax can miss the budget (by up to 4.9% over seeds in
    docs/results.md), so the manifest substitutes an architecture training may never have run. With
    sample_tolerance equal to landing_tolerance (the library's default, which the YAML now keeps), training
    samples only landing architectures and the exported one is what it trained: no warning, even when the
    router's per-axis argmax misses (here: an untrained router, whose argmax is the full width everywhere)."""
    import dataclasses
    import warnings

    import torch

    import nestlm
    from nestlm.demo import demo_config
    from nestlm.elastic.artifact import manifest_for
    from nestlm.elastic.router import Router

    yaml = nestlm.ElasticConfig.load(ROOT / "recipes" / "configs" / "demo_elastic.yaml")
    assert yaml.mode == "hard" and yaml.sample_tolerance == yaml.landing_tolerance is not None
    with torch.device("meta"):
        model = nestlm.Decoder(demo_config(259))
    for ecfg, warns in ((yaml, False), (dataclasses.replace(yaml, sample_tolerance=None), True)):
        router = Router(model.cfg, ecfg)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = manifest_for(model, router, ecfg)
        assert any("check its quality" in str(w.message) for w in caught) == warns
        for name, b in m["budgets"].items():
            assert abs(b["cost_ratio"] / b["fraction"] - 1) <= yaml.landing_tolerance, name


def test_the_demo_yaml_checkpoints_so_that_ctrl_c_at_step_91_can_resume(tmp_path):
    """recipes/configs/demo_elastic.yaml checkpoints often enough that Ctrl-C at step 91 leaves a checkpoint
    to resume from. Its own settings on the demo's architecture (random weights), with 2 x 16-token batches
    so the steps take seconds, one budget each (which budgets a step trains doesn't matter here)."""
    import dataclasses

    import torch
    from conftest import randomize_

    import nestlm
    from nestlm.demo import demo_config
    from nestlm.elastic.checkpoint import CKPT_FILE
    from nestlm.errors import Interrupted

    yaml = nestlm.ElasticConfig.load(ROOT / "recipes" / "configs" / "demo_elastic.yaml")
    assert yaml.checkpoint_every <= 91 < yaml.steps
    ecfg = dataclasses.replace(yaml, batch=2, seq_len=16, calib_batches=1, budgets_per_step=1)
    torch.manual_seed(0)
    parent = nestlm.to_hf(randomize_(nestlm.Decoder(demo_config(259)), seed=0), tmp_path / "parent")
    ids = torch.randint(0, 256, (20_000,), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "elastic"

    def ctrl_c_at_91(rec):
        if rec["step"] == 91:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match=r"the last checkpoint is .* \(step 50\)"):
        nestlm.elastify(ecfg, parent, ids, out, on_step=ctrl_c_at_91, progress=False)
    assert (out / "train" / CKPT_FILE).is_file()
    steps = []
    nestlm.elastify(ecfg, parent, ids, out, on_step=lambda rec: steps.append(rec["step"]), progress=False,
                    max_steps=53)
    assert steps == [50, 51, 52]  # resumed from the step-50 checkpoint


# ------------------------------------------------------------------------------------ 7. nestlm think's display
def fake_servers(monkeypatch, think_chunks: list[str], finish: str, answer_chunks: list[str]) -> list[dict]:
    """Replace the HTTP layer of nestlm.inference.client: the thinking endpoint streams think_chunks and ends
    with `finish`, the answer endpoint streams answer_chunks; returns the request bodies as sent."""
    import nestlm.inference.client as client

    sent = []

    def events(ep, path, body, timeout):
        sent.append(body)
        chunks, why = (think_chunks, finish) if ep.model == "small" else (answer_chunks, "length")
        for c in chunks:
            yield {"choices": [{"text": c, "finish_reason": None}]}
        yield {"choices": [{"text": "", "finish_reason": why}], "usage": {"completion_tokens": len(chunks)}}

    monkeypatch.setattr(client, "_events", events)
    return sent


@pytest.mark.parametrize("think_chunks, finish, trace", [
    (["45", "</th", "in"], "length", "45"),           # the budget cut the model's own tag: '45</thin'
    (["4", "5<", "/thin"], "length", "45"),
    (["45", "</think>"], "stop", "45"),                 # a server that keeps the stop string in the text
    (["4\ufffd", "5", "\ufffd"], "length", "45"),       # characters the server cut in two
    (["45", "</th", "ere"], "length", "45</there"),    # not the tag after all: shown once it is known
])
def test_think_shows_the_prompt_and_exactly_the_trace_the_answer_model_reads(monkeypatch, capsys, think_chunks,
                                                                               finish, trace):
    prompt = "Q:07+38=?\n<think>"
    sent = fake_servers(monkeypatch, think_chunks, finish, ["A:", "45\ufffd", "\n"])
    code, out, err = run(["think", "--prompt", prompt, "--think-url", "http://x/v1", "--think-model", "small",
                          "--answer-url", "http://y/v1", "--answer-model", "large", "--max-think", "3"])
    assert code == 0, err
    assert sent[1]["prompt"] == prompt + trace + "</think>"  # what the answer model reads
    assert out == prompt + trace + "</think>" + "A:45\n\n"  # what the user sees: the same, then the answer
    assert "\ufffd" not in out


def test_held_text_never_shows_a_partial_tag_and_drops_replacement_characters():
    from nestlm.inference.detok import HeldText

    h = HeldText(["</think>"])
    assert [h.push(d) for d in ("ab<", "/th", "x\ufffd", "</", "think>")] == ["ab", "", "</thx", "", ""]
    assert h.rest("ab</thx") == ""
