"""The serving engine: the elastic model, its tokenizer, and a continuous-batching scheduler.

    engine = Engine("out/elastic", device="cpu", max_batch=32); engine.start()
    engine.submit([Generation(...), ...], sink)    # sink(index, kind, payload) from the engine's thread
    engine.stop()

One thread runs the loop. Each step: sequences waiting in the inbox join (up to `max_batch` running); every
running sequence samples its next token from its own logits (its own generator, so sampling is the same as
alone); then every sequence's new tokens (a joining prompt, one decoding token, or at a think-small /
answer-large switch the tokens the answer model has not read) are packed into ONE forward per SubArch
(nestlm.model.decoder.Rows: the matmuls batched over all tokens, each sequence its own attention K/V,
position and Mamba state). Finished or cancelled sequences leave at the step's end. At its switch a
sequence moves from the thinking group to the answering group: re-prefill (a new cache, prompt + trace +
tag fed on the answer model) or its cache transplanted (two_phase.transplant_cache, the pending tokens fed).
So requests join and leave at decode-step boundaries, and sequences of different budgets run as groups of
the same loop.

Token-exact, step for step, with nestlm.inference.two_phase.generate_two_phase (a thinking request) or
nestlm.inference.generate.generate (a plain one) on the same model, seed and sampling fields: the same
prefills, the same pending tokens at the switch, one `sample` call per token on that sequence's [1, v]
logits. Batched forwards compute the same numbers up to the floating-point order of batched matmuls.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nestlm.arch import SubArch
from nestlm.errors import ConfigError
from nestlm.inference.detok import Detok, held_suffix, settled
from nestlm.inference.generate import Sampling, sample
from nestlm.inference.serve.protocol import APIError
from nestlm.inference.two_phase import Standalone, rest_of_tag, transplant_cache
from nestlm.model.decoder import Rows

__all__ = ["DEFAULT_CONTEXT", "Engine", "Generation", "Outcome", "TokenLogprob"]

DEFAULT_CONTEXT = 4096  # max_model_len when the checkpoint's config.json has no max_position_embeddings


@dataclass
class Generation:
    """One choice of one request, as the engine runs it."""

    ids: list[int]  # the prompt
    answer_sub: SubArch
    think_sub: SubArch | None  # None: a plain generation on answer_sub
    max_think: int
    max_tokens: int
    sampling: Sampling = Sampling()
    stops: list[str] = field(default_factory=list)  # stop strings (the answer's)
    stop_ids: list[int] = field(default_factory=list)  # stop tokens besides EOS
    switch: str = "reprefill"
    logprobs: int | None = None  # None: none; k: each generated token's logprob and the top k
    prompt_logprobs: int | None = None  # echo with logprobs: the prompt's too (the first one None)


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None  # None: not sampled (the prompt's first token, a tag the budget appended)
    top: list[tuple[int, float]]  # the k most likely tokens at that position, most likely first


@dataclass
class Outcome:
    think_ids: list[int]  # written by the thinking model (its end tag included when it wrote it)
    forced_ids: list[int]  # the tag appended at the budget
    answer_ids: list[int]
    reasoning: str  # the trace's text, without the end tag
    end_text: str  # the end tag's text ('' when thinking ended by a stop token or did not happen)
    answer: str  # the answer's text (cut before a stop string)
    finish_reason: str  # "stop" | "length"
    stop_reason: str | int | None  # the stop string or stop token that ended it
    ended_by: str | None  # how thinking ended (generate_two_phase's names), None without thinking
    switch: str
    seconds: float
    queued: float  # seconds in the inbox before its prefill
    peak_batch: int = 1  # the most sequences it shared a decoding step with (itself included)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.think_ids + self.forced_ids + self.answer_ids


class _Cancelled(Exception):
    pass


def _logprob_entry(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """logits [v] -> the token's log-probability and the k most likely (raw model distribution)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, k) if k > 0 else None
    pairs = [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)]
    return TokenLogprob(token, float(lp[token]), pairs)


