"""Elastic training overhead: one elastic training step per budget {1.0, 0.77, 0.4} vs training the three
sliced submodels as standalone models.

    ratio = sum over budgets of the elastic step time  /  sum over budgets of the extracted model's step time

A step is forward + KD loss (against precomputed teacher logits, the same for both) + backward + optimizer.
The elastic step is nestlm.elastic.train.train_step itself, with each budget's widths fixed (its `choose`):
hard: the elastic model runs the SLICED submodel, its final hidden state * the router's straight-through
gate, plus the router's budget losses, the finiteness checks and a router optimizer step (as nestlm.elastify
does). soft: the full-width model with the router's channel masks.
fp32, `--threads` CPU threads (default 1: steadier on a shared machine); one warmup round, then `--repeats`
rounds that time every variant in turn (interleaved, so drifting machine load hits all alike); MEDIANS.

    python bench/bench_elastic.py            # ~5 min on 2 CPU cores
    python bench/bench_elastic.py --quick    # < 2 min
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

BUDGETS = (1.0, 0.77, 0.4)


def bench_model(quick: bool):
    import nestlm

    d = 128 if quick else 256
    cfg = nestlm.ModelConfig(vocab_size=1024 if quick else 2048, hidden_size=d, pattern="M*-EM*-E", num_heads=8, num_kv_heads=2,
                             head_dim=32, intermediate_size=3 * d, mamba_heads=16, mamba_head_dim=16,
                             mamba_groups=2, ssm_state=32, chunk_size=32, n_experts=8, top_k=2,
                             moe_intermediate_size=d, shared_intermediate_size=d)
    return nestlm.Decoder(cfg).init_weights(seed=0)


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """{name: fn} -> {name: median seconds}; round r runs every fn once, after one warmup round."""
    times = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> str:
    import nestlm
    from nestlm.arch import SubArch, width_subarch
    from nestlm.elastic.losses import kd_loss
    from nestlm.elastic.optim import adamw
    from nestlm.elastic.train import Run, budget_loss, train_step
    from nestlm.model.extract import extract

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 7)
    seq_len = args.seq_len or (64 if args.quick else 128)
    torch.manual_seed(0)

    model = bench_model(args.quick)
    cfg = model.cfg
    axes = ("hidden", "ffn", "mamba_heads_per_group", "attn_heads_per_group", "moe_ffn", "shared_ffn", "experts")
    subs = {b: (SubArch() if b == 1.0 else width_subarch(cfg, b, axes=axes, align=16)).resolve(cfg)
            for b in BUDGETS}
    # router choices: per axis, the distinct widths the three budgets use (largest first)
    choices = {ax: sorted({getattr(s, ax) for s in subs.values()}, reverse=True) for ax in axes}
    ecfg = nestlm.ElasticConfig(budgets=list(BUDGETS), choices={ax: [int(w) for w in c] for ax, c in choices.items()},
                                align=16, router_hidden=64)
    router = nestlm.Router(cfg, ecfg)
    opt_model = adamw(model.parameters(), lr=1e-5)
    opt_router = adamw(router.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, seq_len))
    with torch.no_grad():
        teacher = model(ids)  # the KD target, shared by every variant

    def weights_for(bi: int, p: dict):
        """Straight-through one-hots on this budget's widths, with the gradient of the choice probabilities
        `p` (what router.sample returns in hard mode, minus the Gumbel noise)."""
        if router.pinned(bi):
            return router.full_weights()
        sub = subs[BUDGETS[bi]]
        return {ax: F.one_hot(torch.tensor(choices[ax].index(getattr(sub, ax))), len(choices[ax])).float()
                - p[ax].detach() + p[ax] for ax in axes}

    tau, scale = 0.5, 2.0  # mid-schedule

    def fixed(bi: int, lg, tau: float, scale: float):
        return weights_for(bi, router.probs(bi, tau, scale, logits=lg))

    runs = {mode: Run(dataclasses.replace(ecfg, mode=mode), model, model, lambda ids: teacher, router, opt_model,
                      opt_router) for mode in ("hard", "soft")}

    def elastic_step(bi: int, mode: str):
        """One step as nestlm.elastify takes it (train_step): one router evaluation, the model at the chosen
        widths, KD + the router's budget losses, the update."""
        train_step(runs[mode], [ids], [bi], tau, scale, choose=fixed)

    def standalone_step(small, opt):
        loss = kd_loss(small(ids), teacher)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def router_step(bi: int, tol: float | None = None):
        """The router's share of an elastify step alone: Gumbel sample (tol: among the architectures within
        tol of the budget, ElasticConfig.sample_tolerance), budget losses, backward, AdamW."""
        lg = router.budget_logits(bi)
        w = router.sample(bi, tau, scale, logits=lg, tol=tol)
        loss = router.gate(w) + budget_loss(router, ecfg, bi, lg, tau, scale)[0]
        loss.backward()
        opt_router.step()
        opt_router.zero_grad(set_to_none=True)

    fns = {"router": lambda: router_step(len(BUDGETS) - 1),
           "router_tol": lambda: router_step(len(BUDGETS) - 1, ecfg.sample_tolerance or 0.02)}
    for b in BUDGETS:
        small = extract(model, subs[b])
        opt = adamw(small.parameters(), lr=1e-5)
        fns[("standalone", b)] = lambda small=small, opt=opt: standalone_step(small, opt)
    for mode in ("hard", "soft"):
        for bi, b in enumerate(BUDGETS):
            fns[(mode, b)] = lambda bi=bi, mode=mode: elastic_step(bi, mode)
    med = interleaved_medians(fns, repeats)
    standalone = {b: med[("standalone", b)] for b in BUDGETS}
    rows = [(mode, {b: med[(mode, b)] for b in BUDGETS}) for mode in ("hard", "soft")]

    params = {b: nestlm.count_params(cfg, subs[b]) for b in BUDGETS}
    print(f"model: {cfg.pattern} hidden={cfg.hidden_size} vocab={cfg.vocab_size}, batch={args.batch} "
          f"seq_len={seq_len}, torch threads={torch.get_num_threads()}, medians of {repeats}")
    head = "| step | " + " | ".join(f"{b:g} ({params[b] / 1e6:.2f}M)" for b in BUDGETS) + " | sum | ratio |"
    lines = [head, "|" + "---|" * (len(BUDGETS) + 3)]
    tot_std = sum(standalone.values())
    lines.append("| standalone | " + " | ".join(f"{standalone[b] * 1e3:.1f} ms" for b in BUDGETS)
                 + f" | {tot_std * 1e3:.1f} ms | 1.00 |")
    for mode, per in rows:
        tot = sum(per.values())
        lines.append(f"| elastic {mode} | " + " | ".join(f"{per[b] * 1e3:.1f} ms" for b in BUDGETS)
                     + f" | {tot * 1e3:.1f} ms | {tot / tot_std:.2f} |")
    table = "\n".join(lines)
    print(table)
    print(f"router alone, per step (in the elastic rows above): {med['router'] * 1e3:.2f} ms; sampling within "
          f"the budget's cost tolerance (sample_tolerance, the exact cost table): {med['router_tol'] * 1e3:.2f} ms")
    return table

if __name__ == "__main__":
    main(sys.argv[1:])
