"""Elastic distillation: ElasticConfig validation, the router's cost and choices, hard (sliced) and soft
(masked) student forwards, a tiny end-to-end run, bit-exact resume, and the elastic checkpoint round trip."""

from __future__ import annotations

import math
import random

import conftest
import pytest
import torch
import torch.nn.functional as F
from conftest import onehots, randomize_, tiny_hybrid_config, train_log
from conftest import tiny_ids as ids_
from conftest import token_stream as stream
from torch.testing import assert_close

import nestlm
from nestlm import ConfigError, ElasticConfig, SubArch
from nestlm.elastic.artifact import resolve_budget
from nestlm.elastic.losses import kd_loss, router_loss
from nestlm.elastic.router import Router
from nestlm.load import load_elastic
from nestlm.model.extract import extract

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_AXES = {"hidden": [1.0, 0.75, 0.5], "ffn": [1.0, 0.5], "mamba_heads_per_group": [1.0, 0.5],
            "attn_heads_per_group": [1.0, 0.5], "moe_ffn": [1.0, 0.5], "shared_ffn": [1.0, 2 / 3],
            "experts": [1.0, 0.5]}
# the training runs: a fine-grained hidden axis makes the cost landscape dense enough to land within 2%
TRAIN_AXES = {"hidden": [1.0, 0.875, 0.75, 0.625, 0.5], "ffn": [1.0, 0.5], "mamba_heads_per_group": [1.0, 0.5]}


def hybrid_cfg(pattern="M*-EM*-E", **over):
    return tiny_hybrid_config(pattern=pattern, **over)


# ---------------------------------------------------------------------------------------------- config
def test_config_yaml_round_trip(tmp_path):
    c = ElasticConfig(budgets=[1.0, 0.6], choices=ALL_AXES, stage2_weights=[0.7, 0.3], steps=7)
    c.save(tmp_path / "e.yaml")
    assert ElasticConfig.load(tmp_path / "e.yaml") == c
    assert c.resolve_choices(hybrid_cfg())["shared_ffn"] == [24, 16]


@pytest.mark.parametrize("kw, match", [
    (dict(budgets=[1.0, 0.5, 0.7]), "strictly decreasing"),
    (dict(budgets=[1.2]), r"in \(0, 1\]"),
    (dict(metric="flops"), "metric must be one of"),
    (dict(choices={"hidden": [1.0, 0.9, 0.95]}), "strictly decreasing"),
    (dict(choices={"width": [1.0]}), "unknown axes"),
    (dict(budgets=[1.0, 0.5], stage2_weights=[1.0]), "stage2_weights has 1 entries for 2 budgets"),
    (dict(tau_start=0.1, tau_end=1.0), "tau_end <= tau_start"),
    (dict(steps=0), "steps must be an int >= 1"),
])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        ElasticConfig(**kw)


@pytest.mark.parametrize("choices, match", [
    ({"hidden": [1.0, 0.875]}, "28 channels .* not a multiple of align=8"),
    ({"mamba_heads_per_group": [1.0, 0.6]}, "not a whole number"),
    ({"experts": [1.0, 0.25]}, "fewer than top_k=2"),
    ({"hidden": [0.75, 0.5]}, "must start with the full width 32"),
    ({"ffn": [100, 24]}, "outside 1..48"),
    ({"ffn": [1.0, 48]}, "must be strictly decreasing"),
])
def test_choices_validated_against_the_model(choices, match):
    with pytest.raises(ConfigError, match=match):
        ElasticConfig(choices=choices).resolve_choices(hybrid_cfg())
    with pytest.raises(ConfigError, match="elastic but the model has no such width"):
        ElasticConfig(axes=["experts"], choices={"experts": [1.0]}).resolve_choices(hybrid_cfg(pattern="M*-"))


