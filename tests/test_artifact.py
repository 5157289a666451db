"""The elastic checkpoint format in one place (nestlm.elastic.artifact): every command that takes a budget
(slice, eval, generate, quantize) resolves it with the one resolver, so '60%', 0.6 and '0.6' (between
trained budgets: the router's interpolation) and a trained name give the same SubArch everywhere."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import randomize_, tiny_hybrid_config

import nestlm
from nestlm.arch import SubArch
from nestlm.data import ByteTokenizer
from nestlm.elastic.artifact import SLICE_FILE, read_manifest, resolve_budget

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Q:1+2=?\n<think>"


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    """A random hybrid exported as an elastic checkpoint (budgets full, 70%, 50%) with the byte tokenizer."""
    from nestlm.elastic.artifact import export
    from nestlm.elastic.config import ElasticConfig
    from nestlm.elastic.router import Router

    path = tmp_path_factory.mktemp("artifact") / "elastic"
    tok = ByteTokenizer()
    cfg = tiny_hybrid_config(vocab_size=tok.vocab_size, pattern="M*-M")
    model = randomize_(nestlm.Decoder(cfg).init_weights(3), 3).eval()
    ecfg = ElasticConfig(budgets=[1.0, 0.7, 0.5], align=4, router_hidden=4, steps=1, sort=False,
                         choices={"hidden": [1.0, 0.75, 0.5], "mamba_heads_per_group": [1.0, 0.5],
                                  "ffn": [1.0, 0.5]})
    torch.manual_seed(0)
    with warnings.catch_warnings():  # manifest_for may warn that a random router's argmax misses its budget
        warnings.simplefilter("ignore")
        export(model, Router(cfg, ecfg), ecfg, path)
    tok.save(path)
    return path


def expected(path, budget) -> SubArch:
    """What the budget means, computed without the resolver: the manifest's entry for a trained budget, the
    router's interpolation within the checkpoint's landing tolerance for 0.6."""
    model, router, manifest = nestlm.load_elastic(path)
    if budget in ("70%", 0.7):
        return SubArch.from_dict(manifest["budgets"]["70%"]["sub"]).resolve(model.cfg)
    assert budget in ("60%", 0.6, "0.6")
    return router.interpolate(0.6, router.ecfg.landing_tolerance).resolve(model.cfg)


BUDGETS = ["60%", 0.6, "0.6", "70%", 0.7]


def test_resolver_names_and_errors(elastic):
    cfg = nestlm.load_elastic(elastic)[0].cfg
    name, sub = resolve_budget(elastic, "60%")
    assert name == "60% (interpolated)" and sub.resolve(cfg) == expected(elastic, "60%")
    assert resolve_budget(elastic, 0.7)[0] == "70%" and resolve_budget(elastic, "full") == ("full", SubArch())
    assert resolve_budget(elastic, 1.0) == ("full", SubArch())
    with pytest.raises(KeyError, match=r"no budget '40%'.*outside the trained range 0.5..1"):
        resolve_budget(elastic, "40%")
    manifest = read_manifest(elastic)
    assert resolve_budget(None, "70%", manifest=manifest)[1].resolve(cfg) == expected(elastic, "70%")
    with pytest.raises(KeyError, match="needs the router"):  # a manifest alone can't interpolate
        resolve_budget(None, 0.6, manifest=manifest)


@pytest.mark.parametrize("budget", BUDGETS)
def test_slice_eval_generate_quantize_resolve_alike(elastic, tmp_path, monkeypatch, budget):
    import nestlm.cli
    import nestlm.inference.two_phase
    from nestlm.evaluate import evaluate
    from nestlm.quant import quantize
    from nestlm.slicing import slice as slice_

    want = expected(elastic, budget)
    cfg = nestlm.load_elastic(elastic)[0].cfg
    assert want != SubArch.full(cfg)

    cut = slice_(elastic, budget, tmp_path / "cut")
    assert json.loads((cut / SLICE_FILE).read_text())["sub"] == want.to_dict()

    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 4)
    rows = evaluate(elastic, text, seq_len=16, max_windows=1, budgets=[budget])
    assert [r["name"] for r in rows][0] == "parent" and len(rows) == 2
    assert SubArch.from_dict(rows[1]["sub"]).resolve(cfg) == want

    q = quantize(str(elastic), str(tmp_path / "q"), "fp8_channel", budget=budget, calib_tokens=0, progress=False)
    prov = json.loads((q / SLICE_FILE).read_text())
    assert prov["sub"] == want.to_dict() and prov["quant_format"] == "fp8_channel"

    seen = []
    import nestlm.inference.text

    real = nestlm.inference.text.generate_two_phase
    monkeypatch.setattr(nestlm.inference.text, "generate_two_phase",
                        lambda m, ids, s, big, *a, **k: seen.append((s, big)) or real(m, ids, s, big, *a, **k))
    nestlm.inference.text.think_answer(elastic, PROMPT, think_budget=budget, max_think=2, max_answer=1, stream=False)
    assert seen[0][0].resolve(cfg) == want and seen[0][1] == SubArch()


def test_cli_generate_with_an_interpolated_think_budget(elastic, capsys):
    """`nestlm generate DIR --think-budget 60%`: between the trained 70% and 50%, interpolated as slice does."""
    from nestlm.cli import main
    from nestlm.inference.two_phase import Standalone, generate_two_phase

    tok = ByteTokenizer()
    model, _, _ = nestlm.load_elastic(elastic)
    ids = torch.tensor([tok.encode(PROMPT, bos=True)])
    ref = generate_two_phase(Standalone(model), ids, expected(elastic, "60%"), None, 4, 3, tok.encode("</think>"),
                             stop_tokens=tok.eos_id)
    assert main(["generate", str(elastic), "--prompt", PROMPT, "--think-budget", "60%", "--max-think", "4",
                 "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    # the prompt (after <bos>) and every new token; bytes that make no character are left out (issue 15)
    assert out.rstrip("\n") == tok.decode(ref.tokens[0, 1:]).replace("\ufffd", "")
    assert "on 60%" in err
    with pytest.raises(SystemExit) as e:
        main(["generate", str(elastic), "--prompt", "x", "--think-budget", "40%"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no budget '40%'" in err and "outside the trained range" in err
