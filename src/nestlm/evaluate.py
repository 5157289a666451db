"""Evaluate an elastic checkpoint (the parent and every budget) or a plain HF folder on local text.

    rows = nestlm.evaluate.evaluate("out/elastic")                  # held-out KJV New Testament
    rows = nestlm.evaluate.evaluate("out/elastic", "my.txt", seq_len=512, budgets=["77%", 0.6])
    print(nestlm.evaluate.format_table(rows))

Perplexity is exp(mean next-token NLL) over contiguous, non-overlapping windows (`nestlm.data.perplexity`),
the same tokens for every row. The elastic model is loaded once and run at each budget's SubArch (the sliced
forward, which a test pins to the exported checkpoint), so no checkpoint is written.

Default text: the King James New Testament, from "THE GOSPEL ACCORDING TO ST. MATTHEW" to the end. It is
held out in the sense that the demo and recipes train on the front of the stream; a model trained on the
whole Bible has seen it. Tokenizer: the folder's own, by `nestlm.io.tokenizer.load_tokenizer`'s rule.

lm-evaluation-harness (optional, `pip install nestlm[eval]`): `lm_eval_tasks=["my_items.jsonl"]` (local
multiple-choice items, see `jsonl_task`) or task names whose data is already cached locally add lm-eval's
scores to each row, run through plain transformers on a sliced copy of each budget. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nestlm.arch import SubArch, count_active_params, count_params
from nestlm.data import jsonl_rows, kjv_text, load_text, perplexity
from nestlm.device import resolve
from nestlm.errors import ConfigError
from nestlm.io.tokenizer import check_ids, load_tokenizer, text_tokens

__all__ = ["default_text", "evaluate", "exit_at_once_on_ctrl_c", "format_table", "has_lm_eval", "jsonl_task", "load_tokenizer",
           "lm_eval_scores"]

NT_START = "THE GOSPEL ACCORDING TO ST. MATTHEW"


def default_text() -> str:
    """The King James New Testament (Matthew to Revelation), as `nestlm.data.kjv_text` writes it."""
    text = kjv_text()
    i = text.find(NT_START)
    if i < 0:
        raise RuntimeError(f"{NT_START!r} not found in the KJV text")
    return text[i:]


def has_lm_eval() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def jsonl_task(path: str | Path, name: str | None = None) -> dict:
    """An lm-eval multiple-choice task (a config dict) over a local jsonl file, one item per line:

        {"query": "In the beginning God created the", "choices": [" heaven", " sea"], "gold": 0}

    Scored by lm-eval's loglikelihood of each choice right after the query (query + choice, nothing inserted
    between them: put the space in the choice): acc, and acc_norm (normalised by the choice's length).
    The file is checked here, so a malformed line fails with its line number before lm-eval starts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file")
    n = 0
    for i, item in jsonl_rows(path):
        ok = (isinstance(item, dict) and isinstance(item.get("query"), str)
              and isinstance(item.get("choices"), list) and len(item["choices"]) >= 2
              and all(isinstance(c, str) and c for c in item["choices"])
              and isinstance(item.get("gold"), int) and 0 <= item["gold"] < len(item["choices"]))
        if not ok:
            raise ConfigError(f"{path}:{i}: need {{\"query\": str, \"choices\": [>= 2 non-empty str], "
                              f"\"gold\": index into choices}}")
        n += 1
    if n == 0:
        raise ConfigError(f"{path}: no items")
    return {"task": name or path.stem, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(path.resolve())}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}", "target_delimiter": "", "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]}


