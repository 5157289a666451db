"""The server's engine (nestlm.inference.serve.Engine) on fake CUDA (see tests/fake_cuda.py): a plain and a
think-small / answer-large request run with the model on the card. Issue 26 found the prompt built on the
CPU (torch.tensor(ids) without the model's device); this pins the fix. Kept apart from test_fake_cuda.py so
that it follows serve.py's rewrite easily: the scenario is tests/fake_cuda.py's scenario_engine."""

from __future__ import annotations

from test_fake_cuda import _ok, run_scenarios


def test_engine_runs_on_the_card():
    r = _ok(run_scenarios("engine"), "engine")
    assert r["device"] == "cuda:0"
    assert r["done"] == [0, 1]  # both requests finished in one running batch
    assert {"answer", "end", "think"} <= set(r["phases"])  # streamed; thinking ended by the budget
    assert r["syncs"] > 0
