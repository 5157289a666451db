"""Elastic distillation: train every budget's nested submodel inside one model, with a learned router.

    out = nestlm.elastify("elastic.yaml", "path/to/hf_parent", tokens, "out/elastic")
    model, router, manifest = nestlm.load_elastic("out/elastic")
    nestlm.to_hf(model, "out/77", sub=SubArch.from_dict(manifest["budgets"]["77%"]["sub"]))

The training loop below reads top to bottom (torchtune style; no trainer framework), in named phases:
`setup` (models, router, optimizers: a `Run`), `train_step` (public: the benches time it), `log_step`,
`save_checkpoint`, and the loop `_train` that strings them together:

    parent --(importance, sort_)--> student; teacher = frozen deepcopy of the sorted parent
    each step: sample a budget (stage 1: p_full for the full model, else uniform; stage 2: stage2_weights)
               router samples a width per axis (Gumbel-Softmax, tau annealed, logit scale ramped); with the
               depth axis also how many depth units to keep (dropped least important first, scored up front)
               hard: student = the SLICED submodel, logits * prod(chosen straight-through weights) (== 1.0)
               soft: student = the full-width model with channel masks (expected widths)
               loss = KL(teacher || student) + lambda * relu(|E[cost] / target - 1| - dead_zone)
    AdamW for the model and AdamW for the router; gradient accumulation; jsonl log; atomic checkpoints that
    resume bit-exactly (CPU, same seeds): weights, both optimizers, torch/python RNG, step, data position.

Device and precision (`device=`, `dtype=`; nestlm.device's rule: cuda and bf16 when available, else cpu and
fp32): bf16 runs the student's forward under autocast over fp32 weights and AdamW state, holds the frozen
teacher in bf16, and takes the logits' KL in fp32; `activation_checkpointing` recomputes each block in the
backward. `nestlm plan` (nestlm.plan) says beforehand how much memory a GPU needs.

The same call runs on one process or on N under torchrun (`parallel="ddp" | "fsdp2"`, see nestlm.elastic.parallel):
every rank draws the same budgets and noise and takes batch / N rows of each global batch, so the loss is the
one-process loss up to float summation order. Checkpoints are then torch.distributed.checkpoint folders.

Faults: every input is checked before anything is written (the config against the model, the data against
its vocabulary, a checkpoint to resume against the parent and the config); checkpoints go to a temporary
name and are renamed when complete, so a crash (kill -9 included) mid-write keeps the previous one; a
non-finite loss stops the run before the optimizer step with a FloatingPointError that names the step, the
budget and the last good checkpoint.

Output folder (`out_dir`): the full sorted model as a standard HF checkpoint (config.json, model.safetensors),
`router.safetensors`, and the manifest `nestlm_elastic.json`; training state lives in `out_dir/train/`
(`checkpoint.pt` from one process, the folder `checkpoint/` from N).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nestlm.arch import unit_order
from nestlm.device import autocast, resolve_device, resolve_dtype
from nestlm.elastic import checkpoint as ckpt
from nestlm.elastic import parallel
from nestlm.elastic.artifact import MANIFEST, export, load_router_weights, router_file
from nestlm.elastic.config import DEPTH, ElasticConfig, budget_name
from nestlm.elastic.losses import kd_loss, router_loss
from nestlm.elastic.optim import adamw
from nestlm.elastic.parallel import setup as setup_parallel
from nestlm.elastic.router import Router
from nestlm.errors import ConfigError, Interrupted
from nestlm.io.safetensors import check_output, own_folder, read_config
from nestlm.io.tokenizer import check_ids, copy_tokenizer, folder_tokens


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


def check_data(data, ecfg: ElasticConfig, vocab_size: int, world: int = 1) -> None:
    """Fail early, before anything is written, on data that can't train this model: empty or shorter than one
    window, not integer token ids, ids outside the vocabulary (another tokenizer's), batches that don't split
    over `world` processes. A callable is checked on its first batch."""
    longest = max(ecfg.seq_len, ecfg.stage2_seq_len or 0)
    if isinstance(data, torch.Tensor):
        if data.dim() != 1:
            raise ValueError(f"data: a token tensor must be a 1-D stream of ids, got shape {tuple(data.shape)} "
                             "(pass a list of [b, t] batches instead)")
        if len(data) < longest + 1:
            raise ValueError(f"data: {len(data)} tokens are too few for one window of seq_len {longest} "
                             f"(need at least {longest + 1})")
        tensors = {"data": data}
    else:
        if isinstance(data, (list, tuple)):
            if not data:
                raise ValueError("data: the list of batches is empty")
            tensors = {f"data[{i}]": b for i, b in enumerate(data)}
        elif callable(data):
            tensors = {f"data(0, {ecfg.batch}, {ecfg.seq_len})": data(0, ecfg.batch, ecfg.seq_len)}
        else:
            raise TypeError("data must be a 1-D token tensor, a list of [b, t] batches, or a callable (pos, b, t)")
        for where, b in tensors.items():  # batches: [b, t], non-empty, rows split over the processes
            if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.numel() == 0:
                raise ValueError(f"{where}: expected a non-empty [batch, seq_len] tensor of token ids, got "
                                 f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
            if b.shape[0] % world:
                raise ConfigError(f"{where}: {b.shape[0]} rows don't split over {world} processes")
    for where, b in tensors.items():
        if b.is_floating_point() or b.is_complex() or b.dtype == torch.bool:
            raise ValueError(f"{where}: expected integer token ids, got {b.dtype}")
        check_ids(b, vocab_size, where)
    if ecfg.sort and ecfg.calib_batches < 1:
        raise ConfigError(f"ElasticConfig: calib_batches must be >= 1 to sort by importance, got {ecfg.calib_batches}")
    if _scores_depth(ecfg) and ecfg.calib_batches < 1:
        raise ConfigError(f"ElasticConfig: calib_batches must be >= 1 to score the depth units (or set "
                          f"depth_order), got {ecfg.calib_batches}")


# ---------------------------------------------------------------------------------------------- setup
def _load_parent(model_or_path):
    from nestlm.convert import from_hf

    if isinstance(model_or_path, (str, Path)):
        return from_hf(model_or_path)
    return copy.deepcopy(model_or_path)  # never modify the caller's model


def _fingerprint(model) -> float:
    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in model.parameters()))


def _bits(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float64).view(torch.int64))


def _scores_depth(ecfg: ElasticConfig) -> bool:
    """Whether `prepare` scores the depth units (the depth axis without a given depth_order)."""
    return ecfg.depth_axis and ecfg.depth_order is None


def prepare(ecfg: ElasticConfig, model_or_path, data, world: int = 1, device: torch.device | None = None):
    """(student, teacher, router): the sorted parent, its frozen copy, and a fresh router. Every input is
    checked (config against the model, data against its vocabulary) before the slow part starts.

    With the depth axis and no depth_order, the depth study (importance's per-block scores) on the same
    calibration batches orders the units, least important first; the router's config (`router.ecfg`, a copy
    of `ecfg`) holds that order, and so do the checkpoints and the manifest written from it."""
    from nestlm.elastic.importance import importance
    from nestlm.elastic.sort import sort_

    model = _load_parent(model_or_path).float()
    if device is not None:  # score and sort where training runs
        model = model.to(device)
    choices = ecfg.resolve_choices(model.cfg)  # fail early, with the axis named, if a choice doesn't fit
    if ecfg.quant:  # QAD: every budget's quantized input widths must stay whole blocks (depth changes none)
        from nestlm.quant.fake import check_elastic

        check_elastic(model.cfg, dataclasses.replace(ecfg, axes=[a for a in choices if a != DEPTH]))
    check_data(data, ecfg, model.cfg.vocab_size, world)
    if ecfg.sort or _scores_depth(ecfg):
        calib = [get_batch(data, i, ecfg.batch, ecfg.seq_len) for i in range(ecfg.calib_batches)]
        layer_batches = ecfg.calib_batches if _scores_depth(ecfg) else 0
        scores = importance(model, calib, layer_batches=layer_batches, progress=False)
        if _scores_depth(ecfg):  # sorting permutes channels only: the parent's function, so these scores, stay
            ecfg = dataclasses.replace(ecfg, depth_order=unit_order(model.cfg, scores["layers"].tolist()))
        if ecfg.sort:
            sort_(model, scores)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if ecfg.quant:  # QAD: the student sees fake-quantized weights, the teacher stays full precision
        from nestlm.quant.fake import fake_quantize_

        fake_quantize_(model, ecfg.quant)
    torch.manual_seed(ecfg.seed)
    router = Router(model.cfg, ecfg)
    return model, teacher, router


# ---------------------------------------------------------------------------------------------- the loop
def budget_loss(router: Router, ecfg: ElasticConfig, bi: int, logits, tau: float, scale: float):
    """(router loss, expected cost ratio) of budget `bi` at this step's schedules; logits: the step's
    `router.budget_logits(bi)` (None for the pinned full budget).

    The budget loss is taken on the expected cost under the noise-free choice probabilities (smooth), plus
    the expected loss over architectures at a capped sharpness, so that its gradient survives the end of
    the schedules (see Router.expected_loss)."""
    frac = ecfg.budgets[bi]
    expected = router.cost_ratio(router.probs(bi, tau, scale, logits=logits))
    rl = router_loss(expected, frac, ecfg.router_weight, ecfg.dead_zone)
    if not router.pinned(bi) and ecfg.expected_loss_weight > 0:
        p = router.probs(bi, 1.0, min(scale / tau, ecfg.expected_loss_sharpness), logits=logits)
        rl = rl + ecfg.expected_loss_weight * router.expected_loss(
            p, lambda c: router_loss(c, frac, ecfg.router_weight, ecfg.expected_loss_dead_zone))
    return rl, expected


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Run:
    """What `setup` builds for one run, and what `train_step` and `save_checkpoint` work on. A bench builds one by
    hand: Run(ecfg, model, model, teacher, router, adamw(...), adamw(...))."""

    ecfg: ElasticConfig  # the router's config (with the depth axis: its depth_order filled in)
    model: torch.nn.Module  # the bare student module (its state dict is the checkpoint's)
    student: Callable  # what the step calls: `model`, or its DDP / FSDP2 wrapper
    teacher: Callable  # ids [b, t] -> logits [b, t, v]: the frozen sorted parent, in the compute precision
    router: Router
    opt_model: torch.optim.Optimizer
    opt_router: torch.optim.Optimizer
    dp: parallel.DataParallel = field(default_factory=parallel.DataParallel)
    dtype: torch.dtype = torch.float32  # the compute precision of the student's forward (autocast)
    budget_rng: random.Random = field(default_factory=random.Random)  # budget sampling (Gumbel: torch's RNG)
    fingerprint: float = 0.0  # sum of |teacher weights|: a checkpoint must come from the same parent

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def setup(ecfg: ElasticConfig, model_or_hf_path, data, dp: parallel.DataParallel, router_init=None,
          device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Run:
    """The run's models, router and optimizers (see `prepare`): on `device`, the teacher in `dtype`, the
    student wrapped for DDP / FSDP2 on N ranks, the RNGs seeded from ecfg.seed. Every rank must start from
    the same parent (checked)."""
    if ecfg.batch % dp.world:
        raise ConfigError(f"ElasticConfig: batch {ecfg.batch} doesn't split over {dp.world} processes (each "
                          "takes batch / world rows of every global batch)")
    model, teacher, router = prepare(ecfg, model_or_hf_path, data, dp.world, device)
    if router_init is not None:
        _load_router(router, Path(router_init))
    fingerprint = _fingerprint(teacher)
    dp.check_same("parent models (sum of |weights|)", [_bits(fingerprint)])  # every rank must start alike
    if device is not None:
        model, teacher, router = model.to(device), teacher.to(device), router.to(device)
    teacher = teacher.to(dtype)  # frozen, no grad: held in the compute precision (the student stays fp32)
    model.checkpoint_blocks = router.ecfg.activation_checkpointing
    student, teacher = parallel.wrap(model, teacher, dp, dtype)  # what we call; `model` stays the bare module
    opt_model = adamw(model.parameters(), lr=ecfg.lr_model, weight_decay=ecfg.weight_decay)
    opt_router = adamw(router.parameters(), lr=ecfg.lr_router, weight_decay=0.0)
    budget_rng = random.Random(ecfg.seed)
    random.seed(ecfg.seed)
    torch.manual_seed(ecfg.seed)
    return Run(router.ecfg, model, student, teacher, router, opt_model, opt_router, dp, dtype, budget_rng,
               fingerprint)


def train_step(run: Run, batches: Iterable[torch.Tensor], bis: Sequence[int], tau: float, scale: float,
               update_model: bool = True, choose: Callable | None = None, update_router: bool = True
               ) -> dict[int, dict]:
    """One optimizer step of elastic distillation. batches: the step's ecfg.grad_accum micro-batches (gradient
    accumulation), this rank's rows [b, t] on the run's device, read one at a time; bis: the budgets (indices into ecfg.budgets) that share each
    of them; tau, scale: the router's schedules at this step.

    Per micro-batch one teacher forward, then per budget: the router's width weights (Gumbel-Softmax;
    `choose(bi, logits, tau, scale)` replaces that draw, e.g. a bench's fixed widths), the student at them
    (pinned: the full model; hard: the sliced submodel times the straight-through gate; soft: channel masks),
    loss = weight * KD + the budget loss, backward. Then the router's gradients are averaged over ranks, the
    loss and gradients checked finite (FloatingPointError before any update otherwise), and both AdamW
    optimizers step (the model's only when `update_model`: the router may train alone first; the router's only
    when `update_router`: it is frozen once settled).
    Returns {bi: {"kd", "rl" (means over the micro-batches, kd over the ranks), "w", "expected"}}."""
    ecfg, router, dp, model = run.ecfg, run.router, run.dp, run.model
    hard = ecfg.mode == "hard"
    accum = ecfg.grad_accum
    per = {bi: {"kd": 0.0, "rl": 0.0} for bi in bis}  # this step's losses and choices per budget
    for micro, ids in enumerate(batches):
        with torch.no_grad():
            t_logits = run.teacher(ids)  # one teacher forward for every budget of the step
        for j, bi in enumerate(bis):
            lg = None if router.pinned(bi) else router.budget_logits(bi)  # one router forward per budget
            w = router.sample(bi, tau, scale, hard=hard, logits=lg, tol=ecfg.sample_tolerance) if choose is None \
                else choose(bi, lg, tau, scale)
            sub = router.subarch(w)
            extra = {} if router.pinned(bi) else {"sub": sub, "gate": router.gate(w)} if hard else \
                {"masks": router.masks(w)}
            last = micro == accum - 1 and j == len(bis) - 1
            with parallel.grad_sync(run.student, dp, sync=last):
                # pinned: the full model, no router in the loop; hard: compute follows the budget, the gate
                # (== 1.0) passes the KD gradient to the router; soft: expected widths as channel masks
                with autocast(run.dtype, ids.device):  # bf16: matmuls in bf16 over the fp32 weights; logits fp32
                    s_logits = run.student(ids, **extra)
                kd = kd_loss(s_logits, t_logits, ecfg.kd_temperature)  # in fp32
                rl, expected = budget_loss(router, ecfg, bi, lg, tau, scale)
                weight = ecfg.full_weight if ecfg.budgets[bi] == 1.0 else 1.0
                loss = (weight * kd + rl) / (accum * len(bis))
                loss.backward()
            per[bi]["kd"] += float(kd.detach()) / accum
            per[bi]["rl"] += float(rl.detach()) / accum
            per[bi]["w"], per[bi]["expected"] = w, expected

    # ---- the update: the router is replicated, average its gradients (DDP / FSDP2 did the student's)
    parallel.average_grads_(router.parameters(), dp)
    for r in per.values():
        r["kd"] = dp.mean(r["kd"])  # the global batch's loss (rl is the same on every rank)
    kd_sum, rl_sum = sum(r["kd"] for r in per.values()), sum(r["rl"] for r in per.values())
    bad = None  # stop before the update: the weights stay good, the last checkpoint the last good one
    if not math.isfinite(kd_sum + rl_sum):
        bad = f"loss is {kd_sum + rl_sum} (kd {kd_sum}, router {rl_sum})"
    elif not parallel.all_finite(_grads(model, router), dp):
        bad = f"loss {kd_sum + rl_sum:.6g} but non-finite gradients"
    if bad:
        name = ", ".join(budget_name(ecfg.budgets[bi]) for bi in bis)
        raise FloatingPointError(f"budget {name}: {bad}; stopped before updating.")
    if update_model:
        run.opt_model.step()
    if update_router:
        run.opt_router.step()
    run.opt_model.zero_grad(set_to_none=True)
    run.opt_router.zero_grad(set_to_none=True)
    return per


def save_checkpoint(run: Run, train_dir: Path, step: int, pos: int) -> Path:
    """Everything the next step depends on (weights, both optimizers, RNGs, step, data position), written
    atomically: one process a torch.save file, N ranks a torch.distributed.checkpoint folder. Non-finite
    weights are refused (FloatingPointError). Returns the checkpoint's path."""
    model, router, dp = run.model, run.router, run.dp
    if not parallel.all_finite([*model.parameters(), *router.parameters()], dp):  # finite steps, inf weights
        raise FloatingPointError(f"weights are non-finite after step {step - 1}; not checkpointing them.")
    state = ckpt.train_state(step, pos, run.budget_rng, run.fingerprint, run.ecfg, as_text=dp.distributed)
    if dp.distributed:
        path = train_dir / ckpt.CKPT_DIR
        ckpt.save_dcp(path, _parts(run), state, dp)
    else:
        path = train_dir / ckpt.CKPT_FILE
        ckpt.save_pt(path, {"model": model.state_dict(), "router": router.state_dict(),
                            "opt_model": run.opt_model.state_dict(), "opt_router": run.opt_router.state_dict(),
                            **state})
    return path


