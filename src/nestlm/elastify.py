"""Elastic distillation: train every budget's nested submodel inside one model, with a learned router.

    out = nestlm.elastify("elastic.yaml", "path/to/hf_parent", tokens, "out/elastic")
    model, router, manifest = nestlm.load_elastic("out/elastic")
    nestlm.to_hf(model, "out/77", sub=SubArch.from_dict(manifest["budgets"]["77%"]["sub"]))

The training loop below reads top to bottom (torchtune style; no trainer framework):

    parent --(importance, sort_)--> student; teacher = frozen deepcopy of the sorted parent
    each step: sample a budget (stage 1: p_full for the full model, else uniform; stage 2: stage2_weights)
               router samples a width per axis (Gumbel-Softmax, tau annealed, logit scale ramped)
               hard: student = the SLICED submodel, logits * prod(chosen straight-through weights) (== 1.0)
               soft: student = the full-width model with channel masks (expected widths)
               loss = KL(teacher || student) + lambda * relu(|E[cost] / target - 1| - dead_zone)
    AdamW for the model and AdamW for the router; gradient accumulation; jsonl log; atomic checkpoints that
    resume bit-exactly (CPU, same seeds): weights, both optimizers, torch/python RNG, step, data position.

Output folder (`out_dir`): the full sorted model as a standard HF checkpoint (config.json, model.safetensors),
`router.safetensors`, and the manifest `nestlm_elastic.json`; training state lives in `out_dir/train/`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nestlm.arch import SubArch, count_active_params, count_params
from nestlm.config import MANIFEST, ROUTER_FILE, ElasticConfig, budget_name
from nestlm.distill import kd_loss, router_loss
from nestlm.model.config import ConfigError
from nestlm.optim import adamw
from nestlm.router import Router

MANIFEST_VERSION = 1


# ---------------------------------------------------------------------------------------------- data
def get_batch(data, pos: int, batch: int, seq_len: int) -> torch.Tensor:
    """The `pos`-th training batch [batch, seq_len], deterministic in `pos` (so resuming needs only pos).

    data: a 1-D LongTensor token stream (consecutive windows, wrapping around), a list of [b, t] batches
    (cycled), or a callable (pos, batch, seq_len) -> LongTensor."""
    if callable(data):
        return data(pos, batch, seq_len)
    if isinstance(data, torch.Tensor) and data.dim() == 1:
        n_win = (len(data) - 1) // seq_len
        if n_win < 1:
            raise ValueError(f"{len(data)} tokens are too few for windows of {seq_len}")
        rows = [(pos * batch + j) % n_win for j in range(batch)]
        return torch.stack([data[r * seq_len:(r + 1) * seq_len] for r in rows])
    if isinstance(data, (list, tuple)) and data:
        return data[pos % len(data)]
    raise TypeError("data must be a 1-D token tensor, a list of [b, t] batches, or a callable (pos, b, t)")


# ---------------------------------------------------------------------------------------------- setup
def _load_parent(model_or_path):
    from nestlm.convert import from_hf

    if isinstance(model_or_path, (str, Path)):
        return from_hf(model_or_path)
    return copy.deepcopy(model_or_path)  # never modify the caller's model


def _fingerprint(model) -> float:
    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in model.parameters()))


def prepare(ecfg: ElasticConfig, model_or_path, data):
    """(student, teacher, router): the sorted parent, its frozen copy, and a fresh router."""
    from nestlm.importance import importance
    from nestlm.sort import sort_

    model = _load_parent(model_or_path).float()
    ecfg.resolve_choices(model.cfg)  # fail early, with the axis named, if a choice doesn't fit the model
    if ecfg.sort:
        calib = [get_batch(data, i, ecfg.batch, ecfg.seq_len) for i in range(ecfg.calib_batches)]
        sort_(model, importance(model, calib, layer_batches=0, progress=False))
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if ecfg.quant:  # QAD: the student sees fake-quantized weights, the teacher stays full precision
        from nestlm.quant import check_elastic, fake_quantize_

        check_elastic(model.cfg, ecfg)  # every budget's quantized input widths stay whole blocks
        fake_quantize_(model, ecfg.quant)
    torch.manual_seed(ecfg.seed)
    router = Router(model.cfg, ecfg)
    return model, teacher, router


# ---------------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact


def _load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- the loop
def elastify(config: ElasticConfig | str | Path, model_or_hf_path, data, out_dir: str | Path, *,
             max_steps: int | None = None, resume: bool = True, progress: bool = True,
             on_step: Callable[[dict], None] | None = None) -> Path:
    """Train the elastic model and write the elastic checkpoint folder `out_dir` (see the module doc).

    max_steps: stop (after checkpointing) once this many steps are done in total; run again to resume.
    resume: continue from `out_dir/train/checkpoint.pt` if it exists. on_step: called with each log record.
    Returns out_dir."""
    ecfg = config if isinstance(config, ElasticConfig) else ElasticConfig.load(config)
    out = Path(out_dir)
    train_dir = out / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = train_dir / "checkpoint.pt", train_dir / "log.jsonl"
    ecfg.save(train_dir / "elastic.yaml")

    # ---- models: student (trained), teacher (frozen sorted parent), router
    model, teacher, router = prepare(ecfg, model_or_hf_path, data)
    opt_model = adamw(model.parameters(), lr=ecfg.lr_model, weight_decay=ecfg.weight_decay)
    opt_router = adamw(router.parameters(), lr=ecfg.lr_router, weight_decay=0.0)
    budget_rng = random.Random(ecfg.seed)  # budget sampling; Gumbel noise uses torch's global RNG
    random.seed(ecfg.seed)
    torch.manual_seed(ecfg.seed)
    step, pos = 0, 0
    fingerprint = _fingerprint(teacher)

    # ---- resume: everything that influences the next step is restored
    if resume and ckpt_path.exists():
        st = _load_checkpoint(ckpt_path)
        if st["teacher_fingerprint"] != fingerprint:
            raise ConfigError(f"{ckpt_path} was trained from another parent model (or other calibration "
                              "data); pass the same model and data, or resume=False")
        model.load_state_dict(st["model"])
        router.load_state_dict(st["router"])
        opt_model.load_state_dict(st["opt_model"])
        opt_router.load_state_dict(st["opt_router"])
        torch.set_rng_state(st["rng_torch"])
        random.setstate(st["rng_python"])
        budget_rng.setstate(st["rng_budget"])
        step, pos = st["step"], st["data_pos"]
    _truncate_log(log_path, step)  # drop records of steps after the checkpoint (a crash in between)

    def checkpoint():
        _save_checkpoint(ckpt_path, {
            "step": step, "data_pos": pos, "model": model.state_dict(), "router": router.state_dict(),
            "opt_model": opt_model.state_dict(), "opt_router": opt_router.state_dict(),
            "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(),
            "rng_budget": budget_rng.getstate(), "teacher_fingerprint": fingerprint,
            "config": ecfg.to_dict()})

    writer = _tensorboard(train_dir)
    stop = ecfg.steps if max_steps is None else min(ecfg.steps, max_steps)
    bar = tqdm(total=ecfg.steps, initial=step, disable=not progress, desc="elastify")
    ema: dict[str, float] = {}
    model.train()
    with open(log_path, "a") as log:
        while step < stop:
            # ---- this step's budget, schedules and context length
            bi = budget_rng.choices(range(len(ecfg.budgets)), weights=ecfg.budget_probs(step))[0]
            frac = ecfg.budgets[bi]
            tau, scale = ecfg.tau_at(step), ecfg.scale_at(step)
            seq_len = ecfg.seq_len_at(step)
            kd_sum, rl_sum = 0.0, 0.0

            for _ in range(ecfg.grad_accum):
                ids = get_batch(data, pos, ecfg.batch, seq_len)
                pos += 1
                with torch.no_grad():
                    t_logits = teacher(ids)
                hard = ecfg.mode == "hard"
                w = router.sample(bi, tau, scale, hard=hard)
                sub = router.subarch(w)
                if router.pinned(bi):  # the full model: no router in the loop
                    s_logits = model(ids)
                elif hard:  # compute follows the budget; the gate (== 1.0) passes the KD gradient to the router
                    s_logits = model(ids, sub=sub) * router.gate(w)
                else:  # soft: expected widths as channel masks at full width
                    s_logits = model(ids, masks=router.masks(w))
                kd = kd_loss(s_logits, t_logits, ecfg.kd_temperature)
                # budget loss on the expected cost under the noise-free choice probabilities (smooth)
                expected = router.cost_ratio(router.probs(bi, tau, scale))
                rl = router_loss(expected, frac, ecfg.router_weight, ecfg.dead_zone)
                if not router.pinned(bi) and ecfg.expected_loss_weight > 0:
                    # plus the expected loss over architectures, at a capped sharpness so its gradient
                    # survives the end of the schedules (see Router.expected_loss)
                    p = router.probs(bi, 1.0, min(scale / tau, ecfg.expected_loss_sharpness))
                    rl = rl + ecfg.expected_loss_weight * router.expected_loss(
                        p, lambda c, f=frac: router_loss(c, f, ecfg.router_weight, ecfg.expected_loss_dead_zone))
                loss = (kd + rl) / ecfg.grad_accum
                loss.backward()
                kd_sum += float(kd.detach()) / ecfg.grad_accum
                rl_sum += float(rl.detach()) / ecfg.grad_accum

            opt_model.step()
            opt_router.step()
            opt_model.zero_grad(set_to_none=True)
            opt_router.zero_grad(set_to_none=True)

            # ---- log
            name = budget_name(frac)
            rec = {"step": step, "budget": name, "fraction": frac, "kd": kd_sum, "router_loss": rl_sum,
                   "cost_ratio": float(router.cost_ratio(w).detach()), "expected_ratio": float(expected.detach()), "sub": {ax: getattr(sub, ax) for ax in router.axes},
                   "tau": tau, "scale": scale, "seq_len": seq_len}
            if step % ecfg.log_every == 0 or step == ecfg.steps - 1:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if writer is not None:
                writer.add_scalar(f"kd/{name}", kd_sum, step)
                writer.add_scalar(f"cost_ratio/{name}", rec["cost_ratio"], step)
            if on_step is not None:
                on_step(rec)
            ema[name] = kd_sum if name not in ema else 0.9 * ema[name] + 0.1 * kd_sum
            bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()}, refresh=False)
            bar.update(1)
            step += 1
            if step % ecfg.checkpoint_every == 0 or step == stop:
                log.flush()
                checkpoint()
    bar.close()
    if writer is not None:
        writer.close()
    if step >= ecfg.steps:
        export(model, router, ecfg, out)
    return out


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
    path.write_text("".join(ln + "\n" for ln in keep))


def _tensorboard(train_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(train_dir / "tb"))


# ---------------------------------------------------------------------------------------------- export / load
def manifest_for(model, router: Router, ecfg: ElasticConfig) -> dict:
    budgets = {}
    for i, frac in enumerate(ecfg.budgets):
        sub = router.subarch(router.greedy(i)) if not router.pinned(i) else SubArch()
        budgets[budget_name(frac)] = {
            "fraction": frac, "sub": sub.to_dict(),
            "params": count_params(model.cfg, sub), "active_params": count_active_params(model.cfg, sub),
            "cost_ratio": float(router.count(model.cfg, sub)) / router.full_cost}
    return {"version": MANIFEST_VERSION, "family": model.cfg.family, "metric": ecfg.metric,
            "budgets": budgets, "choices": router.choices, "elastic": ecfg.to_dict()}


def export(model, router: Router, ecfg: ElasticConfig, out_dir: str | Path) -> Path:
    """Write the elastic checkpoint into `out_dir` (other files there, like train/, are kept). Every file is
    written to a temporary folder first and moved in with os.replace; the manifest goes last."""
    from safetensors.torch import save_file

    from nestlm.convert import to_hf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export.tmp", dir=out))
    try:
        to_hf(model, tmp / "hf", overwrite=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in router.state_dict().items()},
                  str(tmp / "hf" / ROUTER_FILE))
        (tmp / MANIFEST).write_text(json.dumps(manifest_for(model, router, ecfg), indent=2))
        for f in sorted((tmp / "hf").iterdir()):
            os.replace(f, out / f.name)
        os.replace(tmp / MANIFEST, out / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_elastic(path: str | Path):
    """-> (model, router, manifest) from an elastic checkpoint folder written by `elastify` / `export`."""
    from safetensors.torch import load_file

    from nestlm.convert import CheckpointError, from_hf

    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (not an elastic checkpoint)")
    manifest = json.loads(mf.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointError(f"{mf}: manifest version {manifest.get('version')} is not {MANIFEST_VERSION}")
    ecfg = ElasticConfig.from_dict(manifest["elastic"])
    model = from_hf(path)
    router = Router(model.cfg, ecfg)
    router.load_state_dict(load_file(str(path / ROUTER_FILE)))
    return model, router.eval(), manifest


def budget_subarch(manifest: dict, name_or_frac) -> SubArch:
    """The SubArch of a manifest budget, by name ('77%', 'full') or fraction (0.77)."""
    b = manifest["budgets"]
    if isinstance(name_or_frac, str):
        return SubArch.from_dict(b[name_or_frac]["sub"])
    for v in b.values():
        if math.isclose(v["fraction"], float(name_or_frac)):
            return SubArch.from_dict(v["sub"])
    raise KeyError(f"no budget {name_or_frac} in the manifest (have {sorted(b)})")