class _Seq:
    """One running choice: its state, its cache, its text, and what it tells the client."""

    def __init__(self, engine: Engine, g: Generation, index: int, sink: Callable, cancelled: threading.Event):
        self.e, self.g, self.index, self.sink, self.cancelled = engine, g, index, sink, cancelled
        self.submitted = time.perf_counter()
        self.t0 = 0.0
        self.gen = g.sampling.generator(engine.device)
        self.two = g.think_sub is not None
        self.phase = "think" if self.two else "answer"
        self.sub = g.think_sub if self.two else g.answer_sub
        self.cache = None
        self.logits: torch.Tensor | None = None  # [1, v]: the prediction of the next token
        self.think_ids: list[int] = []
        self.forced_ids: list[int] = []
        self.answer_ids: list[int] = []
        self.think = Detok(engine.decode, [engine.end_think])
        self.answer = Detok(engine.decode, g.stops)
        self.closed, self.end_text, self.stop_text = not self.two, "", None
        self.ended_by, self.switch = None, "none"
        self.finish, self.stop_reason = None, None
        self.lps: list[TokenLogprob] | None = [] if g.logprobs is not None else None
        self.prompt_lps: list[TokenLogprob] | None = None
        self.stop_set = {t for t in [engine.eos_id, *g.stop_ids] if t is not None}
        self.done = False
        self.peak_batch = 1
        self.feed: list[int] | None = None  # tokens for the next forward (a prompt, a step, a switch)
        self.then_finish = False  # echo with max_tokens 0: done once the prompt's logprobs are in

    # ---- text events
    def emit(self, phase: str, text: str, tokens: list[int], lps: list[TokenLogprob] | None = None) -> None:
        self.sink(self.index, "delta", (phase, text, tokens, lps))

    def close_think(self, end: str) -> None:
        """The trace is over: hand out the rest of its text, then (end "tag" | "forced") the tag."""
        text = settled(self.think.text())
        if end == "tag" and text.endswith(self.e.end_think):
            text = text[: len(text) - len(self.e.end_think)]
        elif end == "forced":  # a tag the budget cut mid-way ('4</th'): its characters go out with the tag
            text = text[: len(text) - held_suffix(text, [self.e.end_think])]
        self.emit("think", self.think.take(text, len(text)), [])
        self.closed = True
        if end in ("tag", "forced"):
            self.end_text = self.e.end_think
            self.emit("end", self.e.end_think, [])

    # ---- one token
    def sample(self) -> int:
        seen = None
        if self.g.sampling.penalized:
            seen = torch.tensor([self.g.ids + self.think_ids + self.forced_ids + self.answer_ids],
                                device=self.logits.device)
        tok = sample(self.logits, self.g.sampling, self.gen, seen)
        return int(tok[0, 0])

    def advance(self, tok: int) -> bool:
        """Take the sampled token; True when tokens wait in `feed` for this sequence's next forward."""
        lp = None
        if self.lps is not None:
            lp = _logprob_entry(self.logits[0], tok, self.g.logprobs)
            self.lps.append(lp)
        if self.phase == "think":
            self.think_ids.append(tok)
            self.emit("think", self.think.push(tok), [tok], [lp] if lp else None)
            end = self.e.end_ids
            if tok in self.stop_set:
                self.ended_by = "stop"
                return self.finish_now("stop", tok)
            if self.think_ids[-len(end):] == end:
                self.ended_by = "tag"
            elif len(self.think_ids) >= self.g.max_think:
                self.ended_by = "budget"
            else:
                self.feed = [tok]
                return True
            return self.to_answer()
        self.answer_ids.append(tok)
        delta = self.answer.push(tok)
        hit = self.answer.first_hold()
        if hit is not None:
            self.stop_text = hit[1]
            self.emit("answer", self.answer.take(self.answer.text(), hit[0]), [tok], [lp] if lp else None)
            return self.finish_now("stop", hit[1])
        self.emit("answer", delta, [tok], [lp] if lp else None)
        if tok in self.stop_set:
            return self.finish_now("stop", tok)
        if len(self.answer_ids) >= self.g.max_tokens:
            return self.finish_now("length", None)
        self.feed = [tok]
        return True

    def to_answer(self) -> bool:
        """Thinking ended by the tag or the budget: append the tag (budget), then the switch: the answer
        model's cache for prompt + trace + tag, as generate_two_phase builds it (re-prefill: a new cache
        and all of it to feed; transplant: the thinking cache moved over, the tokens it lacks to feed;
        the same model: the cache goes on). The sequence joins the answer model's group."""
        e = self.e
        if self.ended_by == "budget":
            self.forced_ids = rest_of_tag(self.think_ids, e.end_ids)
            self.close_think("forced")
            for t in self.forced_ids:
                self.emit("end", "", [t])
                if self.lps is not None:
                    self.lps.append(TokenLogprob(t, None, []))
        else:
            self.close_think("tag")
        if self.g.max_tokens == 0:
            return self.finish_now("length", None)
        seq = self.g.ids + self.think_ids + self.forced_ids
        answer = self.g.answer_sub
        if self.cache is None:
            mode, cache, pending = "prefill", e.model.new_cache(), seq
        else:
            pending = seq[self.cache.pos:]  # the last thinking token (never fed) and the appended tag
            if e.model.resolve(self.sub) == e.model.resolve(answer):
                mode, cache = "continue", self.cache
            elif self.g.switch == "transplant":
                mode, cache = "transplant", transplant_cache(e.model, self.cache, answer)
            else:
                mode, cache, pending = "reprefill", e.model.new_cache(), seq
        self.cache, self.sub, self.switch, self.phase, self.feed = cache, answer, mode, "answer", pending
        return True

    def finish_now(self, finish: str, reason) -> bool:
        self.finish, self.stop_reason, self.done = finish, reason, True
        return False

    def outcome(self) -> Outcome:
        if not self.closed:  # no answer phase: a stop token while thinking
            self.close_think("tag" if self.think_ids[-len(self.e.end_ids):] == self.e.end_ids else "none")
        if self.stop_text is None:  # the held-back rest of the answer
            text = settled(self.answer.text())
            self.emit("answer", self.answer.take(text, len(text)), [])
        return Outcome(self.think_ids, self.forced_ids, self.answer_ids,
                       reasoning=self.think.text()[: self.think.sent], end_text=self.end_text,
                       answer=self.answer.text()[: self.answer.sent], finish_reason=self.finish or "length",
                       stop_reason=self.stop_reason, ended_by=self.ended_by, switch=self.switch,
                       seconds=time.perf_counter() - self.t0, queued=self.t0 - self.submitted,
                       peak_batch=self.peak_batch, logprobs=self.lps, prompt_logprobs=self.prompt_lps)