def log_step(run: Run, per: dict[int, dict], step: int, tau: float, scale: float, seq_len: int, log_path: Path,
        writer=None, on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """One record per budget trained at this step: to log.jsonl (rank 0, every log_every steps and the last),
    TensorBoard (when installed) and `on_step`. Returns the records."""
    ecfg, router = run.ecfg, run.router
    recs = []
    for bi, r in per.items():
        name = budget_name(ecfg.budgets[bi])
        with torch.no_grad():
            cost_ratio = float(router.cost_ratio(r["w"]))
        rec = {"step": step, "budget": name, "fraction": ecfg.budgets[bi], "kd": r["kd"], "router_loss": r["rl"],
               "cost_ratio": cost_ratio, "expected_ratio": float(r["expected"].detach()),
               "sub": router.chosen(r["w"]), "tau": tau, "scale": scale, "seq_len": seq_len,
               "lr_model": run.opt_model.param_groups[0]["lr"]}
        if run.dp.main and (step % ecfg.log_every == 0 or step == ecfg.steps - 1):
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if writer is not None:
            writer.add_scalar(f"kd/{name}", r["kd"], step)
            writer.add_scalar(f"cost_ratio/{name}", rec["cost_ratio"], step)
        if on_step is not None:
            on_step(rec)
        recs.append(rec)
    return recs


def _micro_batches(data, pos: int, ecfg: ElasticConfig, seq_len: int, dp: parallel.DataParallel, device):
    """The step's micro-batches from data position `pos` on, this rank's rows [b/N, t] each, one at a time."""
    for m in range(ecfg.grad_accum):
        yield dp.rows(get_batch(data, pos + m, ecfg.batch, seq_len)).to(device)


def _parts(run: Run) -> dict:
    return {"model": (run.student, run.opt_model), "router": (run.router, run.opt_router)}


def _train(ecfg: ElasticConfig, model_or_hf_path, data, out: Path, dp: parallel.DataParallel,
           max_steps: int | None, resume: bool, progress: bool, on_step, router_init=None,
           kept: dict | None = None, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """The loop: setup, then per step its budgets and schedules, `step`, `log`, and every checkpoint_every
    steps `save_checkpoint`; at the end the elastic checkpoint (export)."""
    kept = {} if kept is None else kept  # kept["last_good"]: (path, step) of the newest complete checkpoint
    train_dir, log_path = out / "train", out / "train" / "log.jsonl"
    run = setup(ecfg, model_or_hf_path, data, dp, router_init, device, dtype)
    ecfg, step, pos = run.ecfg, 0, 0

    # ---- resume: everything that influences the next step is restored (checked before anything is written)
    if resume:
        found = ckpt.resume(train_dir, dp, _parts(run), run.fingerprint, ecfg, run.budget_rng)
        if found is not None:
            step, pos, kept["last_good"] = found
            if dp.main:
                print(f"resuming from step {step} ({kept['last_good'][0]})", flush=True)

    # ---- from here on we write: only rank 0, except for the checkpoint shards
    if dp.main:
        train_dir.mkdir(parents=True, exist_ok=True)
        _write_config(ecfg, train_dir / "elastic.yaml")
        _truncate_log(log_path, step)  # drop records of steps after the checkpoint (a crash in between)
        if step == 0:  # a fresh start: an earlier run's TensorBoard events would pile up beside this run's
            shutil.rmtree(train_dir / "tb", ignore_errors=True)
        ckpt.drop_stale(train_dir, keep=kept["last_good"][0] if "last_good" in kept else None)
    dp.barrier()

    writer = _tensorboard(train_dir) if dp.main else None
    stop = ecfg.steps if max_steps is None else min(ecfg.steps, max_steps)
    bar = tqdm(total=ecfg.steps, initial=step, disable=not (progress and dp.main), desc="elastify")
    ema: dict[str, float] = {}
    settled = None  # from settle_step on: {budget: the one-hot choices it exports}, the router frozen
    run.model.train()
    while step < stop:
        # ---- this step's budgets, schedules and context length (the same on every rank: checked)
        bis = ecfg.sample_budgets(run.budget_rng, step)  # one budget, or budgets_per_step sharing each batch
        dp.check_same("step, data position, budget and RNG state", [step, pos, *bis, parallel.rng_checksum()])
        tau, scale, seq_len = ecfg.tau_at(step), ecfg.scale_at(step), ecfg.seq_len_at(step)
        for group in run.opt_model.param_groups:
            group["lr"] = ecfg.lr_model_at(step)  # 0 while the router trains alone; warmup; schedule
        batches = _micro_batches(data, pos, ecfg, seq_len, dp, run.device)  # read as the step goes
        if step >= ecfg.settle_step() and settled is None:  # the frozen router's choices (also after a resume)
            settled = {bi: run.router.decode(bi, ecfg.landing_tolerance) for bi in range(len(ecfg.budgets))}
        try:  # the first router_warmup steps train the router alone
            per = train_step(run, batches, bis, tau, scale, update_model=step >= ecfg.model_steps()[0],
                             choose=None if settled is None else lambda bi, *_, fixed=settled: fixed[bi],
                             update_router=settled is None)
        except FloatingPointError as e:
            raise FloatingPointError(f"step {step}, {e} {_last_good_text(kept.get('last_good'))}") from None
        pos += ecfg.grad_accum
        for rec in log_step(run, per, step, tau, scale, seq_len, log_path, writer, on_step):
            name = rec["budget"]
            ema[name] = rec["kd"] if name not in ema else 0.9 * ema[name] + 0.1 * rec["kd"]
        bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()}, refresh=False)
        bar.update(1)
        step += 1
        if step % ecfg.checkpoint_every == 0 or step == stop:
            try:
                kept["last_good"] = (save_checkpoint(run, train_dir, step, pos), step)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e} {_last_good_text(kept.get('last_good'))}") from None
    bar.close()
    if writer is not None:
        writer.close()
    if step >= ecfg.steps:
        with parallel.full_weights(run.model, dp):  # FSDP2: gather the shards (every rank takes part)
            if dp.main:
                export(run.model, run.router, ecfg, out)
        dp.barrier()
    return out


