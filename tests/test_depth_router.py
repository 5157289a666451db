"""Depth as a router axis: choices["depth"] (depth units kept) resolved and validated against the model, the
router's cost exact at one-hots and the exact expectation for soft weights, the hard depth+width forward
equal to the extracted submodel, a tiny elastify run that drops units, the checkpoint round trip (load,
slice, interpolate) and bit-exact resume."""

from __future__ import annotations

import itertools
import json
import math

import conftest
import pytest
import torch
from conftest import onehots, randomize_, tiny_hybrid_config, train_log
from conftest import tiny_ids as ids_
from conftest import token_stream as stream
from torch.testing import assert_close

import nestlm
from nestlm import ConfigError, ElasticConfig, SubArch
from nestlm.arch import depth_units, unit_order
from nestlm.convert import CheckpointError
from nestlm.elastic.losses import kd_loss
from nestlm.elastic.router import Router
from nestlm.elastic.train import prepare
from nestlm.load import load_elastic
from nestlm.model.extract import extract

pytestmark = pytest.mark.usefixtures("one_thread")

PATTERN = "M*-EM*-E"  # 8 single-block depth units of every kind
ORDER = [3, 0, 7, 5, 1, 2, 4, 6]  # an explicit removal order (least important first) for the router tests
CHOICES = {"hidden": [1.0, 0.75, 0.5], "ffn": [1.0, 0.5], "experts": [1.0, 0.5], "mamba_heads_per_group": [1.0, 0.5],
           "depth": [1.0, 0.75, 0.5]}
TRAIN_AXES = {"hidden": [1.0, 0.875, 0.75, 0.625, 0.5], "ffn": [1.0, 0.5], "mamba_heads_per_group": [1.0, 0.5],
              "depth": [1.0, 0.875, 0.75]}


def hybrid_cfg(pattern=PATTERN, **over):
    return tiny_hybrid_config(pattern=pattern, **over)


def router_(cfg=None, choices=CHOICES, order=ORDER, **kw):
    cfg = cfg or hybrid_cfg()
    return Router(cfg, ElasticConfig(choices=choices, depth_order=order, **kw))


def every_choice(router):
    for idx in itertools.product(*[range(len(router.choices[a])) for a in router.axes]):
        yield dict(zip(router.axes, idx, strict=True))


# ---------------------------------------------------------------------------------------------- config
def test_depth_is_opt_in_and_resolves_to_unit_counts():
    cfg = hybrid_cfg()
    assert "depth" not in ElasticConfig().choices and not ElasticConfig().depth_axis
    wide = hybrid_cfg(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, shared_intermediate_size=32)
    assert "depth" not in Router(wide, ElasticConfig()).axes  # the default choices: widths only, as before
    ecfg = ElasticConfig(choices={"hidden": [1.0, 0.5], "depth": [1.0, 0.9, 0.75, 0.6]})
    assert ecfg.resolve_choices(cfg) == {"hidden": [32, 16], "depth": [8, 7, 6, 5]}  # 7.2 -> 7, 4.8 -> 5
    assert ElasticConfig(choices={"depth": [8, 5, 2]}).resolve_choices(cfg) == {"depth": [8, 5, 2]}
    assert ElasticConfig(choices={"depth": [1.0, 0.8125, 0.6875]}).resolve_choices(cfg) == {"depth": [8, 7, 6]}  # halves up
    only = ElasticConfig(choices={"hidden": [1.0, 0.5], "depth": [1.0, 0.5]}, axes=["hidden"])
    assert not only.depth_axis and "depth" not in only.resolve_choices(cfg)
    paired = hybrid_cfg(family="llama", pattern="*-*-*-")  # a depth unit is an attention+MLP pair
    assert ElasticConfig(choices={"depth": [1.0, 2 / 3, 1 / 3]}).resolve_choices(paired) == {"depth": [3, 2, 1]}


