"""--device / --dtype (nestlm.device), bf16 training on CPU (the code path a GPU runs), activation
checkpointing, and the numerics that stay fp32 under bf16 autocast (the SSD scan, the MoE router)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_, tiny_hybrid_config, tiny_nemotron_h_config, token_stream
from conftest import train_log as log
from torch.testing import assert_close

import nestlm
from nestlm import ElasticConfig
from nestlm.cli import main
from nestlm.data import ByteTokenizer
from nestlm.device import autocast, resolve, resolve_device, resolve_dtype
from nestlm.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
NO_CUDA = not torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- the rule
def test_defaults_follow_the_machine():
    dev, dt = resolve()
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert dt == (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    assert resolve("cpu") == (torch.device("cpu"), torch.float32)
    assert resolve("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)  # bf16 runs on CPU (slowly)
    assert resolve_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("device, match", [
    ("xpu", "nestlm runs on cpu, cuda or mps"),
    ("tpu", "is not a device"),
    ("not a device", "is not a device"),
    ("cuda:99", "CUDA is not available" if NO_CUDA else "CUDA device"),
])
def test_unavailable_devices_fail_with_one_line(device, match):
    with pytest.raises(ConfigError, match=match) as e:
        resolve_device(device)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", ["fp16", "float8", torch.float16])
def test_unknown_dtypes_fail_with_one_line(dtype):
    with pytest.raises(ConfigError, match="use one of"):
        resolve_dtype(dtype, torch.device("cpu"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import NemotronHForCausalLM

    path = tmp_path_factory.mktemp("tiny_nemotron_h")
    cfg = tiny_nemotron_h_config(vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    randomize_(NemotronHForCausalLM(cfg).eval()).save_pretrained(path)
    ByteTokenizer().save(path)
    return path


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv", [
    ["generate", "{hf}", "--prompt", "In the", "--device", "cuda"],
    ["eval", "{hf}", "--device", "cuda"],
    ["importance", "{hf}", "--kjv", "--out", "{tmp}/s.safetensors", "--device", "cuda"],
    ["elastify", "{cfg}", "--model", "{hf}", "--kjv", "--out", "{tmp}/el", "--device", "cuda"],
    ["demo", "--quick", "--out", "{tmp}/demo", "--device", "cuda:0"],
])
def test_cli_refuses_an_unavailable_device_before_any_work(hf_dir, tmp_path, capsys, argv):
    cfg = tmp_path / "e.yaml"
    ElasticConfig(budgets=[1.0, 0.5], steps=2).save(cfg)
    argv = [a.format(hf=hf_dir, tmp=tmp_path, cfg=cfg) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.yaml"]  # nothing written


def test_generate_and_eval_run_in_bf16_on_cpu(hf_dir, capsys):
    assert main(["generate", str(hf_dir), "--prompt", "In the", "--max-new-tokens", "6", "--device", "cpu",
                 "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("In the")
    from nestlm.evaluate import evaluate

    fp32 = evaluate(hf_dir, seq_len=32, max_windows=4, device="cpu", dtype="fp32")[0]["ppl"]
    bf16 = evaluate(hf_dir, seq_len=32, max_windows=4, device="cpu", dtype="bf16")[0]["ppl"]
    assert bf16 != fp32 and abs(bf16 / fp32 - 1) < 0.02  # bf16 weights: a little different, not broken


# ---------------------------------------------------------------------------------------------- fp32 islands
def test_ssd_scan_and_moe_router_stay_fp32_under_bf16_autocast():
    from nestlm.model.ssd import ssd_chunked

    g = torch.Generator().manual_seed(0)
    b, t, h, p, gr, n = 2, 24, 4, 8, 2, 8
    x, B, C = torch.randn(b, t, h, p, generator=g), torch.randn(b, t, gr, n, generator=g), torch.randn(b, t, gr, n, generator=g)
    dt, A, D = torch.rand(b, t, h, generator=g) * 0.5, -torch.rand(h, generator=g) - 0.1, torch.randn(h, generator=g)
    ref = ssd_chunked(x, dt, A, B, C, D, 8)
    with autocast(torch.bfloat16, torch.device("cpu")):
        got = ssd_chunked(x, dt, A, B, C, D, 8)
        leaked = torch.einsum("btgn,btgn->btg", B, C)  # the same einsum outside the fp32 island: bf16
    assert leaked.dtype == torch.bfloat16
    assert got[0].dtype == torch.float32 and all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))

    model = randomize_(nestlm.Decoder(tiny_hybrid_config()))
    moe = model.layers[3].mixer
    xs = torch.randn(10, 32, generator=g)
    w, idx = moe.route(xs, 4)
    with autocast(torch.bfloat16, torch.device("cpu")):
        w2, idx2 = moe.route(xs, 4)
    assert torch.equal(idx, idx2) and torch.equal(w, w2) and w2.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- training
def run_config(**over):
    kw = dict(budgets=[1.0, 0.75, 0.64], choices={"hidden": [1.0, 0.875, 0.75, 0.625, 0.5], "ffn": [1.0, 0.5],
              "mamba_heads_per_group": [1.0, 0.5]}, align=4, steps=6, batch=4, seq_len=16, lr_model=1e-3,
              lr_router=0.03, router_weight=2.0, router_hidden=32, p_full=0.4, calib_batches=2, seed=0,
              checkpoint_every=3)
    kw.update(over)
    return ElasticConfig(**kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same elastic run in fp32, in bf16, and in bf16 with activation checkpointing (CPU)."""
    root = tmp_path_factory.mktemp("precision")
    parent = randomize_(nestlm.Decoder(tiny_hybrid_config()), seed=0)
    out = {}
    for name, dtype, ac in (("fp32", "fp32", False), ("bf16", "bf16", False), ("bf16_ac", "bf16", True)):
        out[name] = nestlm.elastify(run_config(activation_checkpointing=ac), parent, token_stream(), root / name,
                                    progress=False, device="cpu", dtype=dtype)
    return out


