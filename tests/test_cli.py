"""The `nestlm` command line, run in-process: info, convert, generate, importance, elastify, slice, eval, clean
errors, and the quick demo."""

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
    from safetensors.torch import load_file

    stored = sum(t.numel() * t.element_size() for t in load_file(hf_dir / "model.safetensors").values())
    assert m["weights"] == stored  # the weights as the folder stores them (as `info --sub` counts them)


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
        main(["convert", str(hf_dir), str(hf_dir)])  # the destination is the source (issue 15)
    assert e.value.code == 2
    assert "is the input" in capsys.readouterr().err

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
    assert out == prompt + tok.decode(ref[0, ids.shape[1]:]).replace("\ufffd", "") + "\n"  # no U+FFFD (issue 15)


# -------------------------------------------------------------------------------------------- importance
TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.\n") * 12


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "genesis.txt"
    f.write_text(TEXT)
    return f


def test_importance_writes_scores_and_sort_out_keeps_the_logits(hf_dir, text_file, tmp_path, capsys):
    from nestlm.elastic.importance import Scores

    scores, sorted_dir = tmp_path / "scores.safetensors", tmp_path / "sorted"
    assert main(["importance", str(hf_dir), "--text", str(text_file), "--out", str(scores), "--seq-len", "32",
                 "--batches", "2", "--batch-size", "2", "--sort-out", str(sorted_dir)]) == 0
    assert "wrote" in capsys.readouterr().out
    s = Scores.load(scores)
    assert s.meta["tokens"] == 2 * 2 * 32 and s.meta["batches"] == 2
    assert s["hidden"].shape == (32,) and "layers" in s and "blocks.1.experts" in s  # block 1: MoE
    assert (sorted_dir / "tokenizer.json").is_file()
    x = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf_model(hf_dir)(x).logits, hf_model(sorted_dir)(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    sd_a, sd_b = hf_model(hf_dir).state_dict(), hf_model(sorted_dir).state_dict()
    assert any(not torch.equal(sd_a[k], sd_b[k]) for k in sd_a)  # it did permute something


def test_importance_needs_a_text(hf_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse: --text or --kjv is required
        main(["importance", str(hf_dir), "--out", str(tmp_path / "s.safetensors")])
    assert e.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["importance", str(hf_dir), "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "s")])
    assert e.value.code == 2
    assert "missing.txt" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- elastify, slice, info, eval
ELASTIC_YAML = """\
budgets: [1.0, 0.75, 0.6]
choices:
  hidden: [1.0, 0.875, 0.75, 0.625, 0.5]
  ffn: [1.0, 0.5]
  mamba_heads_per_group: [1.0, 0.5]
align: 4
steps: 8
batch: 2
seq_len: 16
lr_model: 0.001
lr_router: 0.03
router_weight: 2.0
router_hidden: 32
p_full: 0.2
calib_batches: 2
checkpoint_every: 1000
"""


@pytest.fixture(scope="module")
def elastic_dir(hf_dir, text_file, tmp_path_factory):
    """A tiny elastic checkpoint, trained for a handful of steps by `nestlm elastify` (the tests of
    tests/test_elastic.py use the same settings for longer)."""
    root = tmp_path_factory.mktemp("elastic")
    (root / "elastic.yaml").write_text(ELASTIC_YAML)
    out = root / "out"
    assert main(["elastify", str(root / "elastic.yaml"), "--model", str(hf_dir), "--text", str(text_file),
                 "--out", str(out)]) == 0
    return out


def test_elastify_writes_an_elastic_checkpoint(elastic_dir, capsys):
    manifest = json.loads((elastic_dir / "nestlm_elastic.json").read_text())
    assert list(manifest["budgets"]) == ["full", "75%", "60%"]
    log = (elastic_dir / "train" / "log.jsonl").read_text().splitlines()
    assert len(log) == 8 * 3  # every budget on every step (budgets_per_step: the default, all)
    assert (elastic_dir / "tokenizer.json").is_file() and (elastic_dir / "nestlm_tokenizer.json").is_file()


def test_slice_writes_a_folder_transformers_loads(elastic_dir, tmp_path, capsys):
    from nestlm.elastic.artifact import resolve_budget
    from nestlm.load import load_elastic

    dst = tmp_path / "small"
    assert main(["slice", str(elastic_dir), "--budget", "60%", "-o", str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    model, _, manifest = load_elastic(elastic_dir)
    sub = resolve_budget(None, "60%", manifest=manifest)[1]
    hf = hf_model(dst)
    n = n_weights(hf)
    if hf.get_output_embeddings().weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr() \
            and model.cfg.tie_embeddings:  # NemotronH keeps a separate copy of a tied head
        n -= hf.get_output_embeddings().weight.numel()
    assert n == manifest["budgets"]["60%"]["params"]
    assert (dst / "tokenizer.json").is_file()
    x = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x, sub=sub), atol=2e-5, rtol=1e-4)


def test_slice_unknown_budget_exits_2_naming_the_budgets(elastic_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["slice", str(elastic_dir), "--budget", "huge", "-o", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("nestlm: error: ") and err.count("\n") == 1
    assert "huge" in err and "'full', '75%', '60%'" in err
    assert not (tmp_path / "x").exists()


def test_info_on_an_elastic_checkpoint_prints_its_budgets(elastic_dir, capsys):
    assert main(["info", str(elastic_dir)]) == 0
    out = capsys.readouterr().out
    assert "elastic checkpoint" in out and "storage:" in out
    for name in ("full", "75%", "60%"):
        assert f"| {name} " in out


def test_eval_prints_a_table_with_finite_perplexities(elastic_dir, text_file, capsys):
    from nestlm.cli import evaluate

    rows = evaluate(str(elastic_dir), str(text_file), seq_len=32, max_windows=4)
    assert [r["name"] for r in rows] == ["parent", "75%", "60%"]
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows)
    capsys.readouterr()
    assert main(["eval", str(elastic_dir), "--text", str(text_file), "--seq-len", "32", "--max-windows", "4",
                 "--budget", "60%"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| budget | params |") and len(lines) == 4  # header, rule, parent, 60%
    assert lines[3].startswith("| 60% |")


def test_example_elastic_config_fits_the_demo_model():
    from pathlib import Path

    from nestlm import ElasticConfig
    from nestlm.demo import demo_config

    ecfg = ElasticConfig.load(Path(__file__).parent.parent / "recipes" / "configs" / "demo_elastic.yaml")
    assert ecfg.resolve_choices(demo_config(259))["hidden"] == [128, 112, 96, 80, 64]


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
    assert params[0] > params[1] >= params[2]  # 40 router steps: on the way to the budgets, not there
    assert [b["router_cost"] for b in budgets] == [p / params[0] for p in params]
    assert r["pretrain"]["final_loss"] < r["pretrain"]["first_loss"]
    for png in ("loss.png", "budgets.png", "loss_budget_75.png", "loss_budget_50.png"):
        assert (out / png).stat().st_size > 1000
    assert (out / "elastic" / "nestlm_elastic.json").is_file()  # the elastic checkpoint the budgets are cut from
    assert set(r["loss"]["elastify"]) == {"budget_100", "budget_75", "budget_50"}


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


def test_quantize_then_slice_eval_and_load_the_packed_elastic_checkpoint(elastic_dir, text_file, tmp_path, capsys):
    """`nestlm quantize` keeps an elastic checkpoint elastic: `nestlm slice` cuts a packed budget out of it,
    `from_hf` dequantizes both, and the cut equals the packed elastic model run at that budget."""
    import nestlm
    from nestlm.elastic.artifact import resolve_budget

    q = tmp_path / "fp8"
    assert main(["quantize", str(elastic_dir), "-o", str(q), "--fmt", "fp8", "--calib-tokens", "256",
                 "--seq-len", "32", "--text", str(text_file)]) == 0
    assert "bytes each" in capsys.readouterr().out
    hf = json.loads((q / "config.json").read_text())
    assert hf["quantization_config"]["quant_algo"] == "FP8" and (q / "nestlm_elastic.json").is_file()
    cut = tmp_path / "cut"
    assert main(["slice", str(q), "--budget", "60%", "-o", str(cut)]) == 0
    manifest = json.loads((q / "nestlm_elastic.json").read_text())
    sub = resolve_budget(None, "60%", manifest=manifest)[1]
    packed, small, latent = nestlm.from_hf(q), nestlm.from_hf(cut), nestlm.from_hf(elastic_dir)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(small(ids), packed(ids, sub=sub), atol=1e-5, rtol=1e-5)
    changed = 0
    for (n, w), (n2, w0) in zip(packed.named_parameters(), latent.named_parameters(), strict=True):
        assert n == n2
        rel = float((w - w0).detach().norm() / w0.detach().norm().clamp_min(1e-12))
        assert rel < 0.05, n  # E4M3 keeps 3 mantissa bits: at most 1/16 relative rounding per element
        changed += rel > 0
    assert changed >= 10  # the mixers' projections were quantized (embeddings, norms, conv are not)
    capsys.readouterr()
    assert main(["eval", str(q), "--seq-len", "16", "--max-windows", "2", "--budget", "60%"]) == 0
    assert "| 60% |" in capsys.readouterr().out
    from nestlm.cli import info

    d = info(str(q))
    assert d["dtype"].startswith("FP8") and d["elastic"]
    row = next(r for r in d["budgets"] if r["name"] == "60%")
    from safetensors import safe_open

    tensor_bytes = 0  # what the sliced packed folder's tensors take (safetensors headers excluded)
    for f in cut.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            tensor_bytes += sum(h.get_tensor(k).nbytes for k in h.keys())
    assert row["bytes"] == pytest.approx(tensor_bytes, rel=0.02)  # computed from the elastic folder alone
