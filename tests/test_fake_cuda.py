"""CUDA placement proven without a GPU (issue 26): nestlm's CUDA paths run on fake CUDA tensors
(tests/fake_cuda.py: torch's FakeTensorMode, which raises on any CPU tensor meeting a CUDA one), in a
subprocess because the fake card's C++ guard must load before torch. One elastify step in bf16 (autocast,
router, budget loss, both optimizers), a submodel extracted onto the card, cached generation, two-phase
generation; the host syncs of one training step are counted and pinned; a deliberate CPU tensor fails."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# the host syncs of one elastify step (one budget, one micro-step, a hybrid with one MoE block), by site
STEP_SYNCS = {
    "model/layers.py:_grouped": 2,  # MoE dispatch: tokens per expert (bincount().tolist()), teacher + student
    "elastic/router.py:indices": 3,  # the sampled widths as ints: the step's SubArch, sample's check, the log
    "elastic/train.py:train_step": 2,  # float(kd) and float(rl) per micro-step
    "elastic/train.py:log_step": 2,  # the log's cost and expected ratios
    "elastic/parallel.py:all_finite": 1,  # the NaN guard: one norm of every gradient
}


def run_scenarios(*names: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(HERE / "fake_cuda.py"), *names], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    return out


@pytest.fixture(scope="module")
def results():
    return run_scenarios("train", "slice", "generate", "two_phase")


def _ok(res: dict, name: str) -> dict:
    assert res[name]["ok"], f"{name} on fake CUDA: {res[name]['error']} at {res[name]['where']}"
    return res[name]


def test_elastify_step_runs_on_cuda_and_its_host_syncs_are_counted(results):
    r = _ok(results, "train")
    assert r["steps"] == 2 and r["checkpoints"]  # two steps logged, the checkpoint reached (not written)
    by_site = collections.Counter(s.rsplit(":", 2)[0] + ":" + s.rsplit(":", 1)[1] for s in r["syncs_in_step"])
    assert dict(by_site) == STEP_SYNCS, r["syncs_in_step"]


def test_slicing_into_a_model_stays_on_the_card(results):
    r = _ok(results, "slice")
    assert r["devices"] == ["cuda:0"]


def test_cached_and_two_phase_generation_run_on_the_card(results):
    g, t = _ok(results, "generate"), _ok(results, "two_phase")
    assert g["device"] == "cuda:0" and g["shape"] == [2, 9]  # 5 prompt + 4 new tokens
    assert t["devices"] == ["cuda:0", "cuda:0"]  # re-prefill and cache transplant
    assert g["syncs"] > 0 and t["syncs"] > 0  # the stop checks read the card: counted, so the count is real


def test_a_cpu_tensor_in_the_cuda_path_fails():
    """The deliberate bug (the model's output plus a 1-d CPU tensor) must be caught, or the others prove nothing.
    Its own process: a step that raised mid-backward leaves the fake card in no state for more."""
    r = run_scenarios("bug")["bug"]
    assert not r["ok"] and r["error"].startswith("FakeTensorDeviceMismatchError"), r
    assert "cuda:0 and cpu" in r["error"]
