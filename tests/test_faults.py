"""Faults during elastic training: kill -9 mid-run then resume reproduces the uninterrupted losses exactly; a
crash while a checkpoint is written (torch.save, or the torch.distributed.checkpoint writer) keeps the
previous checkpoint, which resumes exactly; a non-finite loss, or weights made non-finite by an update, stop
the run with a message naming the step and the last good checkpoint, and nothing broken is checkpointed."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_
from conftest import token_stream as stream
from conftest import train_log as log

import nestlm
from nestlm import ElasticConfig
from nestlm.elastic import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

E = importlib.import_module("nestlm.elastic.train")  # the training loop's module
TESTS = Path(__file__).parent


def train_files(train) -> list[str]:
    """The training folder's entries, without TensorBoard's event folder (there when tensorboard is installed)."""
    return sorted(p.name for p in train.iterdir() if p.name != "tb")


def parent():
    cfg = nestlm.ModelConfig(vocab_size=64, hidden_size=32, pattern="M*-E", num_heads=4, num_kv_heads=2,
                             head_dim=8, intermediate_size=48, mamba_heads=8, mamba_head_dim=4, mamba_groups=2,
                             ssm_state=8, chunk_size=4, n_experts=4, top_k=2, moe_intermediate_size=16,
                             shared_intermediate_size=24)
    return randomize_(nestlm.Decoder(cfg), seed=0)


def run_config(**over):
    """The library's defaults for what it doesn't set: every budget on every batch (3 log records a step),
    a cosine lr with a warmup."""
    kw = dict(budgets=[1.0, 0.75, 0.64], choices={"hidden": [1.0, 0.875, 0.75, 0.625, 0.5], "ffn": [1.0, 0.5],
              "mamba_heads_per_group": [1.0, 0.5]}, align=4, steps=12, batch=2, seq_len=16, lr_model=1e-3,
              lr_router=0.03, router_weight=2.0, router_hidden=32, p_full=0.3, calib_batches=2,
              checkpoint_every=4, seed=0)
    kw.update(over)
    return ElasticConfig(**kw)


PER_STEP = 3  # budgets trained (and logged, and kd_loss calls) per step of run_config


def steps(d: Path) -> list[int]:
    """The step of each record of d's log, once per step (checked: every step logs all PER_STEP budgets)."""
    s = [r["step"] for r in log(d)]
    assert s == [x for x in s[::PER_STEP] for _ in range(PER_STEP)], s
    return s[::PER_STEP]


def weights(d: Path) -> dict:
    return nestlm.load_elastic(d)[0].state_dict()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted one-process run every fault is compared with."""
    out = tmp_path_factory.mktemp("reference")
    nestlm.elastify(run_config(), parent(), stream(), out, progress=False)
    return out


# ---------------------------------------------------------------------------------------------- kill -9
KILLED_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import nestlm
from test_faults import parent, run_config, stream
nestlm.elastify(run_config(steps=20), parent(), stream(), {out!r}, progress=False,
                on_step=lambda rec: time.sleep(0.05))
"""


def test_kill_9_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    nestlm.elastify(run_config(steps=20), parent(), stream(), ref, progress=False)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN.format(tests=str(TESTS), out=str(out))], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt, log_path = out / "train" / "checkpoint.pt", out / "train" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait for the 2nd checkpoint and a step past it
        if ckpt.exists() and log_path.exists() and len(log_path.read_text().splitlines()) >= 10 * PER_STEP:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.wait()
    proc.stderr.close()
    killed_at = len(log_path.read_text().splitlines()) // PER_STEP  # steps logged
    saved = torch.load(ckpt, weights_only=True)["step"]
    assert saved % 4 == 0 and 8 <= saved < 20 and not (out / "nestlm_elastic.json").exists()  # killed mid-run
    with open(log_path, "a") as f:  # as if the kill had come in the middle of writing a log line
        f.write('{"step": 99, "kd": 0.')
    nestlm.elastify(run_config(steps=20), parent(), stream(), out, progress=False)
    assert log(out) == log(ref)  # every loss, budget and width, bit for bit
    assert_same_weights(out, ref)
    assert killed_at >= saved  # (steps logged after the checkpoint were dropped and redone, not duplicated)


