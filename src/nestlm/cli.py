"""`nestlm <command>`: every command is a plain typed Python function; argparse only maps flags onto it.

    nestlm demo [--out DIR] [--steps N] [--quick] [--seed S] [--device cpu] [--threads 1]
    nestlm info PATH                                  # family, config, parameters, memory of an HF folder
    nestlm convert SRC DST                            # HF -> nestlm -> HF round trip
    nestlm generate PATH --prompt TEXT [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from nestlm.arch import count_active_params, count_memory, count_params
from nestlm.convert import CheckpointError, config_from_hf
from nestlm.convert.io import read_config
from nestlm.model.config import ConfigError, ModelConfig

# errors that are the user's to fix: one line, exit status 2, no traceback
USER_ERRORS = (ConfigError, CheckpointError, FileExistsError, FileNotFoundError)


# -------------------------------------------------------------------------------------------- commands
def demo(out: str = "nestlm-demo", steps: int | None = None, quick: bool = False, seed: int = 0,
         device: str = "cpu", threads: int = 1) -> dict:
    from nestlm.demo import demo as run_demo

    return run_demo(out_dir=out, steps=steps, seed=seed, device=device, quick=quick, threads=threads)


def info(path: str, seq_len: int = 4096) -> dict:
    """Family, ModelConfig, parameter counts and inference memory of a Hugging Face checkpoint folder."""
    hf = read_config(path)
    cfg = config_from_hf(hf)
    mem = count_memory(cfg, seq_len=seq_len)
    out = {"path": str(path), "family": cfg.family, "architectures": hf.get("architectures"),
           "config": cfg.to_dict(), "params": count_params(cfg), "active_params": count_active_params(cfg),
           "memory": mem, "seq_len": seq_len}
    print(format_info(out, cfg))
    return out


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


def convert(src: str, dst: str, overwrite: bool = False) -> Path:
    """Read an HF checkpoint into nestlm and write it back as one (same dtype, tokenizer files copied)."""
    from nestlm.convert import from_hf, to_hf

    hf = read_config(src)
    dtype = getattr(torch, str(hf.get("dtype") or hf.get("torch_dtype") or "float32"), torch.float32)
    model = from_hf(src, dtype=dtype)
    out = to_hf(model, dst, overwrite=overwrite)
    print(f"wrote {out} ({count_params(model.cfg):,} parameters, {str(dtype).removeprefix('torch.')})")
    return out


def generate(path: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int | None = None) -> str:
    """Stream a continuation of `prompt` from an HF checkpoint folder (with its tokenizer) to stdout."""
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

    c = sub.add_parser("info", help="family, config, parameters and memory of an HF checkpoint folder")
    c.add_argument("path")
    c.add_argument("--seq-len", type=int, default=4096, help="context length for the memory estimate")

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
    return p


COMMANDS = {"demo": demo, "info": info, "convert": convert, "generate": generate}


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error prints one line and exits with status 2, like argparse's own errors."""
    args = vars(build_parser().parse_args(argv))
    fn = COMMANDS[args.pop("command")]
    try:
        fn(**args)
    except USER_ERRORS as e:
        print(f"nestlm: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
