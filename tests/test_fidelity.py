"""recipes/fidelity.py --quick: the protocol's table has one row per budget with every column, the budgets'
sizes match between the elastic run and the runs alone, and the runs alone really trained."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).parents[1] / "recipes" / "fidelity.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("fidelity_recipe", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_quick_protocol_table_and_training(tmp_path):
    fid = _recipe()
    out = tmp_path / "fid"
    res = fid.main(["--quick", "--seeds", "0", "--out", str(out)])
    from nestlm.arch import count_params
    from nestlm.elastic.config import budget_name

    # the table: a header with every column, a separator, one row per budget in order
    lines = [ln for ln in res["table"].splitlines() if ln.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == fid.COLUMNS
    assert len(lines) == 2 + len(fid.BUDGETS)
    assert [ln.strip("|").split("|")[0].strip() for ln in lines[2:]] == [budget_name(f) for f in fid.BUDGETS]
    assert json.loads((out / "results.json").read_text())["table"] == res["table"]

    # token counts: T for the elastic run, T / (K - 1) and T for each run alone
    q, k = fid.QUICK, len(fid.BUDGETS)
    assert res["tokens"]["T"] == q.steps * q.batch * q.seq_len
    assert res["tokens"]["alone_T/(K-1)"] == (q.steps // (k - 1)) * q.batch * q.seq_len
    assert res["tokens"]["alone_T"] == res["tokens"]["T"]

    (seed,) = res["per_seed"]
    parent = fid.nestlm.from_hf(out / "parent")
    full = count_params(parent.cfg)
    for row in seed["budgets"]:
        assert row["params"] == round(row["cost"] * full)  # the size the manifest chose
        if row["fraction"] == 1.0:
            assert row["zero_shot"] == pytest.approx(res["parent"]["ppl"])  # the full slice is the parent
            continue
        for key in ("alone_T/(K-1)", "alone_T"):
            first, last = row[f"{key} kd first/last"]
            assert last < first, (row["fraction"], key)  # its KD loss fell
            assert row[key] < row["zero_shot"], (row["fraction"], key)  # better than the untrained cut
    # the elastic run trained too: its smallest budget moved away from the zero-shot cut
    assert seed["budgets"][-1]["elastic"] != pytest.approx(seed["budgets"][-1]["zero_shot"], rel=1e-4)

    # compute: the elastic run's log against the runs alone (one teacher forward + 3x cost per step each)
    (seed,) = res["per_seed"]
    assert q.steps * 2 < seed["compute_elastic"] < q.steps * 4  # 1 + 3 x cost in (1/3, 1] for one budget
    assert "training compute, elastic / the K-1 runs alone" in res["table"]

    # a candidate (--set, --label): the same parent, its own folder, its settings used; the runs alone of the
    # same submodels (same optimizer settings) come from the cache, so they are the same numbers
    cand = fid.main(["--quick", "--seeds", "0", "--out", str(out), "--label", "two", "--set",
                     "budgets_per_step=2", "full_weight=2.0"])
    assert (out / "two" / "results.json").is_file() and cand["over"] == {"budgets_per_step": 2, "full_weight": 2.0}
    log = [json.loads(ln) for ln in (out / "two" / "seed0" / "elastic" / "train" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 * q.steps and {r["step"] for r in log} == set(range(q.steps))  # two budgets per step
    assert cand["per_seed"][0]["compute_elastic"] > seed["compute_elastic"]
    for a, b in zip(cand["per_seed"][0]["budgets"], seed["budgets"], strict=True):
        if a["fraction"] < 1.0 and a["params"] == b["params"]:
            assert a["alone_T"] == b["alone_T"]

    # a second run reuses the cached parent (same sizes): the same weights, no pretraining
    import torch

    info = json.loads((out / "parent" / "fidelity_parent.json").read_text())
    reused, again = fid.sorted_parent(out, q, torch.zeros(0, dtype=torch.long))  # no data: it must not train
    assert again == info
    for a, b in zip(reused.state_dict().values(), parent.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bad_cli_input_exits_2(tmp_path):
    fid = _recipe()
    (tmp_path / "f").write_text("x")
    for argv in (["--out", str(tmp_path / "f")], ["--seeds", "0", "0"], ["--threads", "0"], ["--set", "nope=1"],
                 ["--set", "budgets_per_step=9"], ["--set", "lr_schedule"]):
        with pytest.raises(SystemExit) as e:
            fid.main([*argv, "--quick"])
        assert e.value.code == 2


def test_smollm2_recipe_checks_its_settings_before_writing(tmp_path, monkeypatch):
    """The SmolLM2 recipe's --set / --steps are validated (ElasticConfig) before its output folder exists."""
    monkeypatch.syspath_prepend(str(RECIPE.parent))  # it imports the protocol's helpers (`from fidelity ...`)
    spec = importlib.util.spec_from_file_location("smollm2_recipe", RECIPE.parent / "smollm2_elastic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "smol"
    for argv in (["--set", "nope=1"], ["--set", "budgets_per_step=9"], ["--set", "lr_schedule=linear"],
                 ["--steps", "1", "--set", "budgets_per_step=0"]):
        with pytest.raises(SystemExit) as e:
            mod.main(["--out", str(out), *argv])
        assert e.value.code == 2
        assert not out.exists()