class Engine:
    """The elastic model, its budgets and its tokenizer, and the scheduler thread (`start`, `submit`,
    `stop`). `extract`: run each budget as an extracted standalone model (faster steps, one more copy of
    the weights per budget used); by default every budget runs as a slice of the one elastic model.
    device / dtype: nestlm.device's rule (bf16 on CUDA, fp32 on CPU); threads: torch threads of the loop."""

    def __init__(self, path: str | Path, end_think: str = "</think>", max_model_len: int | None = None,
                 extract: bool = False, device: str | None = None, dtype: str | None = None,
                 threads: int | None = None, max_batch: int = 32, max_queue: int = 256):
        from nestlm.device import resolve
        from nestlm.io.safetensors import read_config
        from nestlm.io.tokenizer import load_tokenizer
        from nestlm.load import load_elastic

        if max_batch < 1 or max_queue < 1:
            raise ConfigError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.path = Path(path)
        self.device, self.dtype = resolve(device, dtype)
        model, self.router, self.manifest = load_elastic(self.path)
        self.elastic = model.to(device=self.device, dtype=self.dtype).eval()
        self.model = Standalone(self.elastic) if extract else self.elastic
        budgets = sorted(self.manifest["budgets"].items(), key=lambda kv: -kv[1]["fraction"])
        self.budgets: dict[str, SubArch] = {name: SubArch.from_dict(b["sub"]) for name, b in budgets}
        self.cards = {name: {k: b[k] for k in ("fraction", "params", "active_params") if k in b}
                      for name, b in budgets}
        self._resolved: dict[str, SubArch] = {}
        self.tok = load_tokenizer(self.path, model.cfg.vocab_size)
        self.encode, self.decode, self.bos_id, self.eos_id = (self.tok.encode, self.tok.decode, self.tok.bos_id,
                                                              self.tok.eos_id)
        self.vocab_size = model.cfg.vocab_size
        self.end_think = end_think
        self.end_ids = self.encode(end_think)
        if not self.end_ids:
            raise ConfigError("end_think must not be empty")
        self.max_model_len = int(max_model_len or read_config(self.path).get("max_position_embeddings")
                                 or DEFAULT_CONTEXT)
        self.chat_template = self._chat_template()
        self.created = int(time.time())
        self.threads, self.max_batch = threads, max_batch
        self.inbox: queue.Queue = queue.Queue(maxsize=max_queue)
        self.running = 0  # sequences in the batch (for /health)
        self.thread = threading.Thread(target=self._loop, name="nestlm-serve-engine", daemon=True)

    def _chat_template(self):
        """The tokenizer's apply_chat_template when the folder has a chat template, else None."""
        cfg = self.path / "tokenizer_config.json"
        has = (self.path / "chat_template.jinja").is_file() or (
            cfg.is_file() and "chat_template" in json.loads(cfg.read_text()))
        if not has:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path)).apply_chat_template

    # ---- names
    def budget(self, name: str, param: str = "model") -> SubArch:
        """A model id -> its SubArch: any budget the CLI accepts (a manifest name, '0.6', '60%'), through
        nestlm.elastic.artifact.resolve_budget; a 404 naming the trained budgets otherwise."""
        from nestlm.elastic.artifact import resolve_budget

        if name not in self._resolved:
            try:
                self._resolved[name] = resolve_budget(self.path, name, cfg=self.elastic.cfg,
                                                      manifest=self.manifest, router=self.router)[1]
            except ValueError as e:  # BudgetError (a ConfigError, a ValueError): an unknown budget
                msg = e.args[0] if e.args else str(e)
                raise APIError(404, f"The model `{name}` does not exist: {msg}", param, "model_not_found") from None
        return self._resolved[name]

    # ---- tokens
    def prompt_ids(self, prompt: str | list[int], bos: bool) -> list[int]:
        if isinstance(prompt, str):
            return [self.bos_id] * (bos and self.bos_id is not None) + self.encode(prompt)
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        return list(prompt)

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """vLLM's /tokenize: special tokens written as text ('<eos>') are their ids, as a Hugging Face
        tokenizer reads them; add_special_tokens: the tokenizer's own template (BOS for the byte tokenizer)."""
        if not self.tok.byte:
            return self.tok.encode(text, add_special_tokens=add_special_tokens)
        import re

        specials = self.tok.tok.specials
        ids = [self.bos_id] if add_special_tokens else []
        for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            ids += [256 + specials.index(part)] if part in specials else self.encode(part)
        return ids

    def token_str(self, t: int) -> str:
        """One token as a string (logprobs' `token`): its text, 'bytes:\\xNN' for a byte that is part of
        a multi-byte character, a special token's name."""
        if self.tok.byte:
            if t >= 256:
                return self.tok.tok.specials[t - 256] if t - 256 < len(self.tok.tok.specials) else f"<{t}>"
            return chr(t) if t < 128 else f"bytes:\\x{t:02x}"
        s = self.tok.tok.convert_ids_to_tokens(t)
        text = self.tok.tok.convert_tokens_to_string([s])
        return text if "\ufffd" not in text else s

    def detokenize(self, ids: list[int]) -> str:
        """Token ids -> text, special tokens written out ('<eos>'), as vLLM's /detokenize."""
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise APIError(400, f"token ids must be in [0, {self.vocab_size})", "tokens")
        if not self.tok.byte:
            return self.tok.tok.decode(ids, skip_special_tokens=False)
        out, run = [], []
        for t in ids + [None]:
            if t is not None and t < 256:
                run.append(t)
                continue
            out.append(bytes(run).decode("utf-8", errors="replace"))
            run = []
            if t is not None:
                out.append(self.token_str(t))
        return "".join(out)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                 template_kwargs: dict | None = None) -> list[int]:
        """The chat template's prompt (template_kwargs passed to it, e.g. enable_thinking); without a
        template, BOS + the messages' contents joined by newlines."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content", ""), str | list):
                raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        msgs = [{"role": m["role"], "content": _content(m.get("content") or "")} for m in messages]
        if self.chat_template is not None:
            try:
                ids = self.chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         **(template_kwargs or {}))
            except Exception as e:  # a template's own error (jinja raise_exception, a bad kwarg)
                raise APIError(400, f"the chat template failed: {e}", "messages") from None
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if template_kwargs:
            raise APIError(400, "chat_template_kwargs: this checkpoint has no chat template", "chat_template_kwargs")
        return self.prompt_ids("\n".join(m["content"] for m in msgs), bos=True)

    def check(self, g: Generation) -> None:
        """Raise APIError for what can't run: an empty prompt, one that does not fit."""
        if not g.ids:
            raise APIError(400, "the prompt is empty", "prompt")
        two = g.think_sub is not None
        need = len(g.ids) + g.max_tokens + (g.max_think + len(self.end_ids) if two else 0)
        if need > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the "
                           f"request needs {need} ({len(g.ids)} prompt, {g.max_tokens} answer"
                           + (f", {g.max_think} thinking + tag" if two else "") + ")",
                           "prompt", "context_length_exceeded")

    # ---- the scheduler
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def submit(self, gens: list[Generation], sink: Callable) -> threading.Event:
        """Queue the choices of one request (sink(index, kind, payload) hears from each: "delta" (phase,
        text, token ids, logprobs), "done" Outcome, "error" APIError); -> the event that cancels them all.
        A 503 when the inbox is full."""
        cancelled = threading.Event()
        if self.inbox.qsize() + len(gens) > self.inbox.maxsize:
            raise APIError(503, "the server's queue is full; retry later", kind="server_error", code="overloaded")
        for i, g in enumerate(gens):
            self.inbox.put_nowait(_Seq(self, g, i, sink, cancelled))
        return cancelled

    def _admit(self, s: _Seq) -> None:
        """A joining sequence: a new cache, and its prompt to feed in this step's forward."""
        s.t0 = time.perf_counter()
        g = s.g
        s.cache, s.feed = self.model.new_cache(), list(g.ids)
        if g.prompt_logprobs is None:
            s.emit("prompt", "", [], None)  # the echo's first chunk (with logprobs: once they are computed)
        if s.two and g.max_think == 0:  # no thinking: the whole tag, then the answer model reads it all
            s.ended_by, s.cache = "budget", None
            s.to_answer()
        elif not s.two and g.max_tokens == 0:
            if g.prompt_logprobs is None:
                s.feed = None
                s.finish_now("length", None)
            else:
                s.then_finish = True

    def _forward(self, sub: SubArch, members: list[_Seq]) -> None:
        """One forward of every member's fed tokens (packed, nestlm.model.decoder.Rows): each member's
        next-token logits, and (echo) its prompt's logprobs at its first forward."""
        ids = torch.tensor([[t for s in members for t in s.feed]], device=self.device)  # [1, T]
        lengths = [len(s.feed) for s in members]
        with torch.inference_mode():
            h = self.model(ids, sub=sub, cache=Rows([s.cache for s in members], lengths), return_hidden=True)[0]
            head = self.model.lm_head_weight[:, : h.shape[-1]]  # [v, k]
            ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1
            logits = torch.nn.functional.linear(h[ends], head).float()  # [b, v]
            at = 0
            for r, s in enumerate(members):
                s.logits = logits[r:r + 1]  # [1, v]
                s.peak_batch = max(s.peak_batch, len(members))
                if s.g.prompt_logprobs is not None and s.prompt_lps is None:
                    n = len(s.g.ids)
                    full = torch.nn.functional.linear(h[at:at + n - 1], head).float()  # [n - 1, v]
                    s.prompt_lps = [TokenLogprob(s.g.ids[0], None, [])] + [
                        _logprob_entry(full[i], s.g.ids[i + 1], s.g.prompt_logprobs) for i in range(n - 1)]
                    s.emit("prompt", "", [], s.prompt_lps)  # the echo's first chunk
                at += lengths[r]
                s.feed = None
                if s.then_finish:
                    s.finish_now("length", None)

    def _finish(self, s: _Seq) -> None:
        try:
            s.sink(s.index, "done", s.outcome())
        except Exception as e:
            s.sink(s.index, "error", APIError(500, f"{type(e).__name__}: {e}", kind="server_error"))

    def _fail(self, s: _Seq, e: Exception) -> None:
        s.done = True
        err = APIError(400, str(e)) if isinstance(e, ConfigError | ValueError) else \
            APIError(500, f"{type(e).__name__}: {e}", kind="server_error")
        s.sink(s.index, "error", err)

    def _loop(self) -> None:
        from nestlm.device import set_threads

        set_threads(self.threads)
        active: list[_Seq] = []
        while True:
            # join: block while idle, else take what waits (up to max_batch running)
            while len(active) < self.max_batch:
                try:
                    s = self.inbox.get(block=not active)
                except queue.Empty:
                    break
                if s is None:
                    return
                if s.cancelled.is_set():
                    continue
                try:
                    self._admit(s)
                except Exception as e:
                    self._fail(s, e)
                    continue
                if s.done:
                    self._finish(s)
                else:
                    active.append(s)
            # one step: each sequence with logits samples; what goes on feeds one forward per SubArch (the
            # joining prompts, the decoding tokens, the switches' pending tokens, packed together)
            for s in active:
                if s.cancelled.is_set():
                    s.done = True
                    continue
                if s.feed is not None or s.done:  # joined this step: its prompt is still to run
                    continue
                try:
                    s.advance(s.sample())
                except Exception as e:
                    self._fail(s, e)
            groups: dict[SubArch, list[_Seq]] = {}
            for s in active:
                if s.feed is not None and not s.done:
                    groups.setdefault(self.model.resolve(s.sub), []).append(s)
            for sub, members in groups.items():
                try:
                    self._forward(sub, members)
                except Exception as e:
                    for s in members:
                        self._fail(s, e)
            for s in active:
                if s.done and s.finish is not None:
                    self._finish(s)
            active = [s for s in active if not s.done]
            self.running = len(active)


def _content(c) -> str:
    """A message's content: a string, or OpenAI's list of parts ({"type": "text", "text": ...})."""
    if isinstance(c, str):
        return c
    return "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