@pytest.mark.parametrize("kw, match", [
    (dict(choices={"depth": [8, 8, 6]}), r"choices\['depth'\] must be strictly decreasing"),
    (dict(choices={"depth": [1.0, 0.5]}, mode="soft"), "the depth axis needs mode: hard"),
    (dict(choices={"depth": [1.0, 0.5]}, depth_order="backwards"), "depth_order must be a list"),
])
def test_bad_depth_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        ElasticConfig(**kw)


@pytest.mark.parametrize("choices, order, match", [
    ({"depth": [1.0, 0.9, 0.85]}, None, r"choices\['depth'\] = \[1.0, 0.9, 0.85\] gives unit counts \[8, 7, 7\] "
                                        r"\(of 8 depth units\): they must be strictly decreasing"),
    ({"depth": [0.875, 0.75]}, None, r"choices\['depth'\] = \[0.875, 0.75\] must start with all 8 depth units"),
    ({"depth": [7, 6]}, None, "must start with all 8 depth units"),
    ({"depth": [9, 6]}, None, r"gives unit counts \[9, 6\], outside 1..8 \(the model has 8 depth units\)"),
    ({"depth": [1.0, 0.05]}, None, r"unit counts \[8, 0\], outside 1..8"),
    ({"depth": [1.0, 0.5]}, [0, 1, 2], "depth_order .* must hold each of the model's 8 depth units 0..7 once"),
    ({"depth": [1.0, 0.5]}, [0, 1, 2, 3, 4, 5, 6, 6], "must hold each of the model's 8 depth units"),
])
def test_depth_choices_validated_against_the_model(choices, order, match):
    with pytest.raises(ConfigError, match=match):
        ElasticConfig(choices=choices, depth_order=order).resolve_choices(hybrid_cfg())


def test_router_needs_the_depth_order():
    with pytest.raises(ConfigError, match="the depth axis needs depth_order"):
        Router(hybrid_cfg(), ElasticConfig(choices=CHOICES))
    Router(hybrid_cfg(), ElasticConfig(choices={"hidden": [1.0, 0.5]}))  # without depth: no order needed


# ---------------------------------------------------------------------------------------------- router
def test_depth_choice_keeps_the_most_important_units():
    r = router_()
    assert r.choices["depth"] == [8, 6, 4]
    assert r.layers_kept(8) is None  # all units: SubArch's default
    assert r.layers_kept(6) == (1, 2, 4, 5, 6, 7)  # units 3 and 0 go first
    assert r.layers_kept(4) == (1, 2, 4, 6)
    sub = r.subarch(onehots(r, {"hidden": 1, "ffn": 0, "experts": 1, "mamba_heads_per_group": 0, "depth": 2}))
    assert sub == SubArch(hidden=24, ffn=48, experts=2, mamba_heads_per_group=4, layers=(1, 2, 4, 6))
    paired = router_(hybrid_cfg(family="llama", pattern="*-*-*-"), choices={"hidden": [1.0, 0.5], "depth": [3, 2, 1]},
                     order=[1, 2, 0])
    assert [paired.layers_kept(n) for n in (3, 2, 1)] == [None, (0, 1, 4, 5), (0, 1)]  # whole pairs go


@pytest.mark.parametrize("metric", ["params", "active", "memory"])
def test_cost_at_every_one_hot_equals_the_counter(metric):
    cfg = hybrid_cfg()
    r = router_(cfg, metric=metric, memory_seq_len=64)
    n = 0
    for idx in every_choice(r):  # 3 * 2 * 2 * 2 * 3 = 72 architectures, brute force
        w = onehots(r, idx)
        sub = r.subarch(w)
        want = {"params": nestlm.count_params(cfg, sub), "active": nestlm.count_active_params(cfg, sub),
                "memory": nestlm.count_memory(cfg, sub, seq_len=64)["total"]}[metric]
        assert float(r.cost(w)) == want, (idx, sub)
        assert float(r.combo_costs()[tuple(idx.values())]) == pytest.approx(want / r.full_cost, rel=1e-12)
        n += 1
    assert n == 72
    assert r.full_cost == float(r.cost(r.full_weights()))


