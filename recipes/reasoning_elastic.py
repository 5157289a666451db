"""Train a small hybrid parent on the synthetic reasoning task, then elastify it: the model budget control runs.

    python recipes/reasoning_elastic.py --out runs/reasoning                       # ~15 min on 1 CPU thread
    python recipes/reasoning_elastic.py --config recipes/configs/reasoning_tiny.yaml --out runs/reasoning

The task (nestlm.data.reasoning): 'Q:07+58-81=?\\n<think>07+58=65 65-81=84</think>A:84', modular arithmetic with a
worked trace, generated offline and deterministic by seed. Stages, each skipped when its output exists (so the
same command resumes after an interruption, and re-running a finished recipe does nothing):

  1. parent/   pretrain from scratch with next-token cross-entropy on the trace and answer tokens only (the
               question's random operands are not predictable); an HF checkpoint with the byte tokenizer.
               Checkpoints every `checkpoint_every` steps in parent_train/ and resumes from there.
  1b. parent_cut/  only with a `finetune` section: budget-control fine-tuning, as reasoning models are trained
               for it. Continues from the pretrained parent for `finetune.steps` more steps (a fresh optimizer
               and lr schedule) with a share `finetune.cut_share` of the examples cut early: trace cut at a
               random character, then '</think>A:<right answer>'. Checkpoints in finetune_train/.
  2. elastic/  nestlm.elastify of the last parent (parent_cut/ when there is one): importance sorting, router-
               chosen widths for every budget, distillation of the nested submodels from the frozen parent on
               packed task examples (cut with the last phase's cut_share); the elastic checkpoint, plus the
               tokenizer and `reasoning_task.json` (the task, for bench/budget_control.py).

The config YAML has five sections: task (nestlm.data.reasoning.TaskConfig), model (nestlm.ModelConfig fields),
pretrain (TrainPhase: steps, batch, lr, warmup, seed, checkpoint_every, cut_share), the optional finetune
(steps, lr, warmup, cut_share; the rest is pretraining's) and elastic (nestlm.ElasticConfig fields). Training
steps are numbered globally (the fine-tune's first step is pretraining's `steps`) and a step's batch depends
only on that number and its phase (`batch_at`), so the fine-tune sees other problems than pretraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import nestlm
from nestlm.data import ByteTokenizer
from nestlm.data.reasoning import TaskConfig, cut_points, encode_examples, format_example, sample_problems
from nestlm.elastic.artifact import MANIFEST, read_manifest
from nestlm.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "reasoning_tiny.yaml"
TASK_FILE = "reasoning_task.json"  # written into the elastic folder: which task the model was trained on
ELASTIFY_DATA_SEED = 1_000_000  # elastify's batches use seeds from here on: other problems than pretraining's


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class TrainPhase:
    """One training phase of the parent: `steps` AdamW steps on batches of `batch` examples, linear warmup then
    cosine decay to lr / 10 (nestlm.elastic.optim.lr_at), a share `cut_share` of the examples with the thinking cut early
    (trace cut at a random character, then '</think>A:<right answer>')."""
    steps: int = 1500
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 50
    seed: int = 0
    checkpoint_every: int = 250
    cut_share: float = 0.0

    def __post_init__(self):
        if self.steps < 0 or self.batch < 1 or self.checkpoint_every < 1 or self.warmup < 0 or self.lr <= 0:
            raise ConfigError(f"bad training phase {self}")
        if not 0 <= self.cut_share < 1:
            raise ConfigError(f"cut_share must be in [0, 1), got {self.cut_share}")


PHASE_KEYS = {f.name for f in dataclasses.fields(TrainPhase)}
FINETUNE_KEYS = {"steps", "lr", "warmup", "cut_share"}  # the rest (batch, seed, checkpoint_every): pretraining's
STAGES = {"pretrain": ("parent_train", "parent"), "finetune": ("finetune_train", "parent_cut")}  # work, output


def load_config(path: str | Path) -> dict:
    """{'task': TaskConfig, 'model': ModelConfig, 'pretrain': TrainPhase, 'finetune': TrainPhase | None,
    'elastic': ElasticConfig}. The optional `finetune` section continues from the pretrained parent (budget-
    control fine-tuning: pretrain on whole traces, then a few steps with cut ones)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe config")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - {"task", "model", "pretrain", "finetune", "elastic"})
    if unknown:
        raise ConfigError(f"{path}: unknown sections {unknown} (task, model, pretrain, finetune, elastic)")
    pre, fine = dict(raw.get("pretrain") or {}), raw.get("finetune")
    if set(pre) - PHASE_KEYS:
        raise ConfigError(f"{path}: unknown pretrain keys {sorted(set(pre) - PHASE_KEYS)}")
    if fine is not None and set(fine) - FINETUNE_KEYS:
        raise ConfigError(f"{path}: unknown finetune keys {sorted(set(fine) - FINETUNE_KEYS)} ({sorted(FINETUNE_KEYS)})")
    tok = ByteTokenizer()
    model = {"family": "nemotron_h", "vocab_size": tok.vocab_size, "tie_embeddings": True,
             "hf_extra": {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}}
    model |= raw.get("model") or {}
    try:
        task = TaskConfig(**(raw.get("task") or {}))
        mcfg = nestlm.ModelConfig.from_dict(model)
        pretrain = TrainPhase(**pre)
        finetune = None if fine is None else dataclasses.replace(pretrain, **fine)
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None
    return {"task": task, "model": mcfg, "pretrain": pretrain, "finetune": finetune,
            "elastic": nestlm.ElasticConfig.from_dict(raw.get("elastic") or {})}