def test_load_reports_unknown_keys_and_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("budgets: [1.0, 0.5]\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match="unknown keys \\['learning_rate'\\]"):
        ElasticConfig.load(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("budgets: [1.0, 0.5\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ElasticConfig.load(tmp_path / "b.yaml")


# ---------------------------------------------------------------------------------------------- router
@pytest.mark.parametrize("metric", ["params", "active", "memory"])
def test_cost_at_one_hot_equals_the_counter(metric):
    cfg = hybrid_cfg()
    r = Router(cfg, ElasticConfig(choices=ALL_AXES, metric=metric, memory_seq_len=64))
    rng = random.Random(0)
    for _ in range(25):
        idx = {ax: rng.randrange(len(ch)) for ax, ch in r.choices.items()}
        w = onehots(r, idx)
        sub = r.subarch(w)
        want = {"params": nestlm.count_params(cfg, sub), "active": nestlm.count_active_params(cfg, sub),
                "memory": nestlm.count_memory(cfg, sub, seq_len=64)["total"]}[metric]
        assert float(r.cost(w)) == want
    assert r.full_cost == float(r.cost(r.full_weights()))


def test_soft_cost_is_the_expectation():
    cfg = hybrid_cfg()
    r = Router(cfg, ElasticConfig(choices={"hidden": [1.0, 0.5], "ffn": [1.0, 0.5]}))
    w = {"hidden": torch.tensor([0.3, 0.7]), "ffn": torch.tensor([0.6, 0.4])}
    want = sum(w["hidden"][i] * w["ffn"][j] * nestlm.count_params(cfg, SubArch(hidden=h, ffn=f))
               for i, h in enumerate([32, 16]) for j, f in enumerate([48, 24]))
    assert_close(r.cost(w), want.double())


def test_sample_pins_full_and_interpolates():
    cfg = hybrid_cfg()
    r = Router(cfg, ElasticConfig(budgets=[1.0, 0.7, 0.4], choices=ALL_AXES))
    w = r.sample(0, tau=0.5, scale=2.0)
    assert r.subarch(w).resolve(cfg) == SubArch.full(cfg) and float(r.gate(w)) == 1.0
    torch.manual_seed(0)
    w = r.sample(1, tau=0.5, scale=2.0)
    assert all(float(v.detach().sum()) == pytest.approx(1.0) and v.max() == 1.0 for v in w.values())
    assert r.interpolate(1.0) == SubArch()
    assert r.interpolate(0.7) == r.subarch(r.greedy(1))
    assert r.interpolate(0.1) == r.subarch(r.greedy(2))  # below the trained range: clamp
    r.interpolate(0.55).resolve(cfg)  # between: a valid SubArch


def test_interpolation_with_a_tolerance_is_the_most_probable_landing_architecture():
    """interpolate(frac, tol): brute force over every combination, under the blended logits at the
    end-of-training sharpness, against the router's pick; the pick's cost lands when any combination does."""
    import itertools

    cfg = hybrid_cfg()
    ecfg = ElasticConfig(budgets=[1.0, 0.8, 0.5], choices={"hidden": [32, 24, 16], "ffn": [48, 32, 16],
                                                           "experts": [4, 3, 2]}, align=8)
    r = Router(cfg, ecfg)
    sharp = ecfg.scale_end / ecfg.tau_end
    for seed, frac in itertools.product(range(4), (0.75, 0.65, 0.55)):
        torch.manual_seed(seed)
        r.reset_parameters()
        a = (frac - 0.5) / (0.8 - 0.5)
        lg = {ax: v.detach() for ax, v in r.logits(a * r.onehot(1) + (1 - a) * r.onehot(2)).items()}
        best, best_lp, nearest, nearest_dev = None, -math.inf, None, math.inf
        for idx in itertools.product(*[range(len(r.choices[ax])) for ax in r.axes]):
            pick = dict(zip(r.axes, idx, strict=True))
            dev = abs(float(r.cost_ratio(onehots(r, pick))) / frac - 1)
            lp = sum(float(F.log_softmax(lg[ax].double() * sharp, -1)[i]) for ax, i in pick.items())
            if dev <= 0.03 and lp > best_lp:
                best, best_lp = pick, lp
            if dev < nearest_dev:
                nearest, nearest_dev = pick, dev
        got = r.interpolate(frac, tol=0.03)
        assert got == r.at(best or nearest), (seed, frac)
        if best is not None:
            assert abs(nestlm.count_params(cfg, got) / nestlm.count_params(cfg) / frac - 1) <= 0.03


def test_losses():
    s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    assert float(kd_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    ref = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="sum") / 6 * 4
    assert_close(kd_loss(s, t, 2.0), ref)
    assert float(router_loss(torch.tensor(0.5), 0.5)) == 0
    assert float(router_loss(torch.tensor(0.55), 0.5, weight=2.0, dead_zone=0.05)) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------- student forwards
@pytest.fixture(scope="module")
def model():
    return randomize_(nestlm.Decoder(hybrid_cfg()), seed=3)


def test_hard_forward_is_the_sliced_model_and_reaches_the_router(model):
    r = Router(model.cfg, ElasticConfig(budgets=[1.0, 0.6], choices=ALL_AXES))
    ids = ids_()
    torch.manual_seed(1)
    w = r.sample(1, tau=1.0, scale=1.0)
    sub = r.subarch(w)
    out = model(ids, sub=sub, gate=r.gate(w))
    with torch.no_grad():
        assert_close(out, extract(model, sub)(ids) * 1.0, atol=2e-5, rtol=1e-4)
    (out.logsumexp(-1).mean() + r.cost_ratio(w)).backward()
    for a, ax in enumerate(r.axes):  # every axis's own first layer
        assert r.w1.grad is not None and r.w1.grad[a].abs().sum() > 0, ax
    # the gate on the final hidden state gives the gradients of scaling the logits (the lm_head is linear)
    grads = {n: p.grad.clone() for n, p in [*model.named_parameters(), *r.named_parameters()] if p.grad is not None}
    model.zero_grad(set_to_none=True)
    r.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    w = r.sample(1, tau=1.0, scale=1.0)  # the same draw, a fresh graph
    ((model(ids, sub=sub) * r.gate(w)).logsumexp(-1).mean() + r.cost_ratio(w)).backward()
    for n, p in [*model.named_parameters(), *r.named_parameters()]:
        if n in grads:
            assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5, msg=n)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("tied", [False, True])
def test_sliced_backward_equals_the_extracted_models_gradients(tied):
    """The sliced forward's weight gradients (nestlm.model.layers.prefix writes them into one zero-filled
    tensor per weight) are the standalone submodel's gradients, in place, and zero everywhere else."""
    import copy

    from nestlm.model.extract import sliced_state_dict

    model = randomize_(nestlm.Decoder(hybrid_cfg(tie_embeddings=tied)), seed=4)
    sub = SubArch(hidden=24, attn_heads_per_group=1, mamba_heads_per_group=3, ffn=32, moe_ffn=8, shared_ffn=16,
                  experts=3, layers=(0, 1, 2, 3, 5, 6, 7))
    small = extract(model, sub)
    ids = ids_(t=16)
    model(ids, sub=sub).logsumexp(-1).mean().backward()
    small(ids).logsumexp(-1).mean().backward()
    grads = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(grads.parameters(), model.parameters(), strict=True):
            p.copy_(g.grad if g.grad is not None else torch.zeros_like(p))
    want = {n: p.grad for n, p in small.named_parameters()}
    got = {n: t for n, t in sliced_state_dict(grads, sub).items() if n in want}  # (not the buffers)
    assert set(got) == set(want)
    for n in want:
        assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=n)
    outside = sum(float(g.grad.abs().sum()) for g in model.parameters() if g.grad is not None) - sum(
        float(g.abs().sum()) for g in got.values())
    assert abs(outside) < 1e-4  # nothing outside the submodel's prefixes got a gradient


def test_prefix_is_plain_slicing():
    from nestlm.model.layers import prefix

    w = torch.randn(6, 5, 4, requires_grad=True)
    g = torch.randn(3, 5, 2)
    assert prefix(w, None, 9, None) is w  # nothing cut: the weight itself
    (prefix(w, 3, None, 2) * g).sum().backward()
    ref = torch.zeros_like(w)
    ref[:3, :, :2] = g
    assert torch.equal(w.grad, ref)
    with torch.no_grad():
        assert torch.equal(prefix(w, 2, 1), w[:2, :1])


@pytest.mark.parametrize("axes", [("hidden",), ("ffn",), ("moe_ffn", "shared_ffn"), ("attn_heads_per_group",),
                                  ("mamba_heads_per_group",), ("experts",), tuple(ALL_AXES)])
def test_one_hot_masks_equal_the_sliced_forward(model, axes):
    r = Router(model.cfg, ElasticConfig(choices={a: ALL_AXES[a] for a in axes}))
    w = onehots(r, {ax: len(r.choices[ax]) - 1 for ax in r.choices})  # the smallest choice everywhere
    ids = ids_(seed=4)
    with torch.no_grad():
        assert_close(model(ids, masks=r.masks(w)), model(ids, sub=r.subarch(w)), atol=2e-5, rtol=1e-4)
        full = {ax: torch.ones(r.choices[ax][0]) for ax in r.choices}  # all-ones masks: the full model
        assert_close(model(ids, masks=full), model(ids), atol=2e-5, rtol=1e-4)


def test_soft_masks_pass_gradients_to_every_axis(model):
    r = Router(model.cfg, ElasticConfig(budgets=[1.0, 0.6], choices=ALL_AXES))
    torch.manual_seed(0)
    w = r.sample(1, tau=1.0, scale=1.0, hard=False)
    model(ids_(), masks=r.masks(w)).logsumexp(-1).mean().backward()
    for a, ax in enumerate(r.axes):  # every axis's own output layer, real choices only
        assert r.w2.grad[a, : len(r.choices[ax])].abs().sum() > 0, ax
        assert r.w2.grad[a, len(r.choices[ax]):].abs().sum() == 0, ax
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- training
def tiny_run_config(**over):
    return conftest.tiny_run_config(over.pop("choices", TRAIN_AXES), **over)


def parent():
    return randomize_(nestlm.Decoder(hybrid_cfg(pattern="M*-E")), seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    ecfg = tiny_run_config()
    nestlm.elastify(ecfg, parent(), stream(), out, progress=False)
    return out, ecfg


def test_tiny_run_kl_falls_and_costs_land_on_budget(trained):
    out, ecfg = trained
    model, router, manifest = load_elastic(out)
    assert list(manifest["budgets"]) == ["full", "75%", "64%"]
    # the teacher: the sorted parent (elastify sorts before distilling), rebuilt here the same way
    from nestlm.elastic.train import prepare
    _, teacher, _ = prepare(ecfg, parent(), stream())
    held_out = stream(600, seed=9)[:576].view(6, 96)
    with torch.no_grad():
        t_logits = teacher(held_out)
        for name, b in manifest["budgets"].items():
            assert b["cost_ratio"] == pytest.approx(b["fraction"], rel=0.02), name
            sub = SubArch.from_dict(b["sub"])
            assert b["params"] == nestlm.count_params(model.cfg, sub)
            if name == "full":
                continue
            before = float(kd_loss(teacher(held_out, sub=sub), t_logits))
            after = float(kd_loss(model(held_out, sub=sub), t_logits))
            assert after < 0.8 * before, (name, before, after)
    log = train_log(out)  # the default (budgets_per_step None): every budget on every batch, largest first
    assert [(r["step"], r["budget"]) for r in log] == [(s, b) for s in range(ecfg.steps)
                                                       for b in manifest["budgets"]]
    for name in ("75%", "64%"):
        kd = [r["kd"] for r in log if r["budget"] == name]
        q = len(kd) // 4
        assert sum(kd[-q:]) < sum(kd[:q]), name  # the training KL of each budget falls


def test_elastic_checkpoint_round_trip_and_exports_load_in_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    out, ecfg = trained
    model, router, manifest = load_elastic(out)
    assert manifest["version"] == 1 and manifest["family"] == "nemotron_h" and manifest["metric"] == "params"
    assert ElasticConfig.from_dict(manifest["elastic"]) == ecfg
    for i, name in enumerate(manifest["budgets"]):  # the loaded router reproduces the manifest's choices
        sub = resolve_budget(None, name, manifest=manifest)[1]
        assert sub == (SubArch() if i == 0 else router.subarch(router.greedy(i)))
    ids = ids_(seed=5)
    for name in manifest["budgets"]:
        sub = resolve_budget(None, name, manifest=manifest)[1]
        d = nestlm.to_hf(model, tmp_path / name.replace("%", "p"), sub=sub)
        hf = AutoModelForCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            assert_close(hf(ids).logits, model(ids, sub=sub), atol=2e-5, rtol=1e-4)


def test_resume_gives_bit_identical_losses(tmp_path):
    ecfg = tiny_run_config(steps=10, checkpoint_every=3, grad_accum=2, batch=2, stage2_start=0.5,
                           stage2_weights=[0.2, 0.4, 0.4], stage2_seq_len=24)
    nestlm.elastify(ecfg, parent(), stream(), tmp_path / "a", progress=False)
    nestlm.elastify(ecfg, parent(), stream(), tmp_path / "b", progress=False, max_steps=7)
    assert not (tmp_path / "b" / "nestlm_elastic.json").exists()  # stopped early: no export yet
    nestlm.elastify(ecfg, parent(), stream(), tmp_path / "b", progress=False)

    def log(d):
        return train_log(d)

    a, b = log(tmp_path / "a"), log(tmp_path / "b")
    assert [r["step"] for r in b] == [s for s in range(10) for _ in range(3)]  # every budget every step
    assert a == b  # every loss, budget, choice and ratio, bit for bit
    assert {r["seq_len"] for r in a} == {16, 24}
    sa = load_elastic(tmp_path / "a")[0].state_dict()
    sb = load_elastic(tmp_path / "b")[0].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_refuses_another_parent(tmp_path):
    ecfg = tiny_run_config(steps=4)
    nestlm.elastify(ecfg, parent(), stream(), tmp_path, progress=False, max_steps=2)
    other = randomize_(nestlm.Decoder(hybrid_cfg(pattern="M*-E")), seed=1)
    with pytest.raises(ConfigError, match="another parent model"):
        nestlm.elastify(ecfg, other, stream(), tmp_path, progress=False)


def test_soft_mode_trains(tmp_path):
    ecfg = tiny_run_config(steps=6, mode="soft")
    nestlm.elastify(ecfg, parent(), stream(), tmp_path, progress=False)
    log = train_log(tmp_path)
    assert len(log) == 6 * 3 and all(r["kd"] == r["kd"] for r in log)  # finite (3 budgets a step)
    load_elastic(tmp_path)


def test_expected_loss_is_the_brute_force_expectation():
    import itertools

    cfg = hybrid_cfg()
    ecfg = ElasticConfig(budgets=[1.0, 0.7], choices={"hidden": [32, 24, 16], "ffn": [48, 32], "experts": [4, 3, 2]},
                         align=8)
    router = Router(cfg, ecfg)
    g = torch.Generator().manual_seed(0)
    w = {ax: torch.softmax(torch.randn(len(c), generator=g), -1) for ax, c in router.choices.items()}

    def loss(c):
        return (c - 0.7).abs()

    brute = 0.0
    for idx in itertools.product(*[range(len(router.choices[a])) for a in router.axes]):
        p = math.prod(float(w[a][i]) for a, i in zip(router.axes, idx, strict=True))
        brute += p * float(loss(router.cost_ratio(onehots(router, dict(zip(router.axes, idx, strict=True))))))
    assert float(router.expected_loss(w, loss)) == pytest.approx(brute, rel=1e-9)


def test_router_lands_on_budget_for_most_seeds(tmp_path):
    """The per-axis argmax alone (no landing rule): before the expected-loss term and softsign bounds, 1 seed
    in 5 landed every budget within 2%. The manifest's choice (Router.decode) must land on every seed.
    80 steps, each training every budget (the default): the argmax landed on 7 of seeds 0-9 (5 of 0-4), on 6
    at 60 steps, 8 at 100 (one budget a step: 6 at 120, 8 at 200; some seeds lock one axis early)."""
    landed = 0
    for seed in range(5):
        out = tmp_path / f"s{seed}"
        ecfg = tiny_run_config(seed=seed, steps=80, sample_tolerance=None)  # each axis samples on its own
        nestlm.elastify(ecfg, parent(), stream(), out, progress=False)
        model, router, manifest = load_elastic(out)
        greedy = [float(router.cost_ratio(router.greedy(i))) / f for i, f in enumerate(router.budgets)]
        landed += all(abs(r - 1) <= 0.02 for r in greedy)
        for b in manifest["budgets"].values():
            assert abs(b["cost_ratio"] / b["fraction"] - 1) <= 0.02, (seed, b)
    assert landed >= 4, landed


def test_decode_is_the_most_probable_architecture_within_tolerance():
    import itertools

    cfg = hybrid_cfg()
    ecfg = ElasticConfig(budgets=[1.0, 0.8, 0.6], choices={"hidden": [32, 24, 16], "ffn": [48, 32, 16],
                                                           "experts": [4, 3, 2]}, align=8)
    router = Router(cfg, ecfg)
    sharp = ecfg.scale_end / ecfg.tau_end
    for seed in range(6):
        torch.manual_seed(seed)
        router.reset_parameters()
        for bi in (1, 2):
            lg = {ax: v.detach() for ax, v in router.logits(router.onehot(bi)).items()}
            best, best_lp, nearest, nearest_dev = None, -math.inf, None, math.inf
            for idx in itertools.product(*[range(len(router.choices[a])) for a in router.axes]):
                pick = dict(zip(router.axes, idx, strict=True))
                dev = abs(float(router.cost_ratio(onehots(router, pick))) / router.budgets[bi] - 1)
                lp = sum(float(F.log_softmax(lg[a].double() * sharp, -1)[i]) for a, i in pick.items())
                if dev <= 0.03 and lp > best_lp:
                    best, best_lp = pick, lp
                if dev < nearest_dev:
                    nearest, nearest_dev = pick, dev
            assert router.indices(router.decode(bi, tol=0.03)) == (best or nearest)
            assert router.indices(router.decode(bi, tol=0.0)) == nearest or nearest_dev == 0
            greedy = router.greedy(bi)
            if abs(float(router.cost_ratio(greedy)) / router.budgets[bi] - 1) <= 0.03:
                assert router.indices(router.decode(bi, tol=0.03)) == router.indices(greedy)
    assert router.indices(router.decode(0, tol=0.03)) == {ax: 0 for ax in router.axes}  # full: pinned


def test_router_init_starts_from_a_trained_router(trained, tmp_path):
    out, ecfg = trained
    _, router, _ = load_elastic(out)
    seen = []
    nestlm.elastify(tiny_run_config(steps=1), parent(), stream(), tmp_path / "again", progress=False,
                    router_init=out, on_step=seen.append)
    # the first step's router loss is evaluated with the trained weights (a fresh router would differ)
    _, fresh, _ = load_elastic(tmp_path / "again")  # after one optimizer step: close to the trained router
    for (n, a), (_, b) in zip(router.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert (a - b).abs().max() < 0.05, n
    with pytest.raises(ConfigError, match="router_init"):
        nestlm.elastify(tiny_run_config(steps=1, budgets=[1.0, 0.7]), parent(), stream(), tmp_path / "x",
                        progress=False, router_init=out)


def test_tensorboard_scalars_equal_the_jsonl_log(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = nestlm.elastify(tiny_run_config(steps=12), parent(), stream(), tmp_path / "tb", progress=False)
    log = train_log(out)
    acc = EventAccumulator(str(out / "train" / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for name in {r["budget"] for r in log}:
        assert f"kd/{name}" in tags and f"cost_ratio/{name}" in tags
        events = {e.step: e.value for e in acc.Scalars(f"kd/{name}")}
        want = {r["step"]: r["kd"] for r in log if r["budget"] == name}
        assert set(events) == set(want)
        for step, v in want.items():
            assert events[step] == pytest.approx(v, rel=1e-6)


def test_manifest_keeps_the_routers_own_choice_when_it_misses_the_budget():
    from nestlm.elastic.artifact import manifest_for

    model = nestlm.Decoder(hybrid_cfg())
    ecfg = ElasticConfig(budgets=[1.0, 0.8, 0.6], choices={"hidden": [32, 24, 16], "ffn": [48, 32, 16]}, align=8)
    for seed in range(20):  # an untrained router: find one whose argmax misses a budget that decode can hit
        torch.manual_seed(seed)
        router = Router(model.cfg, ecfg)
        miss = [i for i in (1, 2) if router.indices(router.decode(i, 0.02)) != router.indices(router.greedy(i))]
        if miss:
            break
    assert miss
    import dataclasses
    import warnings

    with warnings.catch_warnings():  # trained with sample_tolerance == landing_tolerance (the default): what
        warnings.simplefilter("error")  # decode exports is what training sampled, so no warning; argmax kept
        m_trained = manifest_for(model, router, ecfg)
    assert all("argmax_sub" in b for i, b in enumerate(m_trained["budgets"].values()) if i in miss)
    ecfg = dataclasses.replace(ecfg, sample_tolerance=None)  # each axis sampled alone: warn
    with pytest.warns(UserWarning, match="the router's per-axis choice costs"):
        m = manifest_for(model, router, ecfg)
    assert {k: v for k, v in m.items() if k != "elastic"} == {k: v for k, v in m_trained.items() if k != "elastic"}
    for i, b in enumerate(m["budgets"].values()):
        if i:  # within 2% when some architecture is; else the closest one
            best = float(conftest.relative_deviation(router, i).min())
            assert abs(b["cost_ratio"] / b["fraction"] - 1) <= max(0.02, best + 1e-9)
        if i in miss:
            assert SubArch.from_dict(b["argmax_sub"]) == router.subarch(router.greedy(i))
            assert b["argmax_cost_ratio"] == pytest.approx(float(router.cost_ratio(router.greedy(i))))
        else:
            assert "argmax_sub" not in b


# ---------------------------------------------------------------------------------------------- issue 18's options
def test_sample_budgets_one_draw_is_the_old_draw_and_several_never_repeat():
    ecfg = tiny_run_config(budgets_per_step=1, stage2_start=0.5, stage2_weights=[0.5, 0.0, 0.5])
    a, b = random.Random(3), random.Random(3)
    for step in range(200):  # one budget per step: the same random numbers as rng.choices over all budgets
        assert ecfg.sample_budgets(a, step) == [b.choices(range(3), weights=ecfg.budget_probs(step))[0]]
    two = tiny_run_config(budgets_per_step=2, stage2_start=0.5, stage2_weights=[0.5, 0.0, 0.5])
    rng, seen = random.Random(0), set()
    for step in range(200):
        got = two.sample_budgets(rng, step)
        assert got == sorted(set(got)) and len(got) == 2, got  # distinct, largest first
        if step >= two.stage2_step():
            assert got == [0, 2]  # a zero-weight budget is never drawn
        seen.add(tuple(got))
    assert seen == {(0, 1), (0, 2), (1, 2)}
    assert tiny_run_config(budgets_per_step=3).sample_budgets(random.Random(1), 0) == [0, 1, 2]
    every = tiny_run_config(stage2_start=0.5, stage2_weights=[0.5, 0.0, 0.5])
    assert every.budgets_per_step is None  # the default: every budget, except one of weight 0
    rng = random.Random(0)
    assert [every.sample_budgets(rng, s) for s in range(200)] == [
        [0, 1, 2] if s < every.stage2_step() else [0, 2] for s in range(200)]


def test_lr_schedule_warmup_cosine_and_router_warmup():
    from nestlm.elastic.optim import lr_at

    ecfg = tiny_run_config(steps=100, lr_model=1e-3, router_warmup=0.2, lr_warmup=0.25, lr_schedule="cosine")
    assert ecfg.model_steps() == (20, 20)  # 20 router-only steps, then 25% of the other 80 warm up
    lrs = [ecfg.lr_model_at(s) for s in range(100)]
    assert lrs[:20] == [0.0] * 20
    assert lrs[20:40] == pytest.approx([1e-3 * (i + 1) / 20 for i in range(20)])  # linear warmup to lr_model
    assert lrs[40] == pytest.approx(1e-3)
    assert all(x > y for x, y in zip(lrs[40:-1], lrs[41:], strict=True))  # cosine: strictly down
    assert lrs[-1] == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 59 / 60)))
    const = tiny_run_config(lr_model=1e-3, lr_schedule="constant", lr_warmup=0.0)
    assert [const.lr_model_at(s) for s in (0, 30, 59)] == [1e-3] * 3
    assert lr_at(5, 10, 1.0, 0, "constant") == 1.0
    default = tiny_run_config(steps=100, lr_model=1e-3)  # the default: a 10% warmup, then cosine to lr / 10
    lrs = [default.lr_model_at(s) for s in range(100)]
    assert default.model_steps() == (0, 10) and lrs[:10] == pytest.approx([1e-4 * (i + 1) for i in range(10)])
    assert all(x > y for x, y in zip(lrs[10:-1], lrs[11:], strict=True)) and 1e-4 < lrs[-1] < 1.01e-4


@pytest.mark.parametrize("kw, match", [({"budgets_per_step": 4}, "budgets_per_step"),
                                       ({"budgets_per_step": 0}, "budgets_per_step"),
                                       ({"lr_schedule": "linear"}, "lr_schedule"),
                                       ({"router_warmup": 1.0}, "router_warmup"),
                                       ({"router_settle": 0.0}, "router_settle"),
                                       ({"router_settle": 0.3, "router_warmup": 0.5}, "router_settle"),
                                       ({"full_weight": -1.0}, "full_weight")])
def test_new_options_are_validated(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny_run_config(**kw)


def test_router_warmup_keeps_the_model_frozen_and_trains_the_router(tmp_path):
    ecfg = tiny_run_config(steps=8, router_warmup=0.5, checkpoint_every=4)
    nestlm.elastify(ecfg, parent(), stream(), tmp_path, progress=False, max_steps=4)  # the router-only steps
    from nestlm.elastic.train import prepare

    student, _, router0 = prepare(ecfg, parent(), stream())  # the sorted parent and the fresh router
    state = torch.load(tmp_path / "train" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(state["model"][k], v) for k, v in student.state_dict().items())
    assert any(not torch.equal(state["router"][k], v) for k, v in router0.state_dict().items())
    log = [(r["step"], r["lr_model"]) for r in train_log(tmp_path)]
    assert log == [(s, 0.0) for s in range(4) for _ in range(3)]  # every budget, each step
    nestlm.elastify(ecfg, parent(), stream(), tmp_path, progress=False)  # the model trains after them
    moved = load_elastic(tmp_path)[0].state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in student.state_dict().items())


def test_router_settle_freezes_the_router_and_trains_the_exported_architectures(tmp_path):
    """From settle_step on, the router does not move and every budget trains exactly what the manifest exports;
    a run killed after settling resumes to the same weights."""
    ecfg = tiny_run_config(steps=10, router_settle=0.6, budgets_per_step=3, checkpoint_every=2)
    assert ecfg.settle_step() == 6 and tiny_run_config().settle_step() == tiny_run_config().steps
    nestlm.elastify(ecfg, parent(), stream(), tmp_path / "a", progress=False, max_steps=6)
    router6 = torch.load(tmp_path / "a" / "train" / "checkpoint.pt", weights_only=True)["router"]
    nestlm.elastify(ecfg, parent(), stream(), tmp_path / "a", progress=False)  # resumes at step 6
    model, router, manifest = load_elastic(tmp_path / "a")
    assert all(torch.equal(router.state_dict()[k], v) for k, v in router6.items())  # frozen since step 6
    log = train_log(tmp_path / "a")
    for name, b in manifest["budgets"].items():
        if name == "full":
            continue  # pinned: never routed
        subs = [r["sub"] for r in log if r["budget"] == name]
        exported = SubArch.from_dict(b["sub"])
        assert len(subs) == 10 and all(SubArch(**s) == exported for s in subs[6:])  # the exported one, every step
    nestlm.elastify(ecfg, parent(), stream(), tmp_path / "b", progress=False)  # the same run without a break
    other = load_elastic(tmp_path / "b")[0].state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(other[k], v, rtol=0, atol=0)


def test_several_budgets_share_one_teacher_forward(tmp_path, monkeypatch):
    import nestlm.elastic.train as train

    calls = []
    real = train.kd_loss
    monkeypatch.setattr(train, "kd_loss", lambda s, t, temp: calls.append((s.shape, t.data_ptr())) or real(s, t, temp))
    ecfg = tiny_run_config(steps=5, budgets_per_step=3, full_weight=2.0, grad_accum=2)
    nestlm.elastify(ecfg, parent(), stream(), tmp_path, progress=False)
    log = train_log(tmp_path)
    assert [(r["step"], r["budget"]) for r in log] == [(s, b) for s in range(5) for b in ("full", "75%", "64%")]
    assert len(calls) == 5 * 2 * 3  # steps x micro-steps x budgets
    for i in range(0, len(calls), 3):  # each micro-step's three budgets read the same teacher logits
        assert calls[i][1] == calls[i + 1][1] == calls[i + 2][1]
    assert all(r["kd"] == r["kd"] for r in log)  # finite


def test_full_weight_scales_the_full_models_kd_loss(tmp_path, monkeypatch):
    """The gradient reaching each budget's KD loss is its weight over (grad_accum x budgets per step):
    full_weight for the full model, 1 for the others."""
    import nestlm.elastic.train as train

    real, got = train.kd_loss, []

    def kd(s, t, temp):
        loss = real(s, t, temp)
        loss.register_hook(lambda g: got.append(float(g)))
        return loss

    monkeypatch.setattr(train, "kd_loss", kd)
    ecfg = tiny_run_config(budgets=[1.0, 0.75], steps=3, budgets_per_step=2, full_weight=3.0, grad_accum=2)
    nestlm.elastify(ecfg, parent(), stream(), tmp_path, progress=False)
    assert got == pytest.approx([3 / 4, 1 / 4] * 6)  # 3 steps x 2 micro-steps x (full, 75%)


def test_sample_within_tolerance_is_the_brute_force_best_landing_combination():
    import itertools

    cfg = hybrid_cfg()
    ecfg = ElasticConfig(budgets=[1.0, 0.8, 0.6], choices=ALL_AXES, align=4, router_hidden=8)
    r = Router(cfg, ecfg)
    full = nestlm.count_params(cfg)
    gen = torch.Generator().manual_seed(0)
    for bi, tol in ((1, 0.02), (2, 0.05), (2, 0.0)):
        for _ in range(5):
            score = torch.randn(len(r.axes), r.w2.shape[1], generator=gen)
            best, best_s, closest = None, -math.inf, None
            for combo in itertools.product(*(range(len(r.choices[a])) for a in r.axes)):
                c = nestlm.count_params(cfg, r.at(dict(zip(r.axes, combo, strict=True)))) / full
                dev = abs(c / ecfg.budgets[bi] - 1)
                s = sum(float(score[d, i]) for d, i in enumerate(combo))
                if dev <= tol and s > best_s:
                    best, best_s = combo, s
                if closest is None or dev < closest[0]:
                    closest = (dev, combo)
            want = best if best is not None else closest[1]
            assert tuple(r._within(score, ecfg.budgets[bi], tol).tolist()) == want


def test_training_with_sample_tolerance_samples_only_landing_architectures(tmp_path):
    ecfg = tiny_run_config(steps=15, sample_tolerance=0.02)  # 30 small-budget draws
    nestlm.elastify(ecfg, parent(), stream(), tmp_path, progress=False)
    log = train_log(tmp_path)
    small = [r for r in log if r["fraction"] < 1.0]
    assert small and all(abs(r["cost_ratio"] / r["fraction"] - 1) <= 0.02 + 1e-9 for r in small)
    manifest = load_elastic(tmp_path)[2]
    for name, b in manifest["budgets"].items():
        assert b["cost_ratio"] == pytest.approx(b["fraction"], rel=0.02), name
