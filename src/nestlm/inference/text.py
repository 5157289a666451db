"""Text in, text out, from a checkpoint folder: what `nestlm generate` runs (an entry point: it loads).

    text = generate_text("path/hf", "In the beginning", 64)                      # streamed to stdout
    res = think_answer("out/elastic", "Q:1+2=?\n<think>", think_budget="40%", answer_budget="full")

Both stream through `Printer`, the one incremental detokenizer (nestlm.inference.detok) wrapped for stdout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nestlm.device import resolve
from nestlm.errors import ConfigError
from nestlm.inference.detok import Detok
from nestlm.inference.generate import Sampling, generate
from nestlm.inference.two_phase import Standalone, TwoPhaseResult, generate_two_phase
from nestlm.io.tokenizer import check_utf8, load_tokenizer

__all__ = ["Printer", "check_prompt", "generate_text", "think_answer"]


class Printer:
    """Prints a continuation to stdout token by token (a generate callback, plain and think mode alike), through
    the one incremental detokenizer (nestlm.inference.detok): the bytes of a multi-byte character wait until
    it is whole, and bytes that never make one (a character cut by the end of the thinking phase, a stray
    continuation byte) are left out instead of printing U+FFFD."""

    def __init__(self, decode):
        self.detok = Detok(decode)

    def __call__(self, tok: torch.Tensor, phase: str | None = None) -> None:  # tok [1]
        print(self.detok.push(int(tok[0])).replace("\ufffd", ""), end="", flush=True)

    def close(self) -> str:
        text = self.detok.text()
        print(text[self.detok.sent:].replace("\ufffd", ""))
        return text.replace("\ufffd", "")


def check_prompt(prompt: str) -> str:
    """`prompt`, or ConfigError when it is empty or holds what no UTF-8 encoding has (io.tokenizer.check_utf8)."""
    if not prompt:
        raise ConfigError("the prompt is empty: give the text to continue")
    return check_utf8(prompt, "the prompt")


def generate_text(path: str | Path, prompt: str, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                  device: str | None = None, dtype: str | None = None) -> str:
    """Stream a continuation of `prompt` from a checkpoint folder (plain or packed, with its tokenizer) to
    stdout, prompt first; ends at the tokenizer's end-of-sequence token. Returns the continuation's text."""
    from nestlm.load import from_hf

    check_prompt(prompt)
    dev, dt = resolve(device, dtype)
    model = from_hf(path, dtype=dt, device=dev)
    tok = load_tokenizer(path, model.cfg.vocab_size)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=True)], device=dev)  # [1, t]
    if ids.numel() == 0:
        raise ConfigError(f"the prompt {prompt!r} gives no tokens")
    stream = Printer(tok.decode)
    print(prompt, end="", flush=True)
    generate(model, ids, max_new_tokens, sampling=sampling, stop_tokens=tok.eos_id, callback=stream)
    return stream.close()


def think_answer(path: str | Path, prompt: str, think_budget: str | float = "full",
                 answer_budget: str | float = "full", max_think: int = 256, max_answer: int = 64,
                 transplant: bool = False, end_think: str = "</think>", sampling: Sampling = Sampling(),
                 bos: bool = True, stream: bool = True, device: str | None = None,
                 dtype: str | None = None) -> TwoPhaseResult:
    """Budget control from an elastic checkpoint folder: think with budget `think_budget` (a manifest name
    such as '40%' or 'full', or a fraction: between trained budgets the router interpolates, as
    `nestlm slice` does), answer with `answer_budget`. `bos`: start the prompt with the
    tokenizer's beginning-of-sequence token (as the reasoning recipe trains). Streams the text to stdout when
    `stream` (the trace, then the answer); returns the TwoPhaseResult. Both submodels run extracted
    (`Standalone`)."""
    from nestlm.elastic.artifact import resolve_budget
    from nestlm.load import load_elastic

    check_prompt(prompt)
    path = Path(path)
    dev, dt = resolve(device, dtype)
    model, router, manifest = load_elastic(path)
    model = model.to(device=dev, dtype=dt).eval()

    def sub_of(b):  # a name, '60%', '0.6', 0.6: trained, or interpolated between trained budgets
        return resolve_budget(path, b, cfg=model.cfg, manifest=manifest, router=router)[1]

    s_sub, l_sub = sub_of(think_budget), sub_of(answer_budget)
    tok = load_tokenizer(path, model.cfg.vocab_size)
    encode, decode_text, bos_id, eos = tok.encode, tok.decode, tok.bos_id, tok.eos_id
    ids = torch.tensor([[bos_id] * (bos and bos_id is not None) + encode(prompt)],
                       device=model.embeddings.weight.device)  # [1, t]
    show = Printer(decode_text)
    if stream:
        print(prompt, end="", flush=True)
    res = generate_two_phase(Standalone(model), ids, s_sub, l_sub, max_think, max_answer, encode(end_think),
                             stop_tokens=eos, switch="transplant" if transplant else "reprefill",
                             sampling=sampling, callback=show if stream else None)
    if stream:
        show.close()
    return res