def test_bf16_training_follows_the_fp32_run(runs):
    """bf16 autocast changes the losses by rounding only: every step's budget and widths are the fp32 run's,
    the KD losses within 5% or 5e-3 (measured: < 1% on the budgets below full; at the full model, where the
    fp32 KD is ~0.01, bf16 rounding of student and teacher adds ~2e-3), and the exported weights stay fp32
    (the master copy)."""
    a, b = log(runs["fp32"]), log(runs["bf16"])
    assert [r["budget"] for r in a] == [r["budget"] for r in b] and [r["sub"] for r in a] == [r["sub"] for r in b]
    kd_a, kd_b = (torch.tensor([r["kd"] for r in x], dtype=torch.float64) for x in (a, b))
    assert not torch.equal(kd_a, kd_b)  # bf16 did run
    assert_close(kd_b, kd_a, rtol=0.05, atol=5e-3)
    model, _, _ = nestlm.load_elastic(runs["bf16"])
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    cfg = json.loads((runs["bf16"] / "config.json").read_text())
    assert cfg["dtype"] == "float32"


def test_activation_checkpointing_changes_nothing_but_memory(runs):
    """Recomputing blocks in the backward gives the same run bit for bit."""
    assert log(runs["bf16_ac"]) == log(runs["bf16"])
    a = nestlm.load_elastic(runs["bf16_ac"])[0].state_dict()
    b = nestlm.load_elastic(runs["bf16"])[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_is_held_in_bf16_and_takes_no_grad(monkeypatch, tmp_path):
    """The teacher elastify calls is bf16 with no gradients; the student it calls is fp32 under autocast."""
    from nestlm.elastic import parallel

    seen = {}
    wrap = parallel.wrap

    def spy(model, teacher, dp, dtype=torch.float32):
        seen["teacher"] = {p.dtype for p in teacher.parameters()}
        seen["teacher_grad"] = any(p.requires_grad for p in teacher.parameters())
        seen["student"] = {p.dtype for p in model.parameters()}
        seen["checkpoint"] = model.checkpoint_blocks
        return wrap(model, teacher, dp, dtype)

    monkeypatch.setattr(parallel, "wrap", spy)
    nestlm.elastify(run_config(steps=1, activation_checkpointing=True), randomize_(
        nestlm.Decoder(tiny_hybrid_config())), token_stream(), tmp_path, progress=False, dtype="bf16")
    assert seen == {"teacher": {torch.bfloat16}, "teacher_grad": False, "student": {torch.float32},
                    "checkpoint": True}


def test_activation_checkpointing_is_a_resumable_config_change(tmp_path):
    parent = randomize_(nestlm.Decoder(tiny_hybrid_config()), seed=0)
    nestlm.elastify(run_config(), parent, token_stream(), tmp_path, progress=False, max_steps=3)
    nestlm.elastify(run_config(activation_checkpointing=True), parent, token_stream(), tmp_path, progress=False)
    assert [r["step"] for r in log(tmp_path)] == [s for s in range(6) for _ in range(3)]  # 3 budgets a step
    with pytest.raises(ConfigError, match="activation_checkpointing must be true or false"):
        run_config(activation_checkpointing="yes")


def test_qad_trains_in_bf16_too(tmp_path):
    """QAD (a fake-quantized NVFP4 student) under bf16 autocast: the same budgets and widths as in fp32, the
    KD losses close (the fake quantization itself runs on the fp32 latent weights)."""
    cfg = tiny_hybrid_config(mamba_head_dim=8, shared_intermediate_size=32)
    e = run_config(quant="nvfp4", align=16, budgets=[1.0, 0.8, 0.6], choices={
        "hidden": [1.0, 0.5], "ffn": [48, 32, 16], "mamba_heads_per_group": [1.0, 0.5]})
    parent = randomize_(nestlm.Decoder(cfg), seed=0)
    a, b = (log(nestlm.elastify(e, parent, token_stream(), tmp_path / dt, progress=False, device="cpu", dtype=dt))
            for dt in ("fp32", "bf16"))
    assert [r["sub"] for r in a] == [r["sub"] for r in b]
    kd_a, kd_b = (torch.tensor([r["kd"] for r in x], dtype=torch.float64) for x in (a, b))
    assert not torch.equal(kd_a, kd_b)
    assert_close(kd_b, kd_a, rtol=0.05, atol=5e-3)
