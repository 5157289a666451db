"""The memory plan (nestlm.plan) against the tensors a training step really holds, measured on CPU:
parameters, gradients, optimizer state and the bf16 teacher exactly; activations (what autograd saves for
the backward, seen through torch's saved-tensor hooks) within 25%. On a GPU, the whole plan against
torch.cuda.max_memory_allocated."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import randomize_, tiny_hybrid_config, tiny_llama_config

import nestlm
from nestlm import ElasticConfig
from nestlm.cli import main
from nestlm.device import autocast
from nestlm.elastic.losses import kd_loss
from nestlm.elastic.optim import adamw
from nestlm.elastic.router import Router
from nestlm.plan import activations, block_activations, plan

pytestmark = pytest.mark.usefixtures("one_thread")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hybrid(**over):  # blocks matter more than the vocabulary here (real models: d and seq_len dominate)
    kw = dict(vocab_size=64, hidden_size=64, intermediate_size=160, mamba_heads=8, mamba_head_dim=16,
              ssm_state=16, chunk_size=16, head_dim=16, moe_intermediate_size=32, shared_intermediate_size=48,
              pattern="M*-EM*")
    kw.update(over)
    return tiny_hybrid_config(**kw)


def llama():
    from nestlm.convert import config_from_hf

    return config_from_hf(tiny_llama_config(vocab_size=64, hidden_size=64, intermediate_size=160,
                                            num_hidden_layers=2, head_dim=16).to_dict())


def ecfg(**over) -> ElasticConfig:
    kw = dict(budgets=[1.0, 0.5], choices={"hidden": [1.0, 0.75, 0.5]}, batch=2, seq_len=128, router_hidden=32)
    kw.update(over)
    return ElasticConfig(**kw)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_bytes(model, ids, dtype) -> int:
    """Bytes of the tensors autograd keeps for the backward of model(ids) -> KD loss (the parameters'
    own storage excluded: it is counted as weights), each storage once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    teacher = torch.randn(*ids.shape, model.cfg.vocab_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(dtype, ids.device):
            logits = model(ids)
        kd_loss(logits, teacher).backward()
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------- exact parts
@pytest.mark.parametrize("make", [hybrid, llama])
def test_weights_gradients_optimizer_and_router_are_exact(make):
    cfg = make()
    e = ecfg()
    p = plan(e, cfg, dtype="bf16")
    student = randomize_(nestlm.Decoder(cfg))
    teacher = copy.deepcopy(student).to(torch.bfloat16)
    router = Router(cfg, e)
    opt, opt_r = adamw(student.parameters(), lr=1e-3), adamw(router.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with autocast(torch.bfloat16, ids.device):
        logits = student(ids)
    (kd_loss(logits, teacher(ids)) + sum(q.sum() for q in router.parameters())).backward()
    for o in (opt, opt_r):
        o.step()

    def state(o):
        return nbytes(t for s in o.state.values() for t in s.values() if isinstance(t, torch.Tensor))

    assert p.parts["teacher"] == nbytes([*teacher.parameters(), *teacher.buffers()])
    assert p.parts["student"] == nbytes([*student.parameters(), *student.buffers()])
    assert p.parts["gradients"] == nbytes(q.grad for q in student.parameters())
    assert p.parts["optimizer"] == state(opt)
    assert p.parts["router"] == nbytes(router.parameters()) + nbytes(q.grad for q in router.parameters()) + \
        state(opt_r)
    fp32 = plan(e, cfg, dtype="fp32")
    assert fp32.parts["teacher"] == p.parts["student"] and fp32.parts["weight_copies"] == 0


def test_fsdp2_shards_weights_gradients_and_optimizer_state():
    cfg, e = hybrid(), ecfg(batch=8)
    one, four = plan(e, cfg), plan(e, cfg, gpus=4, parallel="fsdp2")
    for k in ("teacher", "student", "gradients"):
        assert four.parts[k] == -(-one.parts[k] // 4)
    assert four.rows_per_gpu == 2 and four.parts["activations"] * 4 == pytest.approx(one.parts["activations"], 1e-6)
    ddp = plan(e, cfg, gpus=4)
    assert ddp.parallel == "ddp" and ddp.parts["student"] == one.parts["student"]  # DDP replicates


# ---------------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("make", [hybrid, llama, lambda: hybrid(pattern="MM", chunk_size=32, ssm_state=32),
                                  lambda: hybrid(pattern="EE", moe_act="swiglu", moe_router="softmax",
                                                 shared_intermediate_size=0)])
def test_activations_within_25_percent_of_the_saved_tensors(make, dtype):
    """What autograd saves for a full-model step (bf16: with autocast's weight copies, which it saves too)."""
    cfg = make()
    model = randomize_(nestlm.Decoder(cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 128))
    measured = saved_bytes(model, ids, DTYPES[dtype])
    p = plan(ecfg(), cfg, dtype=dtype)
    estimate = p.parts["activations"] + p.parts["weight_copies"]
    assert 0.75 < estimate / measured < 1.25, (estimate, measured)


def test_checkpointing_keeps_block_inputs_and_what_lies_outside_the_blocks():
    """With activation checkpointing autograd keeps each block's input and nothing inside a block (it is
    recomputed in the backward, one block at a time); with the head (final norm, lm_head, KD) that is the
    plan's checkpointed figure less the one recomputed block, within 25%."""
    cfg = hybrid()
    model = randomize_(nestlm.Decoder(cfg))
    model.checkpoint_blocks = True
    ids = torch.randint(0, cfg.vocab_size, (2, 128))
    measured = saved_bytes(model, ids, torch.float32)
    recomputed = max(block_activations(cfg, kind, 4) for kind in cfg.pattern) * ids.numel()
    kept = activations(cfg, ids.numel(), 4, checkpointing=True) - recomputed
    assert 0.75 < kept / measured < 1.25, (kept, measured)
    model.checkpoint_blocks = False
    assert saved_bytes(model, ids, torch.float32) > 3 * measured
    p = plan(ecfg(activation_checkpointing=True), cfg, dtype="fp32")
    assert p.activations_checkpointed < 0.6 * p.parts["activations"]
    assert p.total == p.total_with(True) < p.total_with(False)


# ---------------------------------------------------------------------------------------------- the command
@pytest.fixture
def config_only(tmp_path):
    """An HF folder with nothing but config.json: the plan reads no weights."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(tiny_llama_config(
        vocab_size=64, hidden_size=64, intermediate_size=160, num_hidden_layers=2, head_dim=16).to_dict()))
    e = tmp_path / "e.yaml"
    ecfg(batch=4).save(e)
    return tmp_path / "hf", e


def test_plan_command_prints_every_part_and_says_whether_it_fits(config_only, capsys):
    hf, e = config_only
    assert main(["plan", str(e), "--model", str(hf), "--gpus", "2", "--parallel", "fsdp2", "--gpu-memory",
                 "1GiB"]) == 0
    out = capsys.readouterr().out
    for row in ("teacher (bf16, frozen)", "student weights (fp32)", "gradients (fp32)", "AdamW state (fp32)",
                "router", "activations", "activations, checkpointed", "total, with checkpointing"):
        assert row in out, row
    assert "2 GPU(s), fsdp2, bf16, micro-batch 2 x 128 tokens" in out
    assert out.strip().endswith("fits in 1.00 GiB per GPU")


@pytest.mark.parametrize("argv, match", [
    (["--gpu-memory", "1MiB"], r"the plan needs .* GiB per GPU, more than --gpu-memory 0.00 GiB"),
    (["--gpu-memory", "lots"], r"--gpu-memory 'lots': give bytes"),
    (["--gpus", "3"], r"batch 4 doesn't split over 3 GPUs"),
])
def test_plan_command_bad_input_is_one_line(config_only, capsys, argv, match):
    import re

    hf, e = config_only
    with pytest.raises(SystemExit) as ex:
        main(["plan", str(e), "--model", str(hf), *argv])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err


# ---------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_plan_against_cuda_max_memory_allocated(tmp_path):
    """One bf16 elastify step of a small hybrid on the GPU: the peak allocated memory lies within 25% of the
    plan's total (the plan counts what must be resident at the peak: the backward)."""
    cfg = hybrid(vocab_size=4096, hidden_size=256, intermediate_size=768, pattern="M*-EM*-E")
    e = ecfg(batch=4, seq_len=512, steps=1, calib_batches=1, checkpoint_every=1000)
    parent = randomize_(nestlm.Decoder(cfg))
    data = torch.randint(0, cfg.vocab_size, (40_000,))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    nestlm.elastify(e, parent, data, tmp_path, progress=False, device="cuda", dtype="bf16")
    peak = torch.cuda.max_memory_allocated()
    p = plan(e, cfg, dtype="bf16")
    assert 0.75 < p.total / peak < 1.25, (p.total, peak)