def phases(cfg: dict) -> list[tuple[str, int, TrainPhase]]:
    """(stage, first global step, phase) in training order: pretraining from step 0, then the fine-tune (if
    any) from pretraining's last step on, so every step draws other problems than the ones before."""
    out = [("pretrain", 0, cfg["pretrain"])]
    if cfg.get("finetune") is not None:
        out.append(("finetune", cfg["pretrain"].steps, cfg["finetune"]))
    return out


def phase_at(cfg: dict, step: int) -> TrainPhase:
    """The phase that global training step `step` belongs to (the one rule for which batches have cuts)."""
    for _, start, phase in reversed(phases(cfg)):
        if step >= start:
            return phase
    raise ValueError(f"step must be >= 0, got {step}")


# ---------------------------------------------------------------------------------------------- data
def train_batch(task: TaskConfig, step: int, batch: int, seed: int,
                cut_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The `step`-th pretraining batch: ids [b, T] and the loss mask [b, T] (deterministic in step). A share
    `cut_share` of the examples has its trace cut at a random point, then '</think>A:<right answer>'."""
    probs = sample_problems(task, batch, seed=seed * 1_000_003 + step)
    keep = cut_points(probs, cut_share, random.Random(f"cut:{seed}:{step}")) if cut_share else None
    return encode_examples(probs, ByteTokenizer(), keep=keep)


def batch_at(cfg: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global training step `step`'s batch, with the cut share of the phase it belongs to."""
    phase = phase_at(cfg, step)
    return train_batch(cfg["task"], step, phase.batch, phase.seed, phase.cut_share)


def packed_batches(task: TaskConfig, cut_share: float = 0.0):
    """elastify's data: (pos, batch, seq_len) -> [batch, seq_len] rows of whole examples back to back
    (<bos> example <eos> <bos> example ...), cut at seq_len. Deterministic in pos. A share `cut_share` of
    the examples has its thinking cut early (as in pretraining)."""
    tok = ByteTokenizer()

    def get(pos: int, batch: int, seq_len: int) -> torch.Tensor:
        rows, k = [], 0
        probs = sample_problems(task, batch * (seq_len // 16 + 1), seed=ELASTIFY_DATA_SEED + pos)
        keep = cut_points(probs, cut_share, random.Random(f"cut:elastify:{pos}"))
        for _ in range(batch):
            row: list[int] = []
            while len(row) < seq_len:
                row += tok.encode(format_example(probs[k], keep[k]), bos=True, eos=True)
                k += 1
            rows.append(row[:seq_len])
        return torch.tensor(rows)

    return get


# ---------------------------------------------------------------------------------------------- stage 1
def masked_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the target tokens (mask 1) of ids [b, T]."""
    logits = model(ids[:, :-1])  # [b, T-1, V]
    nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")  # [b*(T-1)]
    m = mask[:, 1:].flatten()
    return (nll * m).sum() / m.sum()


def train_stage(cfg: dict, out: Path, stage: str) -> Path:
    """Stage 1 ('pretrain': from scratch, writes out/parent) or 1b ('finetune': from the pretrained parent,
    writes out/parent_cut); each an HF checkpoint + tokenizer. Checkpoints in out/<stage work folder> and
    resumes from there."""
    from nestlm.elastic.optim import adamw, lr_at

    start, phase = next((s, p) for name, s, p in phases(cfg) if name == stage)
    work_name, parent_name = STAGES[stage]
    work = out / work_name
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "checkpoint.pt"
    torch.manual_seed(phase.seed)  # init_weights leaves conv1d at its constructor's (seeded) init
    model = nestlm.Decoder(cfg["model"]).init_weights(phase.seed)
    if stage == "finetune":
        model.load_state_dict(pretrained_weights(cfg, out))
    opt = adamw(model.parameters(), lr=phase.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step, log = 0, []
    if ckpt.exists():
        st = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, log = st["step"], st["log"]
        print(f"{stage}: resuming at step {step}")
    model.train()
    t0 = time.perf_counter()
    while step < phase.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, phase.steps, phase.lr, phase.warmup)
        ids, mask = batch_at(cfg, start + step)
        loss = masked_loss(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append(loss.item())
        step += 1
        if step % 50 == 0 or step == phase.steps:
            print(f"{stage} step {step}/{phase.steps} loss {sum(log[-50:]) / len(log[-50:]):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if step % phase.checkpoint_every == 0 or step == phase.steps:
            tmp = ckpt.with_name("checkpoint.pt.tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log}, tmp)
            os.replace(tmp, ckpt)  # atomic
    parent = out / parent_name
    nestlm.to_hf(model.eval(), parent, overwrite=True)
    ByteTokenizer().save(parent)
    (work / "loss.json").write_text(json.dumps(log))
    return parent


def pretrained_weights(cfg: dict, out: Path) -> dict:
    """The finished pretraining's model state (out/parent_train/checkpoint.pt at its last step)."""
    ckpt = out / STAGES["pretrain"][0] / "checkpoint.pt"
    st = torch.load(ckpt, map_location="cpu", weights_only=True) if ckpt.is_file() else {"step": None}
    if st["step"] != cfg["pretrain"].steps:
        raise ConfigError(f"{ckpt}: the fine-tune needs pretraining finished ({cfg['pretrain'].steps} steps), "
                          f"found step {st['step']}")
    return st["model"]


def final_parent(cfg: dict, out: Path) -> tuple[str, Path]:
    """The last training stage and the parent it writes: the one elastify distills from."""
    stage = phases(cfg)[-1][0]
    return stage, out / STAGES[stage][1]


# ---------------------------------------------------------------------------------------------- stage 2
def elastify_parent(cfg: dict, parent: Path, out: Path) -> Path:
    """Stage 2: nestlm.elastify on packed task examples; writes out/elastic."""
    elastic = out / "elastic"
    cut_share = phases(cfg)[-1][2].cut_share  # the final parent's data
    nestlm.elastify(cfg["elastic"], parent, packed_batches(cfg["task"], cut_share), elastic)
    ByteTokenizer().save(elastic)
    (elastic / TASK_FILE).write_text(json.dumps(dataclasses.asdict(cfg["task"])))
    return elastic


def run(config: str | Path = DEFAULT_CONFIG, out: str | Path = "runs/reasoning") -> Path:
    """Both stages (skipping finished ones); returns the elastic checkpoint folder."""
    cfg = load_config(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times = json.loads((out / "recipe.json").read_text())["seconds"] if (out / "recipe.json").exists() else {}
    for stage, _, _ in phases(cfg):
        parent = out / STAGES[stage][1]
        if not (parent / "config.json").is_file():
            t = time.perf_counter()
            train_stage(cfg, out, stage)
            times[stage] = time.perf_counter() - t
        else:
            print(f"{stage}: {parent} exists, skipped")
    _, parent = final_parent(cfg, out)
    elastic = out / "elastic"
    if not (elastic / MANIFEST).is_file() or not (elastic / TASK_FILE).is_file():
        t = time.perf_counter()
        elastify_parent(cfg, parent, out)
        times["elastify"] = time.perf_counter() - t
    else:
        print(f"stage 2: {elastic} exists, skipped")
    (out / "recipe.json").write_text(json.dumps({"config": str(config), "seconds": times}, indent=2))
    manifest = read_manifest(elastic, required=True)
    for name, b in manifest["budgets"].items():
        widths = {k: v for k, v in b["sub"].items() if v is not None}
        print(f"{name:>6}: {b['params']:,} params  {json.dumps(widths)}")
    return elastic


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--out", type=Path, default=Path("runs/reasoning"))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"elastic checkpoint: {run(args.config, args.out)}")


if __name__ == "__main__":
    main()
