"""The end-to-end demo: one small hybrid Mamba2-attention-MoE model, three nested submodels cut out of it.

    nestlm demo                  # ~3-5 minutes on 2 CPU cores
    nestlm demo --quick          # < 1 minute, a smoke test

1. tokenize the King James Bible (bytes) and pretrain a small Nemotron-H style parent from scratch
2. score every component's importance and sort the weights (the full model's function is unchanged)
3. pick three nested budgets (100%, 75%, 50% of the parameters): each is a prefix on every width axis
4. a short distillation from the frozen parent into the sampled budgets (a plain KL loop; the
   router-based elastic trainer of Nemotron Elastic is `nestlm.elastify`)
5. export each budget as a plain Hugging Face checkpoint, reload it with transformers and compare logits
6. validation perplexity and decoding speed per budget; results.json, loss.png, budgets.png
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import nestlm
from nestlm.arch import SubArch, count_active_params, count_params, width_subarch
from nestlm.data import ByteTokenizer, eval_windows, kjv_text, perplexity, split, token_batches

BUDGETS = (1.0, 0.75, 0.5)  # fractions of the parent's parameters
BUDGET_AXES = ("hidden", "mamba_heads_per_group", "attn_heads_per_group", "ffn", "experts", "moe_ffn")
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
def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model, ids, steps: int, batch: int, seq_len: int, lr: float,
             gen: torch.Generator) -> list[float]:
    """Next-token cross-entropy on random windows of ids [n]. Returns the loss of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    dev = model.embeddings.weight.device
    model.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc="pretrain", unit="step")):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 10))
        x, y = (t.to(dev) for t in token_batches(ids, batch, seq_len, gen))  # [b, t], [b, t]
        logits = model(x)  # [b, t, V]
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def distill(model, teacher, subs: list[SubArch], ids, steps: int, batch: int, seq_len: int, lr: float,
            gen: torch.Generator) -> list[float]:
    """KL(teacher || model at budget) with the budgets taken in turn. The teacher is frozen.

    A deliberately simple loop: in Nemotron Elastic (`nestlm.elastify`) a router learns each budget's
    widths; here the widths are fixed and every budget just matches the parent's distribution."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    dev = model.embeddings.weight.device
    model.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc="distill", unit="step")):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 10))
        x, _ = (t.to(dev) for t in token_batches(ids, batch, seq_len, gen))  # [b, t]
        with torch.no_grad():
            target = F.log_softmax(teacher(x), dim=-1).flatten(0, 1)  # [b*t, V]
        sub = subs[step % len(subs)]
        logp = F.log_softmax(model(x, sub=sub), dim=-1).flatten(0, 1)  # [b*t, V]
        loss = F.kl_div(logp, target, log_target=True, reduction="batchmean")  # mean over tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
    return losses


def sort_by_importance(model, ids, batch: int, seq_len: int, n_batches: int, gen: torch.Generator) -> dict:
    """Score on random windows of ids and sort in place (when nestlm.importance / nestlm.sort exist);
    check that the full model's logits did not move."""
    try:
        from nestlm.importance import importance
        from nestlm.sort import sort_
    except ImportError:
        return {"sorted": False, "note": "sorting not available yet"}
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
def budget_subarch(cfg: nestlm.ModelConfig, frac: float) -> SubArch:
    """The widths whose parameter count is closest to `frac` of the parent's from below: every axis in
    BUDGET_AXES shrinks by one common factor (channels rounded to multiples of 8, experts >= top_k)."""
    if frac >= 1.0:
        return SubArch()
    return width_subarch(cfg, frac, axes=BUDGET_AXES, align=8)


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
    from nestlm.generate import generate
    from nestlm.model.slice import extract

    small = extract(model, sub).eval()
    with torch_threads(1):  # batch-1 decoding of a tiny model: intra-op threads only add sync overhead
        generate(small, prompt, 4)  # warm-up
        t0 = time.perf_counter()
        out = generate(small, prompt, n_new)
        return n_new / (time.perf_counter() - t0), out


@contextlib.contextmanager
def torch_threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# -------------------------------------------------------------------------------------------- report
def format_table(rows: list[dict]) -> str:
    head = ["budget", "params", "active", "ppl 0-shot", "ppl", "tok/s (1 thread)", "max|Δlogits| vs HF"]
    body = [[r["name"], f"{r['params']:,}", f"{r['active_params']:,}", f"{r['ppl_zero_shot']:.2f}",
             f"{r['ppl']:.2f}", f"{r['tok_per_s']:.0f}", f"{r['max_abs_diff_hf']:.1e}"] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]

    def line(cells):
        return " | ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))

    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in body])


