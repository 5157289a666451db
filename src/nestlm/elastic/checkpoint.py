"""Training checkpoints of an elastic run: everything the next step depends on, written so that a crash at
any point (kill -9 included) keeps the previous checkpoint, and read back only as plain data.

    one process   out/train/checkpoint.pt: torch.save of weights, both optimizers, RNGs, step, data position
                  (read with torch.load(weights_only=True))
    N processes   out/train/checkpoint/: a torch.distributed.checkpoint folder (sharded under FSDP2) whose
                  train_state.json, written last, marks it complete; an interrupted save leaves
                  checkpoint.tmp (ignored) and the previous folder (checkpoint, or checkpoint.old mid-swap)

`resume` picks the newest complete one and refuses a checkpoint from another parent or another config.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import torch

from nestlm.elastic.config import ElasticConfig
from nestlm.errors import CheckpointError, ConfigError

CKPT_FILE = "checkpoint.pt"  # one process: a torch.save file (read back with weights_only=True)
CKPT_DIR = "checkpoint"  # N processes: a torch.distributed.checkpoint folder (see save_dcp)
# config fields that may change when resuming (the others would silently change what the run means)
RESUME_MAY_CHANGE = ("steps", "checkpoint_every", "log_every", "activation_checkpointing")  # last: same math


def drop_stale(train_dir: Path, keep: Path | None) -> None:
    """Remove every checkpoint but the one this run resumed from (a fresh run: all of them), so that a later
    resume can't pick up an older run's state (e.g. the DCP folder of an earlier N-process run)."""
    for p in (train_dir / CKPT_FILE, train_dir / CKPT_DIR, *(train_dir.glob(f"{CKPT_DIR}*.*"))):
        if p.is_dir() and p != keep:
            shutil.rmtree(p)
        elif p.exists() and p != keep:
            p.unlink()


def train_state(step: int, pos: int, budget_rng: random.Random, fingerprint: float, ecfg: ElasticConfig,
                 as_text: bool = False) -> dict:
    """Everything but the weights and optimizer states that the next step depends on. as_text: RNG tensors as
    base64 text (the DCP checkpoint's train_state.json), else as tensors (the torch.save checkpoint)."""
    st = {"step": step, "data_pos": pos, "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(),
          "rng_budget": budget_rng.getstate(), "teacher_fingerprint": fingerprint, "config": ecfg.to_dict()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["rng_cuda"] = torch.cuda.get_rng_state()
    if as_text:
        for k in ("rng_torch", "rng_cuda"):
            if k in st:
                st[k] = base64.b64encode(st[k].numpy().tobytes()).decode()
    return st


def set_rng(st: dict, budget_rng: random.Random) -> None:
    def tensor(v):  # a tensor (torch.save) or base64 text (JSON)
        return v if isinstance(v, torch.Tensor) else torch.frombuffer(bytearray(base64.b64decode(v)), dtype=torch.uint8)

    def py_state(s):  # random.getstate() is (version, tuple of ints, gauss); JSON turned the tuples to lists
        return (s[0], tuple(s[1]), s[2])

    torch.set_rng_state(tensor(st["rng_torch"]))
    if "rng_cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(st["rng_cuda"]))
    random.setstate(py_state(st["rng_python"]))
    budget_rng.setstate(py_state(st["rng_budget"]))


def save_pt(path: Path, state: dict) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash at any point leaves the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_pt(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a checkpoint, or a pickle that isn't plain data
        raise CheckpointError(f"{path}: unreadable training checkpoint ({load_error_text(e)}); "
                              "delete it or pass resume=False to start over") from None


def check_resumable(st: dict, path: Path, fingerprint: float, ecfg: ElasticConfig) -> None:
    if st["teacher_fingerprint"] != fingerprint:
        raise ConfigError(f"{path} was trained from another parent model (or other calibration "
                          "data); pass the same model and data, or resume=False")
    saved, now = (json.loads(json.dumps(d)) for d in (st["config"], ecfg.to_dict()))  # tuples -> lists
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k))
    if changed:
        raise ConfigError(f"{path} was written with another ElasticConfig (it differs in {changed}); resume "
                          "with the same config, or pass resume=False to start over")


def resume(train_dir: Path, dp, parts: dict, fingerprint: float, ecfg: ElasticConfig,
                     budget_rng: random.Random):
    """Restore the newest checkpoint in `train_dir` into `parts` and the RNGs -> (step, data_pos, (path, step)),
    or None when there is none. One process reads checkpoint.pt, or a DCP folder from an N-process run;
    N processes read the DCP folder (whatever N wrote it)."""
    pt = train_dir / CKPT_FILE
    folder = find_dcp(train_dir / CKPT_DIR)
    st = read_pt(pt) if pt.is_file() and not dp.distributed else None
    if folder is not None and (st is None or read_dcp_state(folder)["step"] > st["step"]):
        st = read_dcp_state(folder)
        check_resumable(st, folder, fingerprint, ecfg)
        load_dcp(folder, parts)
        path = folder
    elif st is not None:
        check_resumable(st, pt, fingerprint, ecfg)
        (model, opt_model), (router, opt_router) = parts["model"], parts["router"]
        model.load_state_dict(st["model"])
        router.load_state_dict(st["router"])
        opt_model.load_state_dict(st["opt_model"])
        opt_router.load_state_dict(st["opt_router"])
        path = pt
    elif pt.is_file():  # N processes and only a one-process checkpoint
        raise ConfigError(f"{pt} was written by a one-process run; resume it with one process, or pass "
                          "resume=False to start over")
    else:
        return None
    set_rng(st, budget_rng)
    return st["step"], st["data_pos"], (path, st["step"])


STATE_FILE = "train_state.json"  # a DCP checkpoint's non-tensor state, written last: its completion mark


def _safe_load_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP stores non-tensor values (optimizer hyperparameters) as pickles and reads them back with
        weights_only=False. Unpickle each with weights_only=True first: anything but plain data raises."""

        def load_bytes(self, read_item, value):
            torch.load(value, weights_only=True)
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafeLoadPlanner()


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def find_dcp(path: Path) -> Path | None:
    """The complete DCP checkpoint folder at `path`, or its previous version `path.old` when a crash came
    between the two renames of `save_dcp`; None if there is none. (`path.tmp` is never trusted.)"""
    for p in (path, _old(path)):
        if (p / STATE_FILE).is_file():
            return p
    return None


def read_dcp_state(path: Path) -> dict:
    from nestlm.errors import CheckpointError

    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable ({e})") from None


def save_dcp(path: Path, parts: dict, state: dict, dp) -> None:
    """Save `parts` {name: (module, optimizer)} with DCP (each rank its shards) and the JSON-able `state` into
    the folder `path`, atomically: everything goes to `path.tmp`, train_state.json last, then the folder
    replaces `path` (kept as `path.old` until the new one is in place). A collective: every rank calls it."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tmp, old = _tmp(path), _old(path)
    if dp.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dp.barrier()
    tensors, optimizers = {}, []
    for name, (module, opt) in parts.items():
        tensors[name] = get_model_state_dict(module)
        if opt.state:  # an empty state stays empty: get_optimizer_state_dict would fill it with a dummy step
            tensors[f"opt_{name}"] = get_optimizer_state_dict(module, opt)
            optimizers.append(name)
    try:
        save(tensors, checkpoint_id=str(tmp))
        dp.barrier()
        if dp.main:
            _write_json(tmp / STATE_FILE, {**state, "optimizers": optimizers, "world_size": dp.world,
                                            "parallel": dp.mode})
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)  # `path` is complete, so an older `path.old` is stale
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if dp.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dp.barrier()


