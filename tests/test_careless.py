"""Issue 15, item by item: a careless user loses nothing, gets one-line errors that name flags, and readable
files. Every test runs the CLI (`nestlm.cli.main`, or a subprocess for Ctrl-C) on the folders of
cli_world.make_world and checks the message, that no input changed (bytes of every file before and after)
and that nothing half-written is left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from cli_world import run, snapshot

import nestlm
from nestlm.data import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(cli_world):
    return cli_world


@pytest.fixture
def own(world, tmp_path):
    """A private copy of the world, for tests that might damage it."""
    shutil.copytree(world["root"], tmp_path / "w")
    return {k: tmp_path / "w" / v.relative_to(world["root"]) for k, v in world.items()}


def refused(argv: list, root: Path, *words: str) -> str:
    """The command exits 2 with one line naming `words`, and the tree under root is byte for byte unchanged
    (no input touched, nothing half-written left)."""
    before = snapshot(root)
    code, out, err = run(argv)
    assert code == 2, (argv, out, err)
    assert err.startswith("nestlm") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert snapshot(root) == before, "something was written or changed"
    return err


# ------------------------------------------------------------------------------------ 1. output == input
@pytest.mark.parametrize("where", ["is", "lies inside", "contains"])
@pytest.mark.parametrize("command", ["slice", "quantize", "convert"])
def test_an_output_that_overlaps_its_input_is_refused_whatever_overwrite_says(world, command, where):
    e = world["elastic"]
    out = {"is": e, "lies inside": e / "sub", "contains": world["root"]}[where]
    argv = {"slice": ["slice", e, "--budget", "60%", "-o", out, "--overwrite"],
            "quantize": ["quantize", e, "-o", out, "--overwrite", "--calib-tokens", "0"],
            "convert": ["convert", e, out, "--overwrite"]}[command]
    refused(argv, world["root"], f"the output {out} {where} the input")


def test_importance_and_elastify_outputs_inside_their_inputs_are_refused(world):
    hf, text = world["hf"], world["text"]
    refused(["importance", hf, "--text", text, "--out", hf / "scores.safetensors"], world["root"], "lies inside")
    refused(["importance", hf, "--text", text, "--out", text, "--overwrite"], world["root"], "is the input")
    refused(["elastify", world["yaml"], "--model", hf, "--text", text, "--out", hf], world["root"], "is the input")
    refused(["elastify", world["yaml"], "--model", hf, "--text", text, "--out", hf / "e"], world["root"],
            "lies inside")


def test_to_hf_never_replaces_the_folder_it_was_read_from(own):
    model = nestlm.from_hf(own["hf"])
    before = snapshot(own["root"])
    with pytest.raises(nestlm.ConfigError, match="is the input"):
        nestlm.to_hf(model, own["hf"], overwrite=True)
    assert snapshot(own["root"]) == before


# ------------------------------------------------------------------------------------ 2. elastify --out DIR
def test_elastify_refuses_a_folder_that_is_not_its_own_output(world):
    err = refused(["elastify", world["yaml"], "--model", world["hf"], "--text", world["text"], "--out",
                   world["slice"]], world["root"], "is not empty and is not an elastify output", "nestlm_slice.json")
    assert "model.safetensors" in err


def test_demo_refuses_a_foreign_folder_and_clears_its_own_elastic_folder(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused(["demo", "--quick", "--out", foreign], tmp_path, "is not a demo output", "notes.txt")
    from nestlm.demo import clear_demo_dir

    old = tmp_path / "demo"
    (old / "elastic" / "train" / "tb").mkdir(parents=True)
    (old / "elastic" / "train" / "tb" / "events.out.tfevents.1").write_text("old")
    (old / "results.json").write_text("{}")
    clear_demo_dir(old)
    assert not (old / "elastic").exists() and (old / "results.json").is_file()


# ------------------------------------------------------------------------------------ 3. permissions
def test_outputs_get_the_umask_permissions(world, tmp_path):
    mask = os.umask(0o022)
    try:
        for argv in (["slice", world["elastic"], "--budget", "75%", "-o", tmp_path / "s"],
                     ["quantize", world["slice"], "-o", tmp_path / "q", "--calib-tokens", "0"],
                     ["convert", world["hf"], tmp_path / "c"],
                     ["importance", world["hf"], "--text", world["text"], "--out", tmp_path / "scores.safetensors",
                      "--seq-len", "16", "--batches", "1", "--batch-size", "2", "--sort-out", tmp_path / "sorted"],
                     ["elastify", world["yaml"], "--model", world["hf"], "--text", world["text"], "--out",
                      tmp_path / "e"]):
            code, _, err = run(argv)
            assert code == 0, err
    finally:
        os.umask(mask)
    for p in [tmp_path / "scores.safetensors", *tmp_path.rglob("*")]:
        if "train" in p.relative_to(tmp_path).parts:
            continue  # training state is not a shipped output
        want = 0o755 if p.is_dir() else 0o644
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))
    assert (tmp_path / "e" / "router.safetensors").is_file()  # save_file's file, included above


# ------------------------------------------------------------------------------------ 4. outputs checked first
def test_quantize_checks_its_output_before_calibrating(world, monkeypatch):
    import nestlm.quantize as qe

    monkeypatch.setattr(qe, "calibrate", lambda *a, **k: pytest.fail("calibrated before checking the output"))
    monkeypatch.setattr(qe, "fake_quantize_", lambda *a, **k: pytest.fail("quantized before checking the output"))
    refused(["quantize", world["hf"], "-o", world["slice"], "--fmt", "fp8"], world["root"], "exists", "--overwrite")


def test_importance_checks_both_outputs_first_and_never_overwrites_silently(world, tmp_path):
    scores, existing = tmp_path / "scores.safetensors", tmp_path / "existing"
    existing.mkdir()
    base = ["importance", world["hf"], "--text", world["text"], "--seq-len", "16", "--batches", "1",
            "--batch-size", "2"]
    refused(base + ["--out", scores, "--sort-out", existing], tmp_path, "existing exists", "--overwrite")
    assert not scores.exists()  # no scores written before the refusal
    scores.write_bytes(b"precious")
    refused(base + ["--out", scores], tmp_path, "scores.safetensors exists", "--overwrite")
    code, _, err = run(base + ["--out", scores, "--overwrite"])
    assert code == 0 and scores.read_bytes() != b"precious", err


# ------------------------------------------------------------------------------------ 5. one line, exit 2
def test_eval_and_generate_bad_values_are_one_line_errors(world, tmp_path):
    e, root = world["elastic"], world["root"]
    refused(["eval", e, "--seq-len", "0"], root, "--seq-len must be >= 1, got 0")
    refused(["eval", e, "--max-windows", "-1"], root, "--max-windows must be >= 0, got -1")
    (tmp_path / "empty.txt").write_text("")
    refused(["eval", e, "--text", tmp_path / "empty.txt"], tmp_path, "empty.txt: the text is empty")
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 4)
    refused(["eval", e, "--text", tmp_path / "bin.txt"], tmp_path, "bin.txt: not UTF-8 text")
    refused(["generate", world["hf"], "--prompt", ""], root, "--prompt is empty")
    refused(["generate", e, "--prompt", "x", "--think-budget", "60%", "--max-think", "-5"], root,
            "--max-think must be >= 0, got -5")


def test_ctrl_c_in_elastify_prints_one_line_and_the_rerun_resumes(world, tmp_path, monkeypatch):
    import nestlm.elastic.train as train

    calls, real = [0], train.kd_loss

    def kd_then_ctrl_c(*a, **k):
        calls[0] += 1
        if calls[0] == 3 * 3 + 1:  # the 4th step (3 budgets a step): the checkpoint of step 2 is on disk
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "e"
    argv = ["elastify", world["yaml"], "--model", world["hf"], "--text", world["text"], "--out", out]
    monkeypatch.setattr(train, "kd_loss", kd_then_ctrl_c)
    code, _, err = run(argv)
    assert code == 130
    lines = [ln for ln in err.splitlines() if ln.startswith("nestlm")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert f"{out / 'train' / 'checkpoint.pt'} (step 2)" in lines[0] and "again to resume" in lines[0]
    monkeypatch.setattr(train, "kd_loss", real)
    code, stdout, err = run(argv)
    assert code == 0, err
    assert "resuming from step 2" in stdout and (out / "nestlm_elastic.json").is_file()


def test_ctrl_c_in_the_demo_prints_one_line(tmp_path, monkeypatch):
    import nestlm.demo as demo

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_demo", interrupted)
    code, _, err = run(["demo", "--quick", "--out", tmp_path / "d"])
    assert code == 130 and err.strip().count("\n") == 0 and "running the demo again starts it over" in err


# ------------------------------------------------------------------------------------ 6. flags, plain warnings
def test_messages_name_flags_and_warnings_are_plain_lines(world, own, monkeypatch):
    err = refused(["slice", world["elastic"], "--budget", "60%", "-o", world["slice"]], world["root"], "--overwrite")
    assert "overwrite=True" not in err
    (own["elastic"] / "train" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    err = refused(["elastify", own["yaml"], "--model", own["hf"], "--text", own["text"], "--out", own["elastic"]],
                  own["root"], "--fresh")
    assert "resume=False" not in err

    import nestlm.search as search  # where `nestlm info` of a plain folder counts its memory

    real = search.count_memory

    def warns(*a, **k):
        warnings.warn("this is a warning", UserWarning, stacklevel=2)
        return real(*a, **k)

    monkeypatch.setattr(search, "count_memory", warns)
    code, _, err = run(["info", world["hf"]])
    assert code == 0 and err == "nestlm: warning: this is a warning\n"


# ------------------------------------------------------------------------------------ 7. budgets
def test_budgets_as_users_write_them(world, tmp_path):
    e, root = world["elastic"], world["root"]
    refused(["slice", e, "--budget", "75", "-o", tmp_path / "x"], root, "did you mean '75%'")
    refused(["slice", e, "--budget", "-5%", "-o", tmp_path / "x"], root, "'-5%'", "(0, 1]")
    assert not (tmp_path / "x").exists()
    code, out, err = run(["slice", e, "--budget", "FULL", "-o", tmp_path / "full"])
    assert code == 0 and "budget full" in out, err
    from nestlm.arch import SubArch
    from nestlm.elastic.artifact import resolve_budget

    cfg = nestlm.from_hf(e).cfg
    name, sub = resolve_budget(e, "0.99")
    assert sub.resolve(cfg) == SubArch.full(cfg)  # no smaller architecture lands within 2% of 0.99 here
    assert name == "99% (interpolated: the full model)"
    name, sub = resolve_budget(e, "0.7")
    assert (name == "70% (interpolated)") == (sub.resolve(cfg) != SubArch.full(cfg))


def test_the_yaml_reads_budgets_like_the_cli_and_shows_what_it_read(world, tmp_path):
    y = tmp_path / "e.yaml"
    y.write_text(world["yaml"].read_text().replace("budgets: [1.0, 0.75, 0.6]", "budgets: [1.0, 75%, 60%]"))
    assert nestlm.ElasticConfig.load(y).budgets == [1.0, 0.75, 0.6]
    y.write_text(world["yaml"].read_text().replace("steps: 6", "steps: 2OO"))
    refused(["elastify", y, "--model", world["hf"], "--text", world["text"], "--out", tmp_path / "e"], tmp_path,
            str(y), "steps must be an int, got '2OO'")


# ------------------------------------------------------------------------------------ 8. long evaluations
def test_eval_windows_longer_than_the_text_or_the_positions(own, world):
    refused(["eval", world["slice"], "--text", world["text"], "--seq-len", "5000"], world["root"],
            "too few for one window of 5000")
    cfg = json.loads((own["slice"] / "config.json").read_text())
    (own["slice"] / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 64}))
    refused(["eval", own["slice"], "--text", own["text"], "--seq-len", "100"], own["root"],
            "seq_len 100 (--seq-len) is longer than the model's positions (max_position_embeddings 64")


def test_eval_shows_progress(world):
    code, out, err = run(["eval", world["elastic"], "--text", world["text"], "--seq-len", "16", "--max-windows", "3"])
    assert code == 0 and "9/9" in err and "window" in err  # 3 windows x 3 rows


def test_ctrl_c_stops_a_long_eval_at_once(world, tmp_path):
    """A subprocess evaluating long windows gets SIGINT once its progress bar is up: it must be gone within
    a couple of seconds (a running torch operation does not hold it up), with one line."""
    big = tmp_path / "big.txt"
    big.write_text(world["text"].read_text() * 400)
    env = dict(os.environ, OMP_NUM_THREADS="1")  # PYTHONPATH as the tests run
    p = subprocess.Popen([sys.executable, "-m", "nestlm.cli", "eval", str(world["slice"]), "--text", str(big),
                          "--seq-len", "4096", "--max-windows", "0"], env=env, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "window" not in seen:  # the progress bar has started: the model is running
        seen += p.stderr.read(1)
        assert p.poll() is None, seen
    time.sleep(1.0)
    t0 = time.perf_counter()
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    code = p.wait(timeout=30)
    assert time.perf_counter() - t0 < 3.0
    assert code == 130 and "Traceback" not in rest
    assert rest.strip().splitlines()[-1] == "nestlm: interrupted (eval writes nothing)"


# ------------------------------------------------------------------------------------ 9. misleading messages
def test_a_truncated_router_says_truncated(own):
    f = own["elastic"] / "router.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    err = refused(["slice", own["elastic"], "--budget", "0.7", "-o", own["root"] / "x"], own["root"], "truncated")
    assert "match" not in err


def test_info_on_a_plain_folder_with_truncated_weights_fails(own):
    f = own["slice"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    refused(["info", own["slice"]], own["root"], "model.safetensors: truncated")


def test_no_such_folder(world, tmp_path):
    for argv in (["generate", tmp_path / "nope", "--prompt", "x"],
                 ["generate", tmp_path / "nope", "--prompt", "x", "--think-budget", "60%"],
                 ["info", tmp_path / "nope"], ["eval", tmp_path / "nope"]):
        refused(argv, tmp_path, f"{tmp_path / 'nope'}: no such folder")


def test_info_and_convert_of_a_packed_folder_say_it_is_quantized(world, tmp_path):
    code, out, _ = run(["info", world["packed"]])
    assert code == 0 and "NVFP4 packed" in out and "plain transformers does not" in out
    assert "(bf16)" not in out
    code, out, _ = run(["convert", world["packed"], tmp_path / "c"])
    assert code == 0 and "a dequantized copy of the W4A16_NVFP4 packed checkpoint" in out


def test_eval_on_a_slice_labels_its_row_as_the_slice(world):
    code, out, _ = run(["eval", world["slice"], "--text", world["text"], "--seq-len", "16", "--max-windows", "2"])
    assert code == 0 and "| slice 60% |" in out and "parent" not in out.splitlines()[2]


# ------------------------------------------------------------------------------------ 10. readable generation
def test_the_printer_never_prints_a_replacement_character(capsys):
    from nestlm.inference.text import Printer

    tok = ByteTokenizer()
    p = Printer(tok.decode)
    ids = tok.encode("a") + tok.encode("é")[:1] + tok.encode("</think>") + tok.encode("é")[1:] + tok.encode("sé")
    for i, t in enumerate(ids):  # a character cut by the forced tag, then its stray continuation byte
        p(torch.tensor([t]), "think" if i < 2 else "answer")
    p.close()
    assert capsys.readouterr().out == "a</think>sé\n"


def test_the_detokenizer_never_splits_a_character_nor_a_held_string():
    """Detok (the one incremental detokenizer of `generate`, `think` and `serve`) against the whole decode:
    the deltas add up to a prefix of it, carry no U+FFFD, and never hand out a byte of a stop string before
    the text shows whether it is one."""
    from nestlm.inference.detok import Detok

    tok = ByteTokenizer()
    text = "é a</th</think>ü STOP-ish STOP ok"
    ids = tok.encode(text)
    d, out = Detok(tok.decode, ["</think>", "STOP"]), ""
    for t in ids:
        delta = d.push(t)
        assert "\ufffd" not in delta
        out += delta
        assert text.startswith(out) and out == d.text()[: d.sent]
        for hold in ("</think>", "STOP"):  # nothing past the start of a hold that is not whole yet
            i = d.text().rfind(hold[0])
            if i >= 0 and hold.startswith(d.text()[i:]) and d.text()[i:] != hold:
                assert d.sent <= i
    assert d.first_hold() == (text.find("</think>"), "</think>")
    assert out == text  # the text ends with no partial hold: all of it was handed out


def test_sampling_follows_transformers_rules():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from nestlm.inference.generate import Sampling, sample

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    seen = torch.randint(0, 50, (3, 7), generator=g)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        ref = w(seen, ref)
    want = torch.multinomial(torch.softmax(ref, -1), 1, generator=torch.Generator().manual_seed(5))
    got = sample(logits, Sampling(0.7, 20, top_p=0.8, repetition_penalty=1.3), torch.Generator().manual_seed(5), seen)
    assert torch.equal(got, want)
    greedy = sample(logits, Sampling(0.0, repetition_penalty=1.3), seen=seen)
    assert torch.equal(greedy, RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone()).argmax(-1, keepdim=True))


def test_generate_repetition_penalty_matches_transformers(world):
    from transformers import AutoModelForCausalLM

    prompt = "In the beginning"
    code, out, err = run(["generate", world["hf"], "--prompt", prompt, "--max-new-tokens", "12",
                          "--repetition-penalty", "1.3"])
    assert code == 0, err
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode(prompt)])
    hf = AutoModelForCausalLM.from_pretrained(world["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.3, eos_token_id=tok.eos_id)
        plain = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_id)
    assert not torch.equal(ref, plain)  # the penalty changed something
    assert out == prompt + tok.decode(ref[0, ids.shape[1]:]).replace("\ufffd", "") + "\n"


# ------------------------------------------------------------------------------------ 11. the docs
def test_the_guides_python_block_runs_as_written(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "docs" / "guide.md").read_text()
    block = text.split("## Python API\n\n```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/guide.md", "exec"), {"__name__": "guide"})
    assert (tmp_path / "out" / "75" / "config.json").is_file() and (tmp_path / "small" / "config.json").is_file()


def test_the_demo_yaml_is_the_config_the_demo_builds():
    from nestlm.demo import elastic_config

    yaml = nestlm.ElasticConfig.load(Path(__file__).parents[1] / "recipes" / "configs" / "demo_elastic.yaml")
    assert yaml == elastic_config(100, 16, 128, 0)  # the demo's defaults: 100 steps of 16 x 128 tokens


def test_a_fresh_elastify_clears_old_tensorboard_files(own):
    tb = own["elastic"] / "train" / "tb"
    tb.mkdir(parents=True, exist_ok=True)
    (tb / "events.out.tfevents.old").write_text("an earlier run's")
    code, _, err = run(["elastify", own["yaml"], "--model", own["hf"], "--text", own["text"], "--out", own["elastic"],
                        "--fresh", "--max-steps", "1"])
    assert code == 0, err
    assert not (tb / "events.out.tfevents.old").exists()