def plot(out: Path, pre: list[float], dist: list[float], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2 if dist else 1, figsize=(10 if dist else 5, 3.5), squeeze=False)
    ax[0, 0].plot(pre)
    ax[0, 0].set(title="pretraining", xlabel="step", ylabel="cross-entropy (nats/byte)")
    if dist:  # the budgets took turns: one curve each
        for j, r in enumerate(rows):
            ax[0, 1].plot(range(j, len(dist), len(rows)), dist[j::len(rows)], label=r["name"])
        ax[0, 1].set(title="distillation", xlabel="step", ylabel="KL to the frozen parent", yscale="log")
        ax[0, 1].legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    params = [r["params"] / 1e6 for r in rows]
    ax.plot(params, [r["ppl_zero_shot"] for r in rows], "o--", label="sliced, zero-shot")
    ax.plot(params, [r["ppl"] for r in rows], "o-", label="after distillation")
    for r, p in zip(rows, params, strict=True):
        ax.annotate(r["name"], (p, r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="parameters (M)", ylabel="validation perplexity", title="nested budgets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "budgets.png", dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- the demo
def demo(out_dir: str | Path = "nestlm-demo", steps: int | None = None, seed: int = 0, device: str = "cpu",
         quick: bool = False, distill_steps: int | None = None, threads: int = 1) -> dict:
    """Run the whole pipeline (see the module docstring); returns what it writes to out_dir/results.json.

    threads: torch intra-op threads meanwhile. One by default: measured on 2 idle cores a second thread
    makes the steps of this small model only 1.5x faster, but ~20x slower when the cores are busy."""
    with torch_threads(threads):
        return _demo(Path(out_dir), steps, seed, device, quick, distill_steps)


def _demo(out: Path, steps: int | None, seed: int, device: str, quick: bool, distill_steps: int | None) -> dict:
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    steps = steps if steps is not None else (40 if quick else 600)
    distill_steps = distill_steps if distill_steps is not None else (12 if quick else 200)
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
    pre_losses = pretrain(model, train_ids, steps, batch, seq_len, lr=3e-3, gen=gen)

    # 2. importance sorting, 3. nested budgets
    sorting = sort_by_importance(model, train_ids, batch, seq_len, n_batches=2 if quick else 8, gen=gen)
    subs = [budget_subarch(cfg, f) for f in BUDGETS]
    zero_shot = [ppl(model, s) for s in tqdm(subs, desc="zero-shot ppl")]

    # 4. distillation from the frozen parent into every budget
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    dist_losses = distill(model, teacher, subs, train_ids, distill_steps, batch, seq_len, lr=1e-3, gen=gen) \
        if distill_steps > 0 else []
    del teacher

    # 5. export + check with transformers, 6. perplexity and speed
    model.eval()
    check_x = eval_windows(val_ids, 64)[:2, :-1].to(device)  # [2, 64]
    prompt = torch.tensor([tok.encode(PROMPT)], device=device)  # [1, t]
    rows = []
    todo = list(zip(BUDGETS, subs, zero_shot, strict=True))
    for frac, sub, zs in tqdm(todo, desc="export + eval", unit="budget"):
        name = f"budget_{round(frac * 100)}"
        folder = nestlm.to_hf(model, out / name, sub=sub, overwrite=True, tokenizer_dir=out / "tokenizer")
        speed, text = decode_speed(model, sub, prompt, 24 if quick else 64)
        rows.append({
            "name": name, "frac": frac, "sub": sub.resolve(cfg).to_dict(), "path": str(folder),
            "params": count_params(cfg, sub), "active_params": count_active_params(cfg, sub),
            "ppl_zero_shot": zs, "ppl": ppl(model, sub), "tok_per_s": speed,
            "max_abs_diff_hf": check_hf(model, sub, folder, check_x), "sample": tok.decode(text[0]),
        })

    results = {
        "config": cfg.to_dict(), "seed": seed, "quick": quick, "device": device, "threads": torch.get_num_threads(),
        "data": {"train_tokens": len(train_ids), "val_tokens": len(val_ids), "eval_tokens": n_eval * seq_len},
        "untrained_ppl": untrained,
        "pretrain": {"steps": steps, "batch": batch, "seq_len": seq_len, "first_loss": pre_losses[0],
                     "final_loss": sum(pre_losses[-10:]) / len(pre_losses[-10:])},
        "sorting": sorting, "distill_steps": distill_steps, "budgets": rows,
        "loss": {"pretrain": pre_losses, "distill": dist_losses},
    }
    plot(out, pre_losses, dist_losses, rows)
    results["wall_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\nsorting: {sorting['note']}\n")
    print(format_table(rows))
    for r in rows:
        print(f"\n{r['name']}: {r['sample']!r}")
    print(f"\nwrote {out}/results.json, loss.png, budgets.png and {', '.join(r['name'] for r in rows)} "
          f"in {results['wall_s']:.0f} s")
    return results
