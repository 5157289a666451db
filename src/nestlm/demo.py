"""The end-to-end demo: one small hybrid Mamba2-attention-MoE model, three nested submodels cut out of it.

    nestlm demo                  # ~3-5 minutes on 2 CPU cores
    nestlm demo --quick          # < 1 minute, a smoke test

1. tokenize the King James Bible (bytes) and pretrain a small Nemotron-H style parent from scratch
2. score every component's importance and sort the weights (the full model's function is unchanged)
3. elastic distillation (`nestlm.elastify`) for three budgets (100%, 75%, 50% of the parameters): a router
   learns each budget's widths (hidden, Mamba heads, attention heads, FFN, experts, expert FFN) while the
   nested submodels are distilled from the frozen sorted parent; the elastic checkpoint lands in elastic/
4. slice each budget out of the elastic checkpoint (`nestlm.slicing.slice`, streamed) as a plain Hugging Face
   checkpoint, reload it with transformers and compare logits
5. validation perplexity and decoding speed per budget; results.json, loss.png, loss_budget_*.png, budgets.png
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import nestlm
from nestlm.arch import SubArch, count_active_params, count_params
from nestlm.data import ByteTokenizer, eval_windows, kjv_text, perplexity, split, token_batches
from nestlm.device import autocast, resolve, torch_threads
from nestlm.elastic.artifact import resolve_budget
from nestlm.elastic.config import ElasticConfig, budget_name
from nestlm.elastic.optim import adamw, lr_at
from nestlm.errors import Interrupted
from nestlm.io.safetensors import own_folder

BUDGETS = (1.0, 0.75, 0.5)  # fractions of the parent's parameters
CHECKPOINT_EVERY = 50  # elastify steps between training checkpoints (Ctrl-C loses at most this many)
# the router's width choices per axis, largest first (fractions of the demo widths: hidden 128, 4 Mamba heads
# and 2 query heads per group, MLP 384, 8 experts of 128 channels); channels stay multiples of 8
CHOICES = {
    "hidden": [1.0, 0.875, 0.75, 0.625, 0.5],
    "mamba_heads_per_group": [1.0, 0.75, 0.5],
    "attn_heads_per_group": [1.0, 0.5],
    "ffn": [1.0, 0.75, 0.5, 0.25],
    "experts": [1.0, 0.75, 0.5],
    "moe_ffn": [1.0, 0.75, 0.5],
}
PROMPT = "And God said,"


def demo_config(vocab_size: int) -> nestlm.ModelConfig:
    """A Nemotron-H style hybrid: Mamba2, MLP, attention, MoE blocks; ~0.79M parameters."""
    return nestlm.ModelConfig(
        family="nemotron_h", vocab_size=vocab_size, hidden_size=128, pattern="M-*EM-", tie_embeddings=True,
        num_heads=4, num_kv_heads=2, head_dim=32,  # attention: 2 KV groups of 2 query heads, no RoPE
        intermediate_size=384,  # MLP (ReLU²)
        mamba_heads=8, mamba_head_dim=32, mamba_groups=2, ssm_state=16, chunk_size=32,
        n_experts=8, top_k=2, moe_intermediate_size=128, shared_intermediate_size=128,
        hf_extra={"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258},
    )


# -------------------------------------------------------------------------------------------- training
def pretrain(model, ids, steps: int, batch: int, seq_len: int, lr: float,
             gen: torch.Generator, dtype: torch.dtype = torch.float32) -> list[float]:
    """Next-token cross-entropy on random windows of ids [n]. Returns the loss of every step.
    dtype bf16: the forward under bf16 autocast (weights and AdamW state stay fp32)."""
    opt = adamw(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    dev = model.embeddings.weight.device
    model.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc="pretrain", unit="step")):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 10))
        x, y = (t.to(dev) for t in token_batches(ids, batch, seq_len, gen))  # [b, t], [b, t]
        with autocast(dtype, dev):
            logits = model(x)  # [b, t, V] fp32
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def elastic_config(steps: int, batch: int, seq_len: int, seed: int) -> ElasticConfig:
    """Elastic distillation settings for the demo model: budgets by parameter count, the CHOICES above.

    The parent is already sorted (sort=False). The router is small and fast (lr 0.03, a doubled budget loss)
    so that its cost lands on the budget within a few hundred steps. lr_model 1e-3 suits this 0.8M-parameter
    model (the library's default, 1e-4, is the papers' for 12B-30B models). Everything else is the library's
    default: every budget on every batch (one teacher forward), a cosine lr after a 10% warmup, and
    sample_tolerance 0.02 (training samples only architectures within 2% of each budget, so the one the
    manifest exports is one training sampled). docs/results.md (issue 29) has the measurements behind these
    defaults on two corpora, two families and three seeds. A checkpoint every 50 steps: an interrupted run
    resumes from the last one."""
    return ElasticConfig(budgets=list(BUDGETS), metric="params", choices=CHOICES, align=8, mode="hard",
                         sort=False, router_hidden=32, lr_router=0.03, router_weight=2.0, lr_model=1e-3,
                         steps=steps, batch=batch, seq_len=seq_len, seed=seed, checkpoint_every=CHECKPOINT_EVERY)


def read_log(path: Path) -> list[dict]:
    """The elastify jsonl log: one record per step (budget, kd, cost_ratio, the chosen widths, ...)."""
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def sort_by_importance(model, ids, batch: int, seq_len: int, n_batches: int, gen: torch.Generator) -> dict:
    """Score on random windows of ids and sort in place; check that the full model's logits did not move."""
    from nestlm.elastic.importance import importance
    from nestlm.elastic.sort import sort_

    dev = model.embeddings.weight.device
    batches = [token_batches(ids, batch, seq_len, gen)[0].to(dev) for _ in range(n_batches)]  # [b, t] each
    probe = batches[0][:2]
    model.eval()
    with torch.no_grad():
        before = model(probe)
        scores = importance(model, batches)
        sort_(model, scores)
        diff = (model(probe) - before).abs().max().item()
    return {"sorted": True, "note": f"sorted; full-model logits moved by {diff:.1e}", "max_abs_diff": diff}


