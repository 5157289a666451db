"""The GPU check, in one go: correctness on the device, then elastic training speed and memory at real sizes.

    PYTHONPATH=src python bench/gpu.py                          # on a GPU machine: < 8 minutes on one H100
    PYTHONPATH=src python bench/gpu.py --device cpu --quick     # the same code path on CPU, tiny sizes (CI)

Plain python on a machine that has torch and transformers (no installs, nothing downloaded; every model is
random weights of a real config, built on the device).

1. checks on the device (each: pass/FAIL and its error): nestlm against transformers on the same random weights
   (Llama and Nemotron-H, fp32), sorting keeps the logits, the sliced checkpoint of a SubArch in transformers
   equals the elastic model at that SubArch, the router's sampled widths are the SubArch it reports, the
   chunked SSD scan against the sequential reference, cached greedy generation against full re-computation;
   then `pytest tests/test_plan.py tests/test_device.py` (on a GPU: the memory plan against
   torch.cuda.max_memory_allocated, and the cuda/bf16 defaults);
2. per model (a SmolLM2-360M-size Llama and a ~1B Nemotron-H hybrid; --quick: tiny ones), in the --dtype
   (default bf16 on CUDA): one elastic training step as nestlm.elastify takes it (bf16 autocast over fp32
   weights, the bf16 teacher, KD in fp32, router and budget loss, AdamW) at each budget: tokens/s, MFU
   against the card's bf16 dense peak (6 x active params per token for the student + 2 x params for the
   teacher, attention's quadratic term included), max memory against the plan (nestlm.plan); the step of
   each budget's extracted submodel trained alone (the elastic / standalone ratio); and the forward speedup
   of each sliced submodel over the full model (prefill of one batch).
It prints one table (markdown).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest's randomize_ and tiny HF configs (the tests' own helpers)
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

BUDGETS = (1.0, 0.75, 0.5)
# dense bf16 tensor-core peak, FLOP/s, by the name torch reports (no sparsity)
PEAKS = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 756e12,
         "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "n/a on cpu"
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAKS, key=len, reverse=True):
        if key in name:
            return PEAKS[key], key
    return None, f"unknown card {name!r}: pass --peak-tflops"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- 1. checks
def checks(device: torch.device) -> list[tuple[str, bool, str]]:
    """(name, passed, detail) of every correctness check on `device`."""
    from conftest import randomize_, tiny_hybrid_config, tiny_llama_config, tiny_nemotron_h_config

    import nestlm
    from nestlm.convert import from_hf, to_hf

    out = []

    def check(name, fn):
        try:
            ok, detail = fn()
        except Exception as e:  # reported in the table, the run goes on
            ok, detail = False, f"{type(e).__name__}: {str(e)[:120]}"
        out.append((name, bool(ok), detail))

    import tempfile

    from transformers import AutoModelForCausalLM, LlamaForCausalLM, NemotronHForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="nestlm_gpu_"))
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)

    def parity(hf_cls, hf_cfg, name):
        def fn():
            hf = randomize_(hf_cls(hf_cfg).eval())
            hf.save_pretrained(tmp / name)
            hf = hf.to(device)
            ours = from_hf(tmp / name, device=device).eval()
            with torch.no_grad():
                d = (hf(ids).logits.float() - ours(ids)).abs().max().item()
            return d < 1e-3, f"max |logits - transformers| {d:.1e}"
        return fn

    check("llama == transformers (fp32)", parity(LlamaForCausalLM, tiny_llama_config(vocab_size=64), "llama"))
    check("nemotron_h == transformers (fp32)",
          parity(NemotronHForCausalLM, tiny_nemotron_h_config(vocab_size=64), "nemotron_h"))

    def sort_keeps_logits():
        from nestlm.elastic.importance import importance
        from nestlm.elastic.sort import sort_

        m = randomize_(nestlm.Decoder(tiny_hybrid_config())).to(device).eval()
        with torch.no_grad():
            before = m(ids)
            sort_(m, importance(m, [ids], progress=False))
            d = (m(ids) - before).abs().max().item()
        return d < 1e-4, f"max |Δlogits| after sort_ {d:.1e}"

    def slice_equals_elastic():
        m = randomize_(nestlm.Decoder(tiny_hybrid_config())).to(device).eval()
        sub = nestlm.SubArch(hidden=24, ffn=32, mamba_heads_per_group=2, experts=3)
        to_hf(m, tmp / "slice", sub=sub, overwrite=True)
        hf = AutoModelForCausalLM.from_pretrained(tmp / "slice", dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            d = (hf(ids).logits.float() - m(ids, sub=sub)).abs().max().item()
        return d < 1e-3, f"max |sliced in transformers - elastic| {d:.1e}"

    def router_widths():
        cfg = tiny_hybrid_config()
        e = nestlm.ElasticConfig(budgets=[1.0, 0.6], align=4, router_hidden=16,
                                 choices={"hidden": [1.0, 0.75, 0.5], "ffn": [1.0, 0.5]})
        r = nestlm.Router(cfg, e).to(device)
        w = r.sample(1, 1.0, 1.0, hard=True)
        sub = r.subarch(w).resolve(cfg)
        cost = float(r.cost_ratio(w).detach())
        want = nestlm.count_params(cfg, sub) / nestlm.count_params(cfg)
        return abs(cost - want) < 1e-5 and w["hidden"].device.type == device.type, \
            f"sampled {sub.hidden}/{sub.ffn}, cost {cost:.4f} = counted {want:.4f}"

    def ssd_reference():
        from nestlm.model.ssd import ssd_chunked, ssd_reference

        g = torch.Generator().manual_seed(0)
        b, t, h, p, gr, n = 2, 50, 4, 8, 2, 16
        mk = lambda *s: torch.randn(*s, generator=g).to(device)
        x, B, C, D = mk(b, t, h, p), mk(b, t, gr, n), mk(b, t, gr, n), mk(h)
        dt = (torch.rand(b, t, h, generator=g) * 0.5).to(device)
        A = (-torch.rand(h, generator=g) - 0.1).to(device)
        y1, s1 = ssd_chunked(x, dt, A, B, C, D, 16)
        y2, s2 = ssd_reference(x, dt, A, B, C, D)
        d = max((y1 - y2).abs().max().item(), (s1 - s2).abs().max().item())
        return d < 1e-3, f"max |chunked - sequential| {d:.1e}"

    def generate_cached():
        from nestlm.inference.generate import generate

        m = randomize_(nestlm.Decoder(tiny_hybrid_config())).to(device).eval()
        out = generate(m, ids[:1, :8], 12)  # greedy, with the caches
        with torch.no_grad():
            ref = ids[:1, :8]
            for _ in range(12):  # greedy by full re-computation, no cache
                ref = torch.cat([ref, m(ref)[:, -1:].argmax(-1)], 1)
        return torch.equal(out, ref), f"{out.shape[1] - 8} tokens, cached == recomputed"

    check("sort_ keeps the logits", sort_keeps_logits)
    check("sliced checkpoint == elastic at its SubArch", slice_equals_elastic)
    check("router widths == the SubArch it costs", router_widths)
    check("SSD chunked == sequential reference", ssd_reference)
    check("generate: cached == recomputed (greedy)", generate_cached)
    return out


def pytest_subset(device: torch.device, quick: bool) -> tuple[str, bool, str]:
    """tests/test_plan.py and tests/test_device.py (on a GPU they test the plan against the card)."""
    files = ["tests/test_plan.py"] + ([] if quick else ["tests/test_device.py"])
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    if quick:
        args += ["-k", "exact or fsdp2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    return f"pytest {' '.join(f.removeprefix('tests/') for f in files)}", r.returncode == 0, last


# ---------------------------------------------------------------------------------------------- 2. timing
def model_configs(quick: bool):
    import nestlm

    if quick:
        llama = nestlm.ModelConfig(family="llama", vocab_size=512, hidden_size=64, pattern="*-" * 2, num_heads=4,
                                   num_kv_heads=2, head_dim=16, intermediate_size=160, mlp_act="swiglu",
                                   rope_theta=10000.0, tie_embeddings=True)
        hybrid = nestlm.ModelConfig(family="nemotron_h", vocab_size=512, hidden_size=64, pattern="M-M*", num_heads=4,
                                    num_kv_heads=2, head_dim=16, intermediate_size=160, mamba_heads=8,
                                    mamba_head_dim=16, mamba_groups=2, ssm_state=16, chunk_size=32)
        return {"llama (tiny)": llama, "nemotron_h (tiny)": hybrid}
    # SmolLM2-360M's config; a Nemotron-H style hybrid of ~1B parameters (Nemotron-H 8B's shapes, narrower)
    llama = nestlm.ModelConfig(family="llama", vocab_size=49152, hidden_size=960, pattern="*-" * 32, num_heads=15,
                               num_kv_heads=5, head_dim=64, intermediate_size=2560, mlp_act="swiglu",
                               rope_theta=100000.0, tie_embeddings=True)
    hybrid = nestlm.ModelConfig(family="nemotron_h", vocab_size=131072, hidden_size=2048,
                                pattern="M-M*M-M-M*M-M-M*M-M-M*M-", num_heads=16, num_kv_heads=4, head_dim=128,
                                intermediate_size=6144, mamba_heads=64, mamba_head_dim=64, mamba_groups=8,
                                ssm_state=128, chunk_size=128)
    return {"SmolLM2-360M llama": llama, "nemotron_h ~1B": hybrid}


def step_flops(cfg, sub, tokens: int, seq: int) -> float:
    """FLOPs of one elastic step: 6 x active params (forward + backward) of the student's submodel, 2 x all
    params for the teacher's forward, and attention's scores and weighted sum (causal: half) in both."""
    from nestlm.arch import count_active_params, sliced_config

    s = sliced_config(cfg, sub)
    attn = lambda c: c.pattern.count("*") * 2 * 2 * c.num_heads * c.head_dim * seq / 2  # per token, forward
    return tokens * (6 * count_active_params(cfg, sub) + 3 * attn(s) + 2 * count_active_params(cfg) + attn(cfg))


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_model(name: str, cfg, device: torch.device, dtype: torch.dtype, quick: bool, peak: float | None,
                gpu_memory: int | None) -> dict:
    """bench_at the largest micro-batch (<= 8) whose memory plan fits the card with 10% to spare; halved
    again on an out-of-memory error."""
    from nestlm.plan import plan

    ecfg, axes, choices, subs = _elastic_setup(cfg, quick)
    dt_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    batch = 2 if quick else 8
    while gpu_memory and batch > 1:
        ecfg.batch = batch
        if plan(ecfg, cfg, dtype=dt_name).total < 0.9 * gpu_memory:
            break
        batch //= 2
    while True:
        ecfg.batch = batch
        try:
            r = bench_at(name, cfg, ecfg, axes, choices, subs, device, dtype, quick)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            print(f"{name}: out of memory, retrying with micro-batch {batch}", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    r.update(peak=peak, plan=plan(ecfg, cfg, dtype=dt_name).total)
    return r


def _elastic_setup(cfg, quick: bool):
    """(ElasticConfig, axes, choices, {budget: SubArch}): three budgets by common width factors."""
    import nestlm
    from nestlm.arch import width_subarch

    seq = 64 if quick else 2048
    axes = ("hidden", "ffn", "mamba_heads_per_group", "attn_heads_per_group") if cfg.family == "nemotron_h" \
        else ("hidden", "ffn")
    subs = {b: (nestlm.SubArch() if b == 1.0 else width_subarch(cfg, b, axes=axes, align=16)).resolve(cfg)
            for b in BUDGETS}
    choices = {ax: sorted({getattr(s, ax) for s in subs.values()}, reverse=True) for ax in axes}
    ecfg = nestlm.ElasticConfig(budgets=list(BUDGETS), align=16, router_hidden=64, seq_len=seq, batch=1,
                                choices={ax: [int(w) for w in c] for ax, c in choices.items()})
    return ecfg, axes, choices, subs


def bench_at(name: str, cfg, ecfg, axes, choices, subs, device: torch.device, dtype: torch.dtype,
             quick: bool) -> dict:
    import nestlm
    from nestlm.device import autocast
    from nestlm.elastic.losses import kd_loss
    from nestlm.elastic.optim import adamw
    from nestlm.elastic.train import Run, train_step
    from nestlm.model.extract import extract

    torch.manual_seed(0)
    batch, seq = ecfg.batch, ecfg.seq_len
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.device(device):
        model = nestlm.Decoder(cfg).init_weights(seed=0)  # built on the device: no host copy of 1B weights
    teacher = copy.deepcopy(model).to(dtype).requires_grad_(False).eval()
    router = nestlm.Router(cfg, ecfg).to(device)
    opt_model, opt_router = adamw(model.parameters(), lr=1e-5), adamw(router.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    tau, scale = 0.5, 2.0

    def fixed(bi: int, lg, tau: float, scale: float):  # this budget's widths as straight-through one-hots
        if router.pinned(bi):
            return router.full_weights()
        pr = router.probs(bi, tau, scale, logits=lg)
        return {ax: F.one_hot(torch.tensor(choices[ax].index(getattr(subs[BUDGETS[bi]], ax)), device=device),
                              len(choices[ax])).float() - pr[ax].detach() + pr[ax] for ax in axes}

    run = Run(ecfg, model, model, teacher, router, opt_model, opt_router, dtype=dtype)

    def elastic_step(bi: int):  # nestlm.elastify's step: teacher forward, student at the widths, KD + budget loss
        train_step(run, [ids], [bi], tau, scale, choose=fixed)

    repeats = 2 if quick else 3
    elastic = {b: timed(lambda bi=bi: elastic_step(bi), device, repeats) for bi, b in enumerate(BUDGETS)}
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    tokens = batch * seq
    flops = {b: step_flops(cfg, subs[b], tokens, seq) for b in BUDGETS}

    # the same step for each budget's submodel extracted and trained alone, and the sliced forward speedups
    opt_model.state.clear()  # its state: room for the extracted submodels' own
    opt_router.state.clear()
    model.zero_grad(set_to_none=True)
    standalone, forward = {}, {}
    for b in BUDGETS:
        small = extract(model, subs[b])
        opt = adamw(small.parameters(), lr=1e-5)

        def alone(small=small, opt=opt):
            with torch.no_grad():
                t_logits = teacher(ids)
            with autocast(dtype, device):
                s_logits = small(ids)
            kd_loss(s_logits, t_logits).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        standalone[b] = timed(alone, device, repeats)
        del opt
        small = small.to(dtype).eval()

        def fwd(small=small):
            with torch.no_grad():
                small(ids)

        forward[b] = timed(fwd, device, repeats)
        del small
    return {"name": name, "params": nestlm.count_params(cfg), "batch": batch, "seq": seq, "elastic": elastic,
            "standalone": standalone, "forward": forward, "flops": flops, "max_memory": peak_mem}


# ---------------------------------------------------------------------------------------------- the table
def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def table(device_name: str, dtype: torch.dtype, check_rows, results, peak_note: str, seconds: float) -> str:
    lines = [f"nestlm GPU check on {device_name}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, "
             f"python {platform.python_version()}; {seconds:.0f} s", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {n} | {'pass' if ok else 'FAIL'} | {d} |" for n, ok, d in check_rows]
    lines += ["", "| model | params | micro-batch | budget | step | tokens/s | MFU | elastic / standalone step | "
              "sliced forward speedup | max memory | plan |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tokens = r["batch"] * r["seq"]
        for b in BUDGETS:
            t = r["elastic"][b]
            mfu = f"{r['flops'][b] / t / r['peak']:.1%}" if r["peak"] else "n/a"
            mem = _size(r["max_memory"]) if r["max_memory"] is not None else "n/a"
            lines.append(f"| {r['name']} | {r['params'] / 1e6:,.1f}M | {r['batch']} x {r['seq']} | {b:.0%} | "
                         f"{t * 1e3:.1f} ms | {tokens / t:,.0f} | {mfu} | {t / r['standalone'][b]:.2f} | "
                         f"{r['forward'][1.0] / r['forward'][b]:.2f}x | {mem} | {_size(r['plan'])} |")
        tot = sum(r["elastic"].values()) / sum(r["standalone"].values())
        lines.append(f"| {r['name']} | | | sum | | | | {tot:.2f} | | | |")
    lines += ["", f"MFU: against the dense bf16 peak of {peak_note}; step: forward + backward + AdamW of the "
              "student, teacher forward included; max memory: torch.cuda.max_memory_allocated over the model's "
              "elastic steps; plan: nestlm.plan's total for that micro-batch."]
    return "\n".join(lines)


def main(argv=None) -> str:
    from nestlm.device import resolve

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--quick", action="store_true", help="tiny models, few repeats (the CPU smoke run)")
    ap.add_argument("--skip-pytest", action="store_true", help="leave out the pytest subset")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not known")
    args = ap.parse_args(argv)
    device, dtype = resolve(args.device, args.dtype)
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs: TF32 tensor cores (bf16 is unaffected)
        name = torch.cuda.get_device_name(device)
        gpu_memory = torch.cuda.get_device_properties(device).total_memory
    else:
        name, gpu_memory = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)", None
    peak, peak_note = peak_flops(device, args.peak_tflops)
    rows = checks(device)
    if not args.skip_pytest:
        rows.append(pytest_subset(device, args.quick))
    print(f"checks done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    results = []
    for mname, cfg in model_configs(args.quick).items():
        results.append(bench_model(mname, cfg, device, dtype, args.quick, peak, gpu_memory))
        print(f"{mname} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = table(name, dtype, rows, results, peak_note, time.perf_counter() - t0)
    print(out)
    if not all(ok for _, ok, _ in rows):
        print("some checks FAILED (see the table)", file=sys.stderr)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