def test_cost_is_exact_for_a_paired_family():
    cfg = hybrid_cfg(family="llama", pattern="*-*-*-")
    r = router_(cfg, choices={"hidden": [1.0, 0.5], "ffn": [1.0, 0.5], "depth": [3, 2, 1]}, order=[2, 0, 1])
    for idx in every_choice(r):
        w = onehots(r, idx)
        assert float(r.cost(w)) == nestlm.count_params(cfg, r.subarch(w))


def test_soft_cost_is_the_brute_force_expectation():
    cfg = hybrid_cfg()
    r = router_(cfg)
    g = torch.Generator().manual_seed(0)
    # float64 weights: each axis's weights sum to 1 to rounding (float32 ones are off by ~1e-7, and the
    # brute force multiplies the embedding cost by every axis's sum where `cost` uses the hidden axis's only)
    w = {ax: torch.softmax(torch.randn(len(c), generator=g, dtype=torch.float64), -1) for ax, c in r.choices.items()}
    brute = 0.0
    for idx in every_choice(r):
        p = math.prod(float(w[a][i]) for a, i in idx.items())
        brute += p * nestlm.count_params(cfg, r.at(idx))
    assert float(r.cost(w)) == pytest.approx(brute, rel=1e-12)

    def loss(c):
        return (c - 0.6).abs()

    brute_loss = sum(math.prod(float(w[a][i]) for a, i in idx.items()) * float(loss(r.cost_ratio(onehots(r, idx))))
                     for idx in every_choice(r))
    assert float(r.expected_loss(w, loss)) == pytest.approx(brute_loss, rel=1e-9)


def test_hard_depth_forward_equals_the_extracted_model_and_trains_the_depth_axis():
    model = randomize_(nestlm.Decoder(hybrid_cfg()), seed=3)
    r = router_(model.cfg, budgets=[1.0, 0.5])
    for seed in range(100):  # a sampled architecture that cuts depth and some width
        torch.manual_seed(seed)
        w = r.sample(1, tau=1.0, scale=1.0)
        sub = r.subarch(w)
        if sub.layers is not None and sub.hidden != 32:
            break
    assert sub.layers is not None and len(sub.layers) < 8 and sub.hidden < 32, sub
    ids = ids_(seed=4)
    logits = model(ids, sub=sub, gate=r.gate(w))
    with torch.no_grad():
        assert_close(logits, extract(model, sub)(ids), atol=2e-5, rtol=1e-4)
    logits.logsumexp(-1).mean().backward()  # the KD path: the gate's straight-through weights
    d, n = r.axes.index("depth"), len(r.choices["depth"])
    assert r.w2.grad[d, :n].abs().sum() > 0 and r.w2.grad[d, n:].abs().sum() == 0
    r.zero_grad(set_to_none=True)
    r.cost_ratio(r.probs(1)).backward()  # the budget path: the expected cost
    assert r.w2.grad[d, :n].abs().sum() > 0


def test_decode_and_interpolate_choose_depth():
    r = router_(budgets=[1.0, 0.8, 0.45])
    for bi in (1, 2):  # decode searches depth like any axis: it lands wherever some architecture does
        best = float(conftest.relative_deviation(r, bi).min())
        sub = r.subarch(r.decode(bi, tol=0.02))
        assert abs(nestlm.count_params(r.cfg, sub) / r.full_cost / r.budgets[bi] - 1) <= max(0.02, best + 1e-9)
    with torch.no_grad():  # a router that prefers the fewest units: greedy and interpolate drop them
        r.b2[r.axes.index("depth"), :3] = torch.tensor([-50.0, -50.0, 50.0])
    assert r.subarch(r.greedy(1)).layers == (1, 2, 4, 6)
    assert r.interpolate(0.6).layers == (1, 2, 4, 6) and r.interpolate(1.0) == SubArch()