# ---------------------------------------------------------------------------------------------- crashes mid-write
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, reference):
    real_save, calls = torch.save, []

    def save_then_crash(obj, f, *args, **kwargs):  # the 2nd checkpoint (step 8) dies half written
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 half a zip file")
            raise OSError("No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="No space left"):
        nestlm.elastify(run_config(), parent(), stream(), tmp_path, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    train = tmp_path / "train"
    assert train_files(train) == ["checkpoint.pt", "elastic.yaml", "log.jsonl"]  # no .tmp
    assert torch.load(train / "checkpoint.pt", weights_only=True)["step"] == 4
    nestlm.elastify(run_config(), parent(), stream(), tmp_path, progress=False)
    assert log(tmp_path) == log(reference)
    assert_same_weights(tmp_path, reference)


def test_crash_while_writing_a_distributed_checkpoint(tmp_path, monkeypatch, one_rank_group, reference):
    import torch.distributed.checkpoint as dcp

    real_save, calls = dcp.save, []

    def save_then_crash(state, *, checkpoint_id, **kwargs):  # the 2nd DCP save dies after one shard file
        calls.append(1)
        if len(calls) == 2:
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half a shard")
            raise OSError("No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id, **kwargs)

    ref = tmp_path / "ref"
    nestlm.elastify(run_config(), parent(), stream(), ref, progress=False)  # parallel: automatic -> DDP
    monkeypatch.setattr(dcp, "save", save_then_crash)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        nestlm.elastify(run_config(), parent(), stream(), out, progress=False)
    monkeypatch.setattr(dcp, "save", real_save)
    folder = out / "train" / checkpoint.CKPT_DIR
    assert checkpoint.find_dcp(folder) == folder and checkpoint.read_dcp_state(folder)["step"] == 4
    assert train_files(out / "train") == ["checkpoint", "elastic.yaml", "log.jsonl"]
    # a second crash window: between the two renames of a save (the previous folder is `checkpoint.old`)
    os.replace(folder, folder.with_name("checkpoint.old"))
    nestlm.elastify(run_config(), parent(), stream(), out, progress=False)
    assert log(out) == log(ref)
    assert_same_weights(out, ref)
    # and the one-rank DDP run is the one-process run
    for a, b in zip(log(ref), log(reference), strict=True):
        assert a["budget"] == b["budget"] and a["sub"] == b["sub"]
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-6)


# ---------------------------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, bad):
    real_kd, calls = E.kd_loss, []

    def kd_loss(*args):  # step 6's first budget (the 19th loss) goes bad
        calls.append(1)
        out = real_kd(*args)
        return out * bad if len(calls) == 6 * PER_STEP + 1 else out

    monkeypatch.setattr(E, "kd_loss", kd_loss)
    ckpt = tmp_path / "train" / "checkpoint.pt"
    with pytest.raises(FloatingPointError) as ei:
        nestlm.elastify(run_config(), parent(), stream(), tmp_path, progress=False)
    msg = str(ei.value)
    assert re.match(rf"step 6, budget full, 75%, 64%: loss is {bad} .*stopped before updating\. The last "
                    rf"good checkpoint is {re.escape(str(ckpt))} \(step 4\)\.", msg), msg
    assert torch.load(ckpt, weights_only=True)["step"] == 4  # not overwritten with the broken state
    assert steps(tmp_path) == list(range(6))  # the bad step is not logged
    assert not (tmp_path / "nestlm_elastic.json").exists()
    monkeypatch.setattr(E, "kd_loss", real_kd)  # the checkpoint resumes
    nestlm.elastify(run_config(steps=8), parent(), stream(), tmp_path, progress=False)
    assert steps(tmp_path) == list(range(8))


class InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (finite loss, non-finite gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("inf"))


def test_non_finite_gradients_stop_before_the_update(tmp_path, monkeypatch):
    real_kd, calls = E.kd_loss, []

    def kd_loss(student, teacher, t=1.0):  # step 5's last budget: the loss is finite, its gradient is not
        calls.append(1)
        return real_kd(InfGrad.apply(student) if len(calls) == 6 * PER_STEP else student, teacher, t)

    monkeypatch.setattr(E, "kd_loss", kd_loss)
    ckpt = tmp_path / "train" / "checkpoint.pt"
    with pytest.raises(FloatingPointError, match=r"^step 5, budget full, 75%, 64%: loss [0-9.]+ but "
                       rf"non-finite gradients; stopped before updating\. The last good checkpoint is "
                       rf"{re.escape(str(ckpt))} \(step 4\)\.$"):
        nestlm.elastify(run_config(), parent(), stream(), tmp_path, progress=False)
    assert torch.load(ckpt, weights_only=True)["step"] == 4


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """An infinite learning rate: every loss and gradient of step 0 is finite, the weights after it are not."""
    with pytest.raises(FloatingPointError, match=r"^weights are non-finite after step 0; not checkpointing them\. "
                                                 r"No checkpoint has been written yet\.$"):
        nestlm.elastify(run_config(lr_model=float("inf"), checkpoint_every=1), parent(), stream(), tmp_path,
                        progress=False)
    assert not (tmp_path / "train" / "checkpoint.pt").exists()
    assert steps(tmp_path) == [0]


# ---------------------------------------------------------------------------------------------- stale state
def test_a_fresh_run_drops_an_older_runs_checkpoints(tmp_path, reference):
    """A DCP folder from an earlier (here: one-rank distributed) run at step 8, then resume=False on one
    process to step 4: resuming must continue from 4, not from the older run's 8."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        nestlm.elastify(run_config(), parent(), stream(), tmp_path / "out", progress=False, max_steps=8)
    finally:
        dist.destroy_process_group()
    assert checkpoint.read_dcp_state(tmp_path / "out" / "train" / checkpoint.CKPT_DIR)["step"] == 8
    nestlm.elastify(run_config(), parent(), stream(), tmp_path / "out", progress=False, max_steps=4, resume=False)
    assert train_files(tmp_path / "out" / "train") == ["checkpoint.pt", "elastic.yaml", "log.jsonl"]
    nestlm.elastify(run_config(), parent(), stream(), tmp_path / "out", progress=False)
    assert log(tmp_path / "out") == log(reference)