def load_dcp(path: Path, parts: dict) -> dict:
    """Load a folder written by `save_dcp` into `parts` {name: (module, optimizer)} (any number of
    processes, one included: DCP reshards); returns its JSON state. Never unpickles anything but plain data."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from nestlm.errors import CheckpointError

    state = read_dcp_state(path)
    tensors = {}
    for name, (module, opt) in parts.items():
        tensors[name] = get_model_state_dict(module)
        if name in state["optimizers"]:
            tensors[f"opt_{name}"] = get_optimizer_state_dict(module, opt)
    try:
        with warnings.catch_warnings():  # one process: DCP says it assumes so; that is the point here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            load(tensors, checkpoint_id=str(path), planner=_safe_load_planner())
    except (Exception, CheckpointException) as e:  # (a BaseException) the failing ranks' errors, wrapped
        raise CheckpointError(f"{path}: unreadable distributed checkpoint ({load_error_text(e)})") from None
    for name, (module, opt) in parts.items():
        set_model_state_dict(module, tensors[name])
        if name in state["optimizers"]:
            set_optimizer_state_dict(module, opt, tensors[f"opt_{name}"])
    return state


def load_error_text(e: BaseException) -> str:
    """One line about why a checkpoint didn't load (DCP: per failing rank), without the tracebacks."""
    failures = getattr(e, "failures", None)
    if failures:
        return "; ".join(f"rank {r}: {load_error_text(exc)}" for r, (exc, _) in sorted(failures.items()))
    if isinstance(e, pickle.UnpicklingError):
        return "it holds a pickled object that is not plain data (refused: loaded with weights_only=True)"
    lines = str(e).strip().splitlines()
    return type(e).__name__ + (f": {lines[0][:200]}" if lines else "")


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
