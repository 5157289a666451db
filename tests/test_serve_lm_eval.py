"""lm-evaluation-harness through `nestlm serve`: `local-completions` with its default settings (remote
tokenizer auto-detected through /tokenizer_info and /tokenize, token-id prompts, echo + logprobs for
loglikelihood) on a local multiple-choice task and a local generation task must give the same per-item results
and scores as lm-eval's own `hf` model on the sliced folder of the same budget."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from test_lm_eval import write_items
from test_slicing_stream import make_elastic

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
pytest.importorskip("tenacity")  # lm-eval[api]: its API models need it

GEN_ITEMS = [{"query": "In the beginning", "answer": "x"}, {"query": "And God said", "answer": "y"},
             {"query": "The LORD is my shepherd", "answer": "z"}]


def ascii_head_(folder) -> None:
    """Make the checkpoint's head favour printable ASCII (the other rows zero): greedy text round-trips
    through UTF-8 in both tokenizers, so generated strings compare exactly."""
    from safetensors.torch import load_file, save_file

    for f in folder.glob("*.safetensors"):
        sd = load_file(f)
        if "lm_head.weight" in sd:
            w = sd["lm_head.weight"].clone()
            keep = torch.zeros(w.shape[0], dtype=torch.bool)
            keep[32:127] = True
            keep[ord("\n")] = True
            w[~keep] = 0
            w[keep] *= 4
            sd["lm_head.weight"] = w
            save_file(sd, f, metadata={"format": "pt"})


def gen_task(path) -> dict:
    return {"task": "kjv_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{query}}",
            "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n", "e"], "max_gen_toks": 12,
                                                                  "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}


def run_lm_eval(model: str, model_args: dict, tasks: list) -> dict:
    import lm_eval

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True, device="cpu")
    return res


def per_item(res: dict, task: str) -> list:
    return [s["filtered_resps"] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


def test_lm_eval_local_completions_equals_hf_on_the_sliced_folder(tmp_path, monkeypatch):
    from nestlm.evaluate import jsonl_task
    from nestlm.inference.serve import launch, stop, wait_ready
    from nestlm.slicing import slice as slice_

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    src = make_elastic(tmp_path, "llama")
    ascii_head_(src)
    mc = jsonl_task(write_items(tmp_path / "kjv_mc.jsonl"))
    gen_path = tmp_path / "kjv_gen.jsonl"
    gen_path.write_text("".join(json.dumps(it) + "\n" for it in GEN_ITEMS))
    budget = "50%"
    cut = slice_(src, budget, tmp_path / "cut")
    ref = run_lm_eval("hf", {"pretrained": str(cut), "dtype": "float32"}, [mc, gen_task(gen_path)])
    proc, url = launch(src, "--threads", "1")
    try:
        wait_ready(proc, url)
        got = run_lm_eval("local-completions", {"model": "0.5", "base_url": url + "/completions"},
                          [mc, gen_task(gen_path)])
    finally:
        stop(proc)
    # multiple choice: each choice's loglikelihood (and is-greedy flag), and the scores
    for g, r in zip(per_item(got, "kjv_mc"), per_item(ref, "kjv_mc"), strict=True):
        torch.testing.assert_close(torch.tensor([float(x[0]) for x in g]), torch.tensor([float(x[0]) for x in r]),
                                   atol=2e-4, rtol=1e-5)
        assert [bool(x[1]) for x in g] == [bool(x[1]) for x in r]
    for metric in ("acc,none", "acc_norm,none"):
        assert got["results"]["kjv_mc"][metric] == ref["results"]["kjv_mc"][metric]
    # generation: the same greedy strings, cut at the same stop strings
    gens, refs = per_item(got, "kjv_gen"), per_item(ref, "kjv_gen")
    assert gens == refs and any(g[0] for g in gens)
    assert got["results"]["kjv_gen"]["exact_match,none"] == ref["results"]["kjv_gen"]["exact_match,none"]
