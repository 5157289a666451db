"""The `nestlm` command line, run in-process: info, convert, generate, clean errors, and the quick demo."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import randomize_, tiny_nemotron_h_config

from nestlm.cli import main
from nestlm.data import ByteTokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Nemotron-H checkpoint with the byte tokenizer, written by transformers itself."""
    from transformers import NemotronHForCausalLM

    path = tmp_path_factory.mktemp("tiny_nemotron_h")
    cfg = tiny_nemotron_h_config(vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    model = randomize_(NemotronHForCausalLM(cfg).eval())
    model.save_pretrained(path)
    ByteTokenizer().save(path)
    return path


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def n_weights(model) -> int:
    """Parameters + the MoE score-correction biases (buffers in transformers, weights in the checkpoint)."""
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))


def test_info_reports_family_and_exact_parameter_count(hf_dir, capsys):
    assert main(["info", str(hf_dir)]) == 0
    out = capsys.readouterr().out
    n = n_weights(hf_model(hf_dir))  # counted on the transformers model, not by nestlm
    assert "nemotron_h (NemotronHForCausalLM)" in out
    rows = dict(line.split(None, 1) if not line.startswith("active") else ("active", line.split()[-1])
                for line in out.splitlines())
    assert rows["pattern"].startswith("ME*-ME")
    assert rows["parameters"].strip() == f"{n:,}"
    assert "memory @ 4096 tokens" in out


def test_info_returns_the_numbers(hf_dir):
    from nestlm.cli import info

    d = info(str(hf_dir), seq_len=128)
    assert d["family"] == "nemotron_h" and d["config"]["pattern"] == "ME*-ME"
    assert 0 < d["active_params"] < d["params"]  # 2 of 4 experts run per token
    m = d["memory"]
    assert m["total"] == m["weights"] + m["kv_cache"] + m["ssm_state"]
    assert m["weights"] == 2 * d["params"]  # bf16


def test_convert_round_trip_keeps_the_logits(hf_dir, tmp_path, capsys):
    dst = tmp_path / "converted"
    assert main(["convert", str(hf_dir), str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (dst / "tokenizer.json").is_file()  # tokenizer files travel with the weights
    x = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf_model(hf_dir)(x).logits, hf_model(dst)(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_user_errors_print_one_line_and_exit_2(hf_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", str(tmp_path / "nope")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("nestlm: error: ") and "nope" in err and "Traceback" not in err
    assert err.count("\n") == 1

    with pytest.raises(SystemExit) as e:
        main(["convert", str(hf_dir), str(hf_dir)])  # the destination exists
    assert e.value.code == 2
    assert "exists" in capsys.readouterr().err

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SystemExit) as e:
        main(["info", str(tmp_path / "bad")])
    assert e.value.code == 2
    assert "gpt2" in capsys.readouterr().err


def test_generate_streams_the_same_tokens_as_transformers(hf_dir, capsys):
    prompt = "In the beginning"
    assert main(["generate", str(hf_dir), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        ref = hf_model(hf_dir).generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_id)
    assert out == prompt + tok.decode(ref[0, ids.shape[1]:]) + "\n"


# -------------------------------------------------------------------------------------------- the demo
@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_demo_trains_and_slices_three_budgets(quick_demo):
    out, r = quick_demo
    budgets = r["budgets"]
    assert [b["name"] for b in budgets] == ["budget_100", "budget_75", "budget_50"]
    for b in budgets:
        assert math.isfinite(b["ppl"]) and math.isfinite(b["ppl_zero_shot"]) and b["tok_per_s"] > 0
        assert b["max_abs_diff_hf"] < 1e-3  # the exported checkpoint is the same function in transformers
        assert (out / b["name"] / "config.json").is_file() and (out / b["name"] / "tokenizer.json").is_file()
    assert budgets[0]["ppl"] < r["untrained_ppl"] < 300  # it learned something (uniform would be 259)
    params = [b["params"] for b in budgets]
    assert params[0] > params[1] > params[2]
    assert 0.6 < params[1] / params[0] <= 0.75 and 0.35 < params[2] / params[0] <= 0.5
    assert r["pretrain"]["final_loss"] < r["pretrain"]["first_loss"]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "budgets.png").stat().st_size > 1000


@pytest.mark.slow
def test_demo_budget_folders_load_in_transformers_with_their_sizes(quick_demo):
    out, r = quick_demo
    small = r["budgets"][-1]
    model = hf_model(out / small["name"])
    n = n_weights(model)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if r["config"]["tie_embeddings"] and head.data_ptr() != emb.data_ptr():  # NemotronH keeps a separate copy
        assert torch.equal(head, emb)
        n -= head.numel()
    assert n == small["params"]
    assert model.config.hidden_size == small["sub"]["hidden"] < r["config"]["hidden_size"]