def test_unit_order_is_least_important_first():
    cfg = hybrid_cfg(family="llama", pattern="*-*-*-")
    assert depth_units(cfg) == [[0, 1], [2, 3], [4, 5]]
    assert unit_order(cfg, [5.0, 1.0, 0.5, 0.1, 3.0, 3.0]) == [1, 0, 2]  # pairs: 6.0, 0.6, 6.0 (a tie keeps order)
    with pytest.raises(ConfigError, match="6 blocks"):
        unit_order(cfg, [1.0, 2.0])


# ---------------------------------------------------------------------------------------------- training
def tiny_run_config(**over):
    return conftest.tiny_run_config(over.pop("choices", TRAIN_AXES), **over)


def parent():
    return randomize_(nestlm.Decoder(hybrid_cfg()), seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("depth")
    ecfg = tiny_run_config()
    nestlm.elastify(ecfg, parent(), stream(), out, progress=False)
    return out, ecfg


def test_prepare_scores_the_depth_order_deterministically():
    ecfg = tiny_run_config()
    _, _, a = prepare(ecfg, parent(), stream())
    _, _, b = prepare(ecfg, parent(), stream())
    assert ecfg.depth_order is None  # the caller's config is left alone; the router's holds the order
    assert a.depth_order == b.depth_order and sorted(a.depth_order) == list(range(8))
    assert a.ecfg.depth_order == a.depth_order and a.ecfg == b.ecfg
    from nestlm.elastic.importance import importance  # the order is the depth study's, least important first
    calib = [stream()[i * 64:(i + 1) * 64].view(4, 16) for i in range(2)]
    scores = importance(parent().float(), calib, layer_batches=2, progress=False)
    assert a.depth_order == scores["layers"].argsort(stable=True).tolist()
    given = tiny_run_config(depth_order=list(reversed(a.depth_order)), sort=False)
    assert prepare(given, parent(), stream())[2].depth_order == given.depth_order  # a given order is kept


def test_qad_checks_only_the_width_axes():
    """QAD checks every choice's quantized input widths; depth changes none (and is no SubArch field)."""
    ecfg = tiny_run_config(quant="fp8", choices={"hidden": [1.0, 0.5], "depth": [1.0, 0.75]})
    _, _, r = prepare(ecfg, parent(), stream())
    assert r.axes == ["hidden", "depth"] and r.choices["depth"] == [8, 6]


def test_tiny_depth_run_kl_falls_costs_land_and_units_drop(trained):
    out, ecfg = trained
    model, router, manifest = load_elastic(out)
    assert list(manifest["budgets"]) == ["full", "75%", "64%"]
    assert manifest["choices"]["depth"] == [8, 7, 6]
    _, teacher, _ = prepare(ecfg, parent(), stream())
    held_out = stream(600, seed=9)[:576].view(6, 96)
    dropped = []
    with torch.no_grad():
        t_logits = teacher(held_out)
        for name, b in manifest["budgets"].items():
            assert b["cost_ratio"] == pytest.approx(b["fraction"], rel=0.02), name
            sub = SubArch.from_dict(b["sub"])
            assert b["params"] == nestlm.count_params(model.cfg, sub)
            if sub.layers is not None:
                dropped.append(name)
            if name == "full":
                continue
            before = float(kd_loss(teacher(held_out, sub=sub), t_logits))
            after = float(kd_loss(model(held_out, sub=sub), t_logits))
            assert after < 0.8 * before, (name, before, after)
    assert dropped, manifest["budgets"]  # some budget keeps fewer units than the parent has
    log = train_log(out)  # the default (budgets_per_step None): every budget on every batch, largest first
    assert [(r["step"], r["budget"]) for r in log] == [(s, b) for s in range(ecfg.steps)
                                                       for b in manifest["budgets"]]
    assert all("depth" in r["sub"] for r in log)
    assert {r["sub"]["depth"] for r in log if r["budget"] != "full"} > {8}  # training sampled shallower models
    for name in ("75%", "64%"):
        kd = [r["kd"] for r in log if r["budget"] == name]
        q = len(kd) // 4
        assert sum(kd[-q:]) < sum(kd[:q]), name  # the training KL of each budget falls


def test_load_elastic_rebuilds_the_same_router(trained):
    out, ecfg = trained
    model, router, manifest = load_elastic(out)
    saved = ElasticConfig.from_dict(manifest["elastic"])
    _, _, fresh = prepare(ecfg, parent(), stream())  # what training built: the same order, the same config
    assert saved == fresh.ecfg and router.depth_order == fresh.depth_order == saved.depth_order
    assert torch.equal(router.combo_costs(), fresh.combo_costs())
    for i, (name, b) in enumerate(manifest["budgets"].items()):
        want = SubArch() if i == 0 else router.subarch(router.decode(i, saved.landing_tolerance))
        assert SubArch.from_dict(b["sub"]) == want, name


def test_sliced_depth_budgets_equal_the_elastic_forward(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    import nestlm.slicing as slicing

    out, _ = trained
    model, router, manifest = load_elastic(out)
    ids = ids_(seed=5)
    # every manifest budget, and one between them that the loaded router interpolates (depth included)
    cases = [(name, SubArch.from_dict(b["sub"])) for name, b in manifest["budgets"].items()]
    cases.append((0.66, router.interpolate(0.66, router.ecfg.landing_tolerance)))  # as slice does
    for budget, sub in cases:
        dst = slicing.slice(out, budget, tmp_path / str(budget).replace("%", "p"))
        hf = AutoModelForCausalLM.from_pretrained(dst).eval()
        small = nestlm.from_hf(dst)
        assert small.cfg.n_blocks == len(sub.resolve(model.cfg).layers)
        with torch.no_grad():
            want = model(ids, sub=sub)
            assert_close(small(ids), want, atol=2e-5, rtol=1e-4)
            assert_close(hf(ids).logits, want, atol=2e-5, rtol=1e-4)


def test_load_elastic_refuses_a_depth_manifest_without_its_order(trained, tmp_path):
    import shutil

    out, _ = trained
    shutil.copytree(out, tmp_path / "e", ignore=shutil.ignore_patterns("train"))
    mf = tmp_path / "e" / "nestlm_elastic.json"
    m = json.loads(mf.read_text())
    m["elastic"]["depth_order"] = None
    mf.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="the depth axis needs depth_order"):
        load_elastic(tmp_path / "e")


def test_depth_resume_gives_bit_identical_losses(tmp_path):
    ecfg = tiny_run_config(steps=10, checkpoint_every=3, grad_accum=2, batch=2, budgets=[1.0, 0.7], p_full=0.1)
    nestlm.elastify(ecfg, parent(), stream(), tmp_path / "a", progress=False)
    nestlm.elastify(ecfg, parent(), stream(), tmp_path / "b", progress=False, max_steps=7)
    assert not (tmp_path / "b" / "nestlm_elastic.json").exists()
    nestlm.elastify(ecfg, parent(), stream(), tmp_path / "b", progress=False)
    a, b = train_log(tmp_path / "a"), train_log(tmp_path / "b")
    assert [r["step"] for r in b] == [s for s in range(10) for _ in range(2)]  # both budgets every step
    assert a == b  # every loss, budget, choice (depth included) and ratio, bit for bit
    ma, mb = (json.loads((tmp_path / d / "nestlm_elastic.json").read_text()) for d in "ab")
    assert ma == mb
    sa = load_elastic(tmp_path / "a")[0].state_dict()
    sb = load_elastic(tmp_path / "b")[0].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_refuses_another_depth_order(tmp_path):
    """Without sorting, the parent's fingerprint doesn't see the calibration data; the depth order does."""
    ecfg = tiny_run_config(steps=4, sort=False)
    nestlm.elastify(ecfg, parent(), stream(), tmp_path, progress=False, max_steps=2)
    order = prepare(ecfg, parent(), stream())[2].depth_order
    seed = next(s for s in range(1, 9) if prepare(ecfg, parent(), stream(seed=s))[2].depth_order != order)
    with pytest.raises(ConfigError, match=r"another ElasticConfig \(it differs in \['depth_order'\]\)"):
        nestlm.elastify(ecfg, parent(), stream(seed=seed), tmp_path, progress=False)