# -------------------------------------------------------------------------------------------- budgets
def check_hf(model, sub: SubArch, folder: Path, x: torch.Tensor) -> float:
    """Max |logits| difference between the elastic model at `sub` and the exported folder in transformers."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            with torch.no_grad():
                ref = hf(x.cpu()).logits.float()  # [b, t, V]
                ours = model(x, sub=sub).cpu()  # [b, t, V]
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    return (ref - ours).abs().max().item()


def decode_speed(model, sub: SubArch, prompt: torch.Tensor, n_new: int) -> tuple[float, torch.Tensor]:
    """Greedy decoding of the standalone submodel: (new tokens per second, all tokens [1, t + n_new])."""
    from nestlm.inference.generate import generate
    from nestlm.model.extract import extract

    small = extract(model, sub).eval()
    with torch_threads(1):  # batch-1 decoding of a tiny model: intra-op threads only add sync overhead
        generate(small, prompt, 4)  # warm-up
        t0 = time.perf_counter()
        out = generate(small, prompt, n_new)
        return n_new / (time.perf_counter() - t0), out


# -------------------------------------------------------------------------------------------- report
def format_table(rows: list[dict]) -> str:
    head = ["budget", "params", "active", "router cost", "ppl 0-shot", "ppl", "tok/s (1 thread)",
            "max|Δlogits| vs HF"]
    body = [[r["name"], f"{r['params']:,}", f"{r['active_params']:,}", f"{r['router_cost']:.3f}",
             f"{r['ppl_zero_shot']:.2f}", f"{r['ppl']:.2f}", f"{r['tok_per_s']:.0f}", f"{r['max_abs_diff_hf']:.1e}"]
            for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]

    def line(cells):
        return " | ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))

    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in body])


def _smooth(v: list[float], k: int) -> list[float]:
    """Trailing moving average over k points (the per-step KD of one budget is noisy)."""
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x - (v[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def plot(out: Path, pre: list[float], log: list[dict], rows: list[dict]) -> None:
    """loss.png (pretraining; elastic KD per budget), loss_<budget>.png (KD and router cost per budget),
    budgets.png (perplexity against parameters, zero-shot and after elastic distillation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2 if log else 1, figsize=(10 if log else 5, 3.5), squeeze=False)
    ax[0, 0].plot(pre)
    ax[0, 0].set(title="pretraining", xlabel="step", ylabel="cross-entropy (nats/byte)")
    for r in rows if log else []:
        recs = [x for x in log if x["budget"] == r["elastic_name"]]
        if recs:
            kd = _smooth([max(x["kd"], 1e-6) for x in recs], 10)
            ax[0, 1].plot([x["step"] for x in recs], kd, label=r["name"])
    if log:
        ax[0, 1].set(title="elastic distillation (nestlm.elastify)", xlabel="step",
                     ylabel="KL to the frozen parent (avg of 10)", yscale="log")
        ax[0, 1].legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)

    for r in rows:  # one figure per budget: its KD and the router's chosen cost, from the jsonl log
        recs = [x for x in log if x["budget"] == r["elastic_name"]]
        if not recs:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        steps = [x["step"] for x in recs]
        ax.plot(steps, [x["kd"] for x in recs], ".", ms=3, alpha=0.4, color="C0")
        ax.plot(steps, _smooth([x["kd"] for x in recs], 10), color="C0", label="KL to parent (avg of 10)")
        ax.set(xlabel="elastify step", ylabel="KL to the frozen parent",
               title=f"{r['name']}: target {r['frac']:.0%} of the parameters")
        cost = ax.twinx()
        cost.plot(steps, [x["cost_ratio"] for x in recs], color="C1", lw=1, label="sampled cost / full")
        cost.axhline(r["frac"], color="C1", ls="--", lw=1)
        cost.set(ylabel="router cost (params / full)", ylim=(0, 1.05))
        fig.legend(loc="upper right", bbox_to_anchor=(0.86, 0.9), fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"loss_{r['name']}.png", dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    params = [r["params"] / 1e6 for r in rows]
    ax.plot(params, [r["ppl_zero_shot"] for r in rows], "o--", label="sliced, zero-shot")
    ax.plot(params, [r["ppl"] for r in rows], "o-", label="after elastic distillation")
    for r, p in zip(rows, params, strict=True):
        ax.annotate(r["name"], (p, r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="parameters (M)", ylabel="validation perplexity", title="nested budgets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "budgets.png", dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- the demo
def demo(out_dir: str | Path = "nestlm-demo", steps: int | None = None, seed: int = 0, device: str | None = None,
         quick: bool = False, elastify_steps: int | None = None, threads: int | None = None,
         dtype: str | None = None) -> dict:
    """Run the whole pipeline (see the module docstring); returns what it writes to out_dir/results.json.
    device, dtype: nestlm.device's rule (cuda and bf16 when available, else cpu and fp32); pretraining and
    elastify train in that precision, perplexity and the transformers check run on the fp32 weights.

    threads: torch intra-op threads meanwhile; None: nestlm.device.default_threads (the idle cores). Measured on
    2 idle cores a second thread makes the steps of this small model 1.5x faster, but ~20x slower when the
    cores are busy, which is why the default counts only the cores other processes leave idle."""
    dev, dt = resolve(device, dtype)  # an unavailable device or precision: one line before any work
    out = Path(out_dir)
    clear_demo_dir(out)
    try:
        with torch_threads(threads):
            return _demo(out, steps, seed, dev, quick, elastify_steps, dt)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped; {out} keeps what was finished, and running the demo again starts it "
                          "over") from None


OWNED = ("results.json", "tokenizer", "elastic", "loss.png", "budgets.png")  # (and loss_*.png, budget_*/)


def clear_demo_dir(out: Path) -> None:
    """The demo writes only into a new or empty folder or its own earlier output, and clears that output's
    elastic/ folder first (the run starts over: old training state and TensorBoard files would pile up)."""
    own_folder(out, "a demo output", OWNED)  # nestlm.io's one rule for existing output folders
    if (out / "elastic").is_dir():
        shutil.rmtree(out / "elastic")


def _demo(out: Path, steps: int | None, seed: int, device: torch.device, quick: bool, elastify_steps: int | None,
          dtype: torch.dtype = torch.float32) -> dict:
    from nestlm.load import load_elastic
    from nestlm.slicing import slice as slice_

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    steps = steps if steps is not None else (40 if quick else 600)
    elastify_steps = elastify_steps if elastify_steps is not None else (40 if quick else 100)
    batch, seq_len = (8, 64) if quick else (16, 128)
    n_eval = 16 if quick else 96  # validation windows per perplexity
    gen = torch.Generator().manual_seed(seed)

    # 1. data and the parent model
    tok = ByteTokenizer()
    train_ids, val_ids = split(tok.encode_tensor(kjv_text()), val_frac=0.05)  # [n], [v]
    tok.save(out / "tokenizer")
    cfg = demo_config(tok.vocab_size)
    model = nestlm.Decoder(cfg).init_weights(seed).to(device)

    def ppl(m, sub=None):
        return perplexity(m, val_ids, seq_len, batch=16, sub=sub, max_windows=n_eval)

    untrained = ppl(model)
    print(f"KJV: {len(train_ids):,} train / {len(val_ids):,} val bytes; parent {count_params(cfg):,} params "
          f"({count_active_params(cfg):,} active); untrained ppl {untrained:.1f}")
    pre_losses = pretrain(model, train_ids, steps, batch, seq_len, lr=3e-3, gen=gen, dtype=dtype)

    # 2. importance sorting
    sorting = sort_by_importance(model, train_ids, batch, seq_len, n_batches=2 if quick else 8, gen=gen)

    # 3. elastic distillation: the router picks each budget's widths, the nested submodels learn from the parent
    ecfg = elastic_config(elastify_steps, batch, seq_len, seed)
    elastic_dir = out / "elastic"
    t0 = time.perf_counter()
    # windows from a random offset of the training stream (get_batch reads it front to back)
    start = int(torch.randint(0, len(train_ids) // 2, (1,), generator=gen))
    nestlm.elastify(ecfg, model, train_ids[start:].to(device), elastic_dir, resume=False, device=device, dtype=dtype)
    elastify_s = time.perf_counter() - t0
    tok.save(elastic_dir)  # tokenizer files travel with every slice
    elastic, _, manifest = load_elastic(elastic_dir)
    elastic = elastic.to(device).eval()
    log = read_log(elastic_dir / "train" / "log.jsonl")

    # 4. slice each budget from the elastic checkpoint + check with transformers, 5. perplexity and speed
    model.eval()
    check_x = eval_windows(val_ids, 64)[:2, :-1].to(device)  # [2, 64]
    prompt = torch.tensor([tok.encode(PROMPT)], device=device)  # [1, t]
    rows = []
    full_params = count_params(cfg)
    for frac in tqdm(BUDGETS, desc="slice + eval", unit="budget"):
        name, elastic_name = f"budget_{round(frac * 100)}", budget_name(frac)
        sub = resolve_budget(None, elastic_name, manifest=manifest)[1]
        folder = slice_(elastic_dir, elastic_name, out / name, overwrite=True)
        speed, text = decode_speed(elastic, sub, prompt, 24 if quick else 64)
        rows.append({
            "name": name, "elastic_name": elastic_name, "frac": frac, "sub": sub.resolve(cfg).to_dict(),
            "path": str(folder), "params": count_params(cfg, sub), "active_params": count_active_params(cfg, sub),
            "router_cost": count_params(cfg, sub) / full_params,
            "ppl_zero_shot": ppl(model, sub), "ppl": ppl(elastic, sub), "tok_per_s": speed,
            "max_abs_diff_hf": check_hf(elastic, sub, folder, check_x), "sample": tok.decode(text[0]),
        })

    results = {
        "config": cfg.to_dict(), "seed": seed, "quick": quick, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "data": {"train_tokens": len(train_ids), "val_tokens": len(val_ids), "eval_tokens": n_eval * seq_len},
        "untrained_ppl": untrained,
        "pretrain": {"steps": steps, "batch": batch, "seq_len": seq_len, "first_loss": pre_losses[0],
                     "final_loss": sum(pre_losses[-10:]) / len(pre_losses[-10:])},
        "sorting": sorting,
        "elastify": {"steps": elastify_steps, "seconds": elastify_s, "dir": str(elastic_dir),
                     "config": ecfg.to_dict(), "manifest_budgets": manifest["budgets"]},
        "budgets": rows,
        "loss": {"pretrain": pre_losses,
                 "elastify": {r["name"]: [x["kd"] for x in log if x["budget"] == r["elastic_name"]] for r in rows}},
    }
    plot(out, pre_losses, log, rows)
    results["wall_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\nsorting: {sorting['note']}")
    print(f"elastify: {elastify_steps} steps in {elastify_s:.0f} s -> {elastic_dir}\n")
    print(format_table(rows))
    for r in rows:
        print(f"\n{r['name']}: {r['sample']!r}")
    print(f"\nwrote {out}/results.json, loss.png, budgets.png, elastic/ and {', '.join(r['name'] for r in rows)} "
          f"in {results['wall_s']:.0f} s")
    return results