def elastify(config: ElasticConfig | str | Path, model_or_hf_path, data, out_dir: str | Path, *,
             max_steps: int | None = None, resume: bool = True, progress: bool = True,
             on_step: Callable[[dict], None] | None = None, parallel: str | None = None,
             router_init: str | Path | None = None, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> Path:
    """Train the elastic model and write the elastic checkpoint folder `out_dir` (see the module doc).

    max_steps: stop (after checkpointing) once this many steps are done in total; run again to resume.
    resume: continue from the checkpoint in `out_dir/train/` if there is one. on_step: called with each log
    record (on every rank). parallel: None (automatic: DDP under torchrun or an initialised process group,
    else one process), "ddp" or "fsdp2" (see nestlm.elastic.parallel). router_init: an elastic checkpoint folder
    whose trained router starts this run (same budgets and choices; QAD keeps the widths it learned).
    device: None (cuda when available, else cpu; under torchrun each rank's own) or e.g. "cpu", "cuda:1".
    dtype: None (bf16 on CUDA, fp32 elsewhere), "bf16" or "fp32". bf16 trains the current way: fp32 weights
    and AdamW state (the master copy), the student's forward under bf16 autocast (FSDP2: bf16 all-gathers,
    fp32 gradient reduction), the frozen teacher held in bf16, logits and KL in fp32; the SSD scan and the
    MoE router stay fp32. `ecfg.activation_checkpointing` recomputes each block in the backward.
    Returns out_dir."""
    ecfg = config if isinstance(config, ElasticConfig) else ElasticConfig.load(config)
    check_out_dir(Path(out_dir), model_or_hf_path, router_init)  # before anything is read or written
    dev = resolve_device(device)  # fail on an unavailable device or precision before any work
    dt = resolve_dtype(dtype, dev)
    dp = setup_parallel(parallel)  # one process, or this rank of torchrun's N
    kept: dict = {}  # _train's record of its last complete checkpoint ("last_good"), for the Ctrl-C message
    try:
        return _train(ecfg, model_or_hf_path, data, Path(out_dir), dp, max_steps, resume, progress, on_step,
                      router_init, kept, dp.device if dp.device is not None else dev, dt)
    except KeyboardInterrupt:
        last = kept.get("last_good")
        raise Interrupted(f"stopped; the last checkpoint is {last[0]} (step {last[1]}): run the same command "
                          "again to resume from it" if last else "stopped before the first checkpoint "
                          f"(every {ecfg.checkpoint_every} steps): nothing to resume from") from None
    finally:
        dp.close()


def check_out_dir(out: Path, model_or_path=None, router_init=None) -> None:
    """elastify's output folder must be new, empty, or an elastify run's own resumable output (train/ with
    its elastic.yaml), and must not overlap the parent's folder: never write into someone else's files."""
    check_output(out, *(p for p in (model_or_path, router_init) if isinstance(p, (str, Path))), overwrite=True,
                 kind="any")
    own_folder(out, "an elastify output to resume", ("train/elastic.yaml",))  # nestlm.io's one rule


def elastify_text(config: ElasticConfig | str | Path, hf_dir: str | Path, out_dir: str | Path,
                  text: str | Path | None = None, kjv: bool = False, *, max_steps: int | None = None,
                  resume: bool = True, parallel: str | None = None, device: str | None = None,
                  dtype: str | None = None) -> Path:
    """`nestlm elastify`: `elastify` of the parent folder `hf_dir` on the text file `text` (or the KJV Bible)
    by its tokenizer, as far as training reads it. The device and precision, then the output folder, are
    checked before the text is read (ConfigError when it is too short for one window); the finished checkpoint
    gets the parent's tokenizer files (rank 0 under torchrun)."""
    from nestlm.convert import config_from_hf

    resolve_dtype(dtype, resolve_device(device))  # an unavailable device or precision: before anything is read
    ecfg = config if isinstance(config, ElasticConfig) else ElasticConfig.load(config)
    check_out_dir(Path(out_dir), hf_dir)  # before the text is read (elastify checks it again)
    cfg = config_from_hf(read_config(hf_dir))
    longest = max(ecfg.seq_len, ecfg.stage2_seq_len or 0)
    need = (ecfg.steps * ecfg.grad_accum + ecfg.calib_batches) * ecfg.batch * longest + 1  # what training reads
    ids = folder_tokens(hf_dir, cfg.vocab_size, text, kjv, need=need)
    if len(ids) < longest + 1:
        raise ConfigError(f"the text gives {len(ids)} tokens, too few for one window of seq_len {longest}")
    dst = elastify(ecfg, hf_dir, ids, out_dir, max_steps=max_steps, resume=resume, parallel=parallel, device=device,
                   dtype=dtype)
    if int(os.environ.get("RANK", "0")) == 0 and (dst / MANIFEST).is_file():  # finished: rank 0 copies
        copy_tokenizer(hf_dir, dst)
    return dst


def _grads(*modules) -> list[torch.Tensor]:
    return [p.grad for m in modules for p in m.parameters() if p.grad is not None]


def _last_good_text(last_good) -> str:
    if last_good is None:
        return "No checkpoint has been written yet."
    return f"The last good checkpoint is {last_good[0]} (step {last_good[1]})."


def _truncate_log(path: Path, step: int) -> None:
    """Keep the records of steps before `step`; a torn last line (a crash mid-write) is dropped too."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["step"] < step:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(ln + "\n" for ln in keep))


def _write_config(ecfg: ElasticConfig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    ecfg.save(tmp)
    os.replace(tmp, path)


def _tensorboard(train_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(train_dir / "tb"))


# ---------------------------------------------------------------------------------------------- export / load
def _load_router(router: Router, path: Path) -> None:
    """Start from the router of an elastic checkpoint folder (or a router.safetensors file)."""
    diff = load_router_weights(router, path, "router_init: an elastic checkpoint's router")
    if diff:
        raise ConfigError(f"router_init: {router_file(path)} was trained for other budgets or choices ({diff})")