def lm_eval_scores(hf_dir: str | Path, tasks: list, limit: int | None = None, batch_size: int = 8,
                   samples: bool = False, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> dict:
    """lm-evaluation-harness scores of a plain HF folder, run through transformers: {task: {metric: value}}.

    tasks: lm-eval task names (their data must already be in the local datasets cache: nothing is
    downloaded), paths of local jsonl files (see `jsonl_task`) or task config dicts. samples=True adds
    "_samples": {task: [per-item loglikelihoods of each choice]}."""
    if not has_lm_eval():
        raise ImportError("lm-eval is not installed: pip install 'nestlm[eval]' (lm-eval==0.4.13)")
    import os

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # no network at run time
        os.environ.setdefault(var, "1")
    import lm_eval

    specs = [jsonl_task(t) if isinstance(t, (str, Path)) and str(t).endswith(".jsonl") else t for t in tasks]
    model_args = {"pretrained": str(hf_dir), "dtype": str(dtype).removeprefix("torch.")}
    res = lm_eval.simple_evaluate(model="hf", model_args=model_args,
                                  tasks=specs, limit=limit, batch_size=batch_size, device=str(device),
                                  log_samples=samples)
    out = {t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in res["results"].items()}
    if samples:
        out["_samples"] = {t: [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(v, key=lambda s: s["doc_id"])]
                           for t, v in res["samples"].items()}
    return out


def evaluate(elastic_or_hf_dir: str | Path, text_path: str | Path | None = None, seq_len: int = 256,
             max_windows: int | None = 32, budgets: list | None = None, batch: int = 8,
             lm_eval_tasks: list[str] | None = None, lm_eval_limit: int | None = None,
             progress: bool = True, device: str | None = None, dtype: str | None = None) -> list[dict]:
    """Perplexity of the parent and of each budget (default: every budget of the manifest) on local text.
    device, dtype: where and in which precision the weights are held (nestlm.device: cuda and bf16 when
    available, else cpu and fp32); the NLL is summed in fp32 either way.

    budgets: names, fractions (interpolated between trained ones) or SubArch, as `nestlm.slicing.slice`
    takes them. Returns one dict per row: name, fraction, sub, params, active_params, ppl, tokens, seconds
    (and lm_eval when lm_eval_tasks is given)."""
    from nestlm.elastic.artifact import resolve_budget
    from nestlm.load import from_hf
    from nestlm.slicing import open_source
    from nestlm.slicing import slice as slice_

    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len (--seq-len) must be a whole number of tokens >= 1, got {seq_len!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ConfigError(f"max_windows (--max-windows) must be >= 1 (or None / 0 on the command line: all), "
                          f"got {max_windows!r}")
    dev, dt = resolve(device, dtype)  # an unavailable device or precision: one line before any work
    path, cfg, _, manifest = open_source(elastic_or_hf_dir)
    max_pos = cfg.hf_extra.get("max_position_embeddings")
    if isinstance(max_pos, int) and seq_len > max_pos:
        raise ConfigError(f"seq_len {seq_len} (--seq-len) is longer than the model's positions "
                          f"(max_position_embeddings {max_pos} in {path}/config.json)")
    if lm_eval_tasks and not has_lm_eval():
        raise ImportError("lm_eval_tasks needs lm-eval: pip install 'nestlm[eval]' (lm-eval==0.4.13)")
    for t in lm_eval_tasks or ():  # a bad items file fails here, before the perplexity work
        if isinstance(t, (str, Path)) and str(t).endswith(".jsonl"):
            jsonl_task(t)
    text = load_text(text_path) if text_path is not None else default_text()
    tok = load_tokenizer(path, cfg.vocab_size)
    need = max_windows * seq_len + 1 if max_windows else None
    ids = text_tokens(tok, text, need)
    if len(ids) < seq_len + 1:
        raise ConfigError(f"the text gives {len(ids)} tokens, too few for one window of {seq_len} + 1 "
                          "(--seq-len)")
    check_ids(ids, cfg.vocab_size, f"{path}'s tokenizer")
    model = from_hf(path, dtype=dt, device=dev)
    cfg = model.cfg

    todo: list[tuple[str, float | None, SubArch]] = [(_first_row_name(path, manifest), 1.0, SubArch())]
    if budgets is None:
        budgets = list(manifest["budgets"]) if manifest else []
    full = SubArch.full(cfg)
    for b in budgets:
        name, sub = resolve_budget(path, b, cfg=cfg, manifest=manifest)
        if sub.resolve(cfg) == full and name in ("full", "100%"):
            continue  # the parent row already is the full model
        frac = manifest["budgets"][name]["fraction"] if manifest and name in manifest["budgets"] else \
            (float(b) if isinstance(b, (int, float)) else None)
        todo.append((name, frac, sub))

    batch = max(1, min(batch, 16384 // seq_len))  # long windows: fewer per forward (memory; Ctrl-C between them)
    rows = []
    n_win = min((len(ids) - 1) // seq_len, max_windows or 1 << 62)
    bar = tqdm(total=n_win * len(todo), desc="eval", unit="window", disable=not progress)
    for i, (name, frac, sub) in enumerate(todo):
        t0 = time.perf_counter()
        bar.set_postfix_str(name, refresh=False)
        ppl = perplexity(model, ids, seq_len, batch=batch, sub=None if sub.resolve(cfg) == full else sub,
                         max_windows=max_windows, on_batch=bar.update)
        row = {"name": name, "fraction": frac, "sub": sub.to_dict(), "params": count_params(cfg, sub),
               "active_params": count_active_params(cfg, sub), "ppl": ppl, "tokens": n_win * seq_len,
               "seconds": time.perf_counter() - t0}
        if lm_eval_tasks:
            if i == 0:  # the folder itself
                row["lm_eval"] = lm_eval_scores(path, lm_eval_tasks, lm_eval_limit, device=dev, dtype=dt)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    row["lm_eval"] = lm_eval_scores(slice_(path, sub, Path(tmp) / "hf"), lm_eval_tasks,
                                                    lm_eval_limit, device=dev, dtype=dt)
        rows.append(row)
    bar.close()
    return rows


def _first_row_name(path: Path, manifest: dict | None) -> str:
    """The full model's row: 'parent' for an elastic checkpoint (its budgets follow), else what the folder
    is: a slice at its budget (nestlm_slice.json), or the model."""
    from nestlm.elastic.artifact import read_provenance

    if manifest is not None:
        return "parent"
    prov = read_provenance(path)
    return f"slice {prov.get('budget')}" if prov else "model"


def format_table(rows: list[dict]) -> str:
    """A markdown table: budget, params, active params, perplexity (and its ratio to the parent's)."""
    base = next((r["ppl"] for r in rows if r["name"] == "parent"), rows[0]["ppl"] if rows else math.nan)
    tasks = sorted({t for r in rows for t in r.get("lm_eval", {})})
    head = ["budget", "params", "active", "tokens", "ppl", "ppl / parent"] + tasks
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["name"], f"{r['params'] / 1e6:.2f}M", f"{r['active_params'] / 1e6:.2f}M", str(r["tokens"]),
                 f"{r['ppl']:.3f}", f"{r['ppl'] / base:.3f}"]
        for t in tasks:
            m = r.get("lm_eval", {}).get(t, {})
            key = next((k for k in ("acc_norm,none", "acc,none") if k in m), next(iter(m), None))
            cells.append(f"{m[key]:.4f}" if key else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def exit_at_once_on_ctrl_c(what: str):
    """For a command that writes nothing (`nestlm eval`): Ctrl-C ends the process within moments, even in the
    middle of a long torch operation (Python runs its signal handlers only between operations): the C-level
    handler writes the signal number to a pipe, and a watcher thread prints one line and exits."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    old = signal.signal(signal.SIGINT, lambda *a: None)  # a Python handler, so that the wakeup fd is written

    def watch():
        while data := os.read(r, 1):
            if data[0] == signal.SIGINT:
                print(f"\nnestlm: interrupted ({what})", file=sys.stderr, flush=True)
                os._exit(130)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGINT, old)
        os.close(w)
        t.join(1)
        os.close(r)
