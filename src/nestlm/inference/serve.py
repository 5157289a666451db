"""`nestlm serve ELASTIC_DIR`: one elastic checkpoint behind an OpenAI-compatible API (FastAPI + uvicorn).

One copy of the weights serves every budget: `/v1/models` lists each manifest budget ('full', '60%', ...) as
a model id, and a request picks its submodels by name. Endpoints: `/v1/models`, `/v1/completions`,
`/v1/chat/completions` (the tokenizer's chat template when it has one), streaming (SSE) or not.

    curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{"model": "full",
         "prompt": "Q:3+5-9=?\\n<think>", "max_tokens": 8, "temperature": 0,
         "thinking_token_budget": 32, "think_model": "60%", "switch": "reprefill"}'

A request is a plain generation on `model` unless it asks for thinking (`thinking_token_budget`, vLLM's
name, or `think_model`): then it is budget control (nestlm.inference.two_phase.generate_two_phase): `think_model`
(default: `model`) thinks until the end-of-thinking tag or `thinking_token_budget` tokens (then the tag is
appended), and `answer_model` (default: `model`) writes at most `max_tokens` answer tokens after prompt +
trace + tag; `switch` is "reprefill" (exact) or "transplant" (the thinking model's cache moved over).
`stop` strings apply to the answer. The usage block counts thinking and answer tokens separately
(`completion_tokens_details.reasoning_tokens`, `thinking_tokens`, `forced_tokens`, `answer_tokens`); chat
responses put the trace in `message.reasoning_content` and the answer in `message.content`.

Concurrency: requests are queued, not batched. One worker thread runs one generation at a time (prompts of
a batch would switch models at different positions); the HTTP side stays responsive and streams while the
queue drains. Bad requests get OpenAI-style error JSON ({"error": {"message", "type", "param", "code"}})
with status 400 (invalid field, malformed JSON, over-long prompt), 404 (unknown model or path) or 503
(queue full); an error inside one generation answers that request and the worker goes on.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from nestlm.arch import SubArch
from nestlm.errors import ConfigError
from nestlm.inference.detok import Detok, held_suffix
from nestlm.inference.generate import Sampling, generate
from nestlm.inference.two_phase import Standalone, generate_two_phase

__all__ = ["ChatRequest", "CompletionRequest", "Engine", "create_app", "launch", "serve", "stop", "wait_ready"]

DEFAULT_MAX_THINK = 256  # thinking budget when a request asks for thinking without giving one
DEFAULT_CONTEXT = 4096  # max_model_len when the checkpoint's config.json has no max_position_embeddings


# ---------------------------------------------------------------------------------------------- requests
class _Request(BaseModel):
    """The fields both endpoints share: OpenAI's sampling fields, vLLM's `thinking_token_budget`,
    and nestlm's nested switch. Unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    thinking_token_budget: int | None = Field(None, ge=0)  # vLLM's name: the cap on thinking tokens
    think_model: str | None = None  # nestlm: the budget that thinks (default: model)
    answer_model: str | None = None  # nestlm: the budget that answers (default: model)
    switch: Literal["reprefill", "transplant"] = "reprefill"
    return_token_ids: bool = False  # vLLM's name: the generated token ids in each choice

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    add_special_tokens: bool = True  # start the prompt with the tokenizer's BOS
    echo: bool = False


class ChatRequest(_Request):
    messages: list[dict] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, param, code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- text
# ---------------------------------------------------------------------------------------------- engine
@dataclass
class Generation:
    """One request as the engine runs it."""

    ids: list[int]  # the prompt
    answer: str  # budget names
    think: str | None  # None: a plain generation on `answer`
    max_think: int
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    switch: str = "reprefill"


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

    @property
    def token_ids(self) -> list[int]:
        return self.think_ids + self.forced_ids + self.answer_ids


class _Stopped(Exception):
    """Raised from the token callback to end a generation early (a stop string, or the client left)."""


class Engine:
    """The elastic model, its budgets and its tokenizer; `run` does one generation (any thread, one at a
    time). `extract`: run each budget as an extracted standalone model (faster steps, one more copy of
    the weights per budget used); by default every budget runs as a slice of the one elastic model."""

    def __init__(self, path: str | Path, end_think: str = "</think>", max_model_len: int | None = None,
                 extract: bool = False):
        from nestlm.elastic.artifact import resolve_budget
        from nestlm.io.safetensors import read_config
        from nestlm.io.tokenizer import load_tokenizer
        from nestlm.load import load_elastic

        self.path = Path(path)
        model, _, manifest = load_elastic(self.path)
        self.elastic = model.eval()
        self.model = Standalone(self.elastic) if extract else self.elastic
        budgets = sorted(manifest["budgets"].items(), key=lambda kv: -kv[1]["fraction"])
        self.budgets: dict[str, SubArch] = {name: resolve_budget(None, name, manifest=manifest)[1]
                                            for name, _ in budgets}
        self.cards = {name: {k: b[k] for k in ("fraction", "params", "active_params") if k in b}
                      for name, b in budgets}
        tok = load_tokenizer(self.path, model.cfg.vocab_size)
        self.encode, self.decode, self.bos_id, self.eos_id = tok.encode, tok.decode, tok.bos_id, tok.eos_id
        self.end_think = end_think
        self.end_ids = self.encode(end_think)
        if not self.end_ids:
            raise ConfigError("end_think must not be empty")
        self.max_model_len = int(max_model_len or read_config(self.path).get("max_position_embeddings")
                                 or DEFAULT_CONTEXT)
        self.chat_template = self._chat_template()
        self.created = int(time.time())

    def _chat_template(self):
        """The tokenizer's apply_chat_template when the folder has a chat template, else None."""
        cfg = self.path / "tokenizer_config.json"
        has = (self.path / "chat_template.jinja").is_file() or (
            cfg.is_file() and "chat_template" in json.loads(cfg.read_text()))
        if not has:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path)).apply_chat_template

    # ---- prompts
    def prompt_ids(self, prompt: str | list[int], bos: bool) -> list[int]:
        if isinstance(prompt, str):
            return [self.bos_id] * (bos and self.bos_id is not None) + self.encode(prompt)
        vocab = self.elastic.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        return list(prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The chat template's prompt (generation prompt added); without a template, BOS + the messages'
        contents joined by newlines."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content", ""), str | list):
                raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        msgs = [{"role": m["role"], "content": _content(m.get("content") or "")} for m in messages]
        if self.chat_template is not None:
            ids = self.chat_template(msgs, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        return self.prompt_ids("\n".join(m["content"] for m in msgs), bos=True)

    def sub(self, name: str, param: str) -> SubArch:
        if name not in self.budgets:
            raise APIError(404, f"The model `{name}` does not exist (have {list(self.budgets)})", param,
                           "model_not_found")
        return self.budgets[name]

    def check(self, g: Generation) -> None:
        """Raise APIError for what can't run: unknown budgets, a prompt that does not fit."""
        self.sub(g.answer, "model")
        if g.think is not None:
            self.sub(g.think, "think_model")
        if not g.ids:
            raise APIError(400, "the prompt is empty", "prompt")
        need = len(g.ids) + g.max_tokens + (g.max_think + len(self.end_ids) if g.think is not None else 0)
        if need > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the "
                           f"request needs {need} ({len(g.ids)} prompt, {g.max_tokens} answer"
                           + (f", {g.max_think} thinking + tag" if g.think is not None else "") + ")",
                           "prompt", "context_length_exceeded")

    # ---- one generation
    def run(self, g: Generation, emit: Callable[[str, str, list[int]], None],
            cancelled: threading.Event | None = None) -> Outcome:
        """Generate; `emit(phase, text_delta, token_ids)` streams it, phase "think" | "end" | "answer"
        ("end": the end-of-thinking tag, written or forced). Token-exact with generate_two_phase (or
        nestlm.inference.generate.generate for a plain request) on the same model, seed and sampling fields."""
        two = g.think is not None
        think, forced = Detok(self.decode, [self.end_think]), []
        answer = Detok(self.decode, g.stops)
        state = {"closed": not two, "end_text": "", "stop": None}

        def close_think(end: str):  # the trace is over: hand out the rest of its text, then the tag
            text = think.text()  # end: "tag" (written), "forced" (the budget: the tag or its rest) or "none"
            if end == "tag" and text.endswith(self.end_think):
                text = text[: len(text) - len(self.end_think)]
            elif end == "forced":  # the budget cut the tag mid-way ('4</th'): those characters are the tag's
                text = text[: len(text) - held_suffix(text, [self.end_think])]  # start, handed out with it whole
            emit("think", think.take(text, len(text)), [])
            state["closed"] = True

        def on_token(tok: torch.Tensor, phase: str = "answer"):  # tok [1]
            if cancelled is not None and cancelled.is_set():
                raise _Stopped("cancelled")
            t = int(tok[0])
            if phase == "think":
                emit("think", think.push(t), [t])
            elif phase == "forced":
                if not state["closed"]:
                    close_think("forced")
                    state["end_text"] = self.end_think
                    emit("end", self.end_think, [])
                forced.append(t)
                emit("end", "", [t])
            else:
                if not state["closed"]:  # the thinking model wrote the tag
                    close_think("tag")
                    state["end_text"] = self.end_think
                    emit("end", self.end_think, [])
                delta = answer.push(t)
                hit = answer.first_hold()
                if hit is not None:
                    state["stop"] = hit[1]
                    emit("answer", answer.take(answer.text(), hit[0]), [t])
                    raise _Stopped("stop string")
                emit("answer", delta, [t])

        t0 = time.perf_counter()
        ids = torch.tensor([g.ids], device=self.elastic.embeddings.weight.device)  # [1, t]
        ended_by, switch = None, "none"
        sampling = Sampling(temperature=g.temperature, seed=g.seed, top_p=g.top_p if g.top_p < 1 else None)
        try:
            if two:
                res = generate_two_phase(self.model, ids, self.budgets[g.think], self.budgets[g.answer],
                                         g.max_think, g.max_tokens, self.end_ids, stop_tokens=self.eos_id,
                                         switch=g.switch, sampling=sampling, callback=on_token)
                ended_by, switch = res.ended_by, res.switch
            else:
                generate(self.model, ids, g.max_tokens, self.budgets[g.answer], stop_tokens=self.eos_id,
                         sampling=sampling, callback=lambda tok: on_token(tok))
        except _Stopped:
            if cancelled is not None and cancelled.is_set():
                raise
        # how thinking ended, when the generation stopped before generate_two_phase could say
        tail = think.ids[-len(self.end_ids):]
        if two and ended_by is None:
            ended_by = "tag" if tail == self.end_ids else ("budget" if forced else "stop")
            if not answer.ids:
                switch = "none"
            elif g.max_think == 0:
                switch = "prefill"
            else:
                switch = "continue" if self.budgets[g.think] == self.budgets[g.answer] else g.switch
        if not state["closed"]:  # no answer phase: a stop token while thinking, or max_tokens 0 after the tag
            wrote = tail == self.end_ids
            close_think("tag" if wrote else "none")
            if wrote:
                state["end_text"] = self.end_think
                emit("end", self.end_think, [])
        if state["stop"] is None:
            emit("answer", answer.take(answer.text(), len(answer.text())), [])  # held-back text
        last = answer.ids[-1] if answer.ids else (think.ids[-1] if ended_by == "stop" else None)
        if state["stop"] is not None:
            finish, stop_reason = "stop", state["stop"]
        elif last is not None and last == self.eos_id:
            finish, stop_reason = "stop", last
        else:
            finish, stop_reason = "length", None
        return Outcome(think.ids, forced, answer.ids, reasoning=_sent(think),
                       end_text=state["end_text"], answer=_sent(answer), finish_reason=finish,
                       stop_reason=stop_reason, ended_by=ended_by, switch=switch,
                       seconds=time.perf_counter() - t0)


def _sent(d: Detok) -> str:
    """The text a stream handed out (its final text once closed)."""
    return d.text()[: d.sent]


def _content(c) -> str:
    """A message's content: a string, or OpenAI's list of parts ({"type": "text", "text": ...})."""
    if isinstance(c, str):
        return c
    return "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")


# ---------------------------------------------------------------------------------------------- the queue
@dataclass
class _Job:
    gen: Generation
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued: float = field(default_factory=time.perf_counter)

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Worker:
    """One thread that runs queued generations in arrival order (FIFO)."""

    def __init__(self, engine: Engine, max_queue: int = 256, threads: int | None = None):
        self.engine, self.threads = engine, threads
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._loop, name="nestlm-serve-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def submit(self, gen: Generation) -> _Job:
        job = _Job(gen, asyncio.get_running_loop(), asyncio.Queue())
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, "the server's queue is full; retry later", kind="server_error",
                           code="overloaded") from None
        return job

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            waited = time.perf_counter() - job.queued
            try:
                out = self.engine.run(job.gen, lambda *e, j=job: j.push(("delta", e)), job.cancelled)
                job.push(("done", (out, waited)))
            except _Stopped:
                pass
            except (ConfigError, ValueError) as e:
                job.push(("error", APIError(400, str(e))))
            except Exception as e:  # one request failed; the worker goes on
                job.push(("error", APIError(500, f"{type(e).__name__}: {e}", kind="server_error")))


# ---------------------------------------------------------------------------------------------- the app
def _usage(prompt_len: int, out: Outcome) -> dict:
    n = len(out.token_ids)
    return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n,
            "completion_tokens_details": {"reasoning_tokens": len(out.think_ids) + len(out.forced_ids)},
            "thinking_tokens": len(out.think_ids), "forced_tokens": len(out.forced_ids),
            "answer_tokens": len(out.answer_ids)}


def _generation(engine: Engine, req: _Request, ids: list[int], max_tokens: int | None) -> Generation:
    two = req.thinking_token_budget is not None or req.think_model is not None
    answer = req.answer_model or req.model
    g = Generation(ids=ids, answer=answer, think=(req.think_model or answer) if two else None,
                   max_think=req.thinking_token_budget if req.thinking_token_budget is not None
                   else DEFAULT_MAX_THINK, max_tokens=max_tokens if max_tokens is not None else 256,
                   temperature=req.temperature, top_p=req.top_p, seed=req.seed, stops=req.stops(),
                   switch=req.switch)
    if len(g.stops) > 4:
        raise APIError(400, "at most 4 stop sequences", "stop")
    engine.check(g)
    return g


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(path: str | Path, end_think: str = "</think>", max_model_len: int | None = None,
               extract: bool = False, max_queue: int = 256, threads: int | None = None):
    """The FastAPI app serving the elastic checkpoint at `path` (loaded once, now)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    engine = Engine(path, end_think=end_think, max_model_len=max_model_len, extract=extract)
    worker = Worker(engine, max_queue=max_queue, threads=threads)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="nestlm", lifespan=lifespan)
    app.state.engine, app.state.worker = engine, worker

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":
            return JSONResponse(APIError(400, f"malformed JSON: {err.get('ctx', {}).get('error', '')}").body(), 400)
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}"
        return JSONResponse(APIError(400, msg, ".".join(loc) or None).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": worker.jobs.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": engine.created, "owned_by": "nestlm",
             "root": str(engine.path), **engine.cards[name]} for name in engine.budgets]}

    async def run(g: Generation, stream: bool, prompt_len: int, make_chunk, make_body, include_usage: bool):
        job = worker.submit(g)
        if not stream:
            try:
                while True:
                    kind, item = await job.events.get()
                    if kind == "error":
                        raise item
                    if kind == "done":
                        out, waited = item
                        return make_body(out, waited)
            finally:
                job.cancelled.set()  # a no-op once done; stops the generation if the client left

        async def events():
            try:
                first = True
                while True:
                    kind, item = await job.events.get()
                    if kind == "error":
                        yield _sse(item.body())
                        break
                    if kind == "delta":
                        chunk = make_chunk(*item, first=first)
                        first = False
                        if chunk is not None:
                            yield _sse(chunk)
                    if kind == "done":
                        out, _ = item
                        yield _sse(make_chunk("final", "", [], first=first, out=out))
                        if include_usage:
                            yield _sse(make_chunk("usage", "", [], first=False, out=out))
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    def meta(g: Generation, out: Outcome, waited: float) -> dict:
        return {"think_model": g.think, "answer_model": g.answer, "switch": out.switch, "ended_by": out.ended_by,
                "queue_s": round(waited, 6), "generate_s": round(out.seconds, 6)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.echo:
            raise APIError(400, "echo is not supported", "echo")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request", "prompt")
            prompt = prompt[0]
        ids = engine.prompt_ids(prompt, req.add_special_tokens)
        g = _generation(engine, req, ids, req.max_tokens)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": req.model}

        def choice(text: str, out: Outcome | None, tokens: list[int] | None) -> dict:
            c = {"index": 0, "text": text, "logprobs": None,
                 "finish_reason": None if out is None else out.finish_reason}
            if out is not None:
                c["stop_reason"] = out.stop_reason
            if req.return_token_ids and tokens is not None:
                c["token_ids"] = tokens
            return c

        def body(out: Outcome, waited: float) -> dict:
            text = out.reasoning + out.end_text + out.answer
            return {**head, "choices": [choice(text, out, out.token_ids)], "usage": _usage(len(ids), out),
                    "nestlm": meta(g, out, waited)}

        def chunk(phase: str, delta: str, tokens: list[int], first: bool, out: Outcome | None = None):
            if phase == "usage":
                return {**head, "choices": [], "usage": _usage(len(ids), out)}
            if phase == "final":
                return {**head, "choices": [choice("", out, [])]}
            if not delta and not (req.return_token_ids and tokens):
                return None
            return {**head, "choices": [choice(delta, None, tokens)]}

        usage = bool((req.stream_options or {}).get("include_usage"))
        return await run(g, req.stream, len(ids), chunk, body, usage)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        ids = engine.chat_ids(req.messages)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        g = _generation(engine, req, ids, limit)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": req.model}

        def body(out: Outcome, waited: float) -> dict:
            msg = {"role": "assistant", "content": out.answer}
            if g.think is not None:
                msg["reasoning_content"] = out.reasoning
            c = {"index": 0, "message": msg, "logprobs": None, "finish_reason": out.finish_reason,
                 "stop_reason": out.stop_reason}
            if req.return_token_ids:
                c["token_ids"] = out.token_ids
            return {**head, "choices": [c], "usage": _usage(len(ids), out), "nestlm": meta(g, out, waited)}

        def chunk(phase: str, delta: str, tokens: list[int], first: bool, out: Outcome | None = None):
            h = {**head, "object": "chat.completion.chunk"}
            if phase == "usage":
                return {**h, "choices": [], "usage": _usage(len(ids), out)}
            if phase == "final":
                d = {"role": "assistant", "content": ""} if first else {}
                return {**h, "choices": [{"index": 0, "delta": d, "logprobs": None,
                                          "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}]}
            d = {"role": "assistant"} if first else {}
            if delta and phase in ("think", "answer"):  # the end tag is neither reasoning nor content
                d["reasoning_content" if phase == "think" else "content"] = delta
            if not d and not (req.return_token_ids and tokens):
                return None
            c = {"index": 0, "delta": d, "logprobs": None, "finish_reason": None}
            if req.return_token_ids:
                c["token_ids"] = tokens
            return {**h, "choices": [c]}

        usage = bool((req.stream_options or {}).get("include_usage"))
        return await run(g, req.stream, len(ids), chunk, body, usage)

    return app


# ---------------------------------------------------------------------------------------------- serve
def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, end_think: str = "</think>",
          max_model_len: int | None = None, extract: bool = False, max_queue: int = 256,
          threads: int | None = None, log_level: str = "warning") -> None:
    """Serve the elastic checkpoint at `path` on http://host:port/v1 until interrupted (uvicorn)."""
    import uvicorn

    app = create_app(path, end_think=end_think, max_model_len=max_model_len, extract=extract,
                     max_queue=max_queue, threads=threads)
    print(f"nestlm serve: {path} on http://{host}:{port}/v1 (models: {', '.join(app.state.engine.budgets)})",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


# ---------------------------------------------------------------------------------------------- a server process
def launch(path: str | Path, *args: str, port: int | None = None):
    """Start `python -m nestlm.cli serve PATH --port PORT *args` on 127.0.0.1 (a free port by default) in a
    subprocess, without waiting: -> (Popen, "http://127.0.0.1:PORT/v1"). For tests and benchmarks; pair with
    wait_ready and stop."""
    import os
    import socket
    import subprocess
    import sys

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nestlm.cli", "serve", str(path), "--host", "127.0.0.1",
                             "--port", str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=os.environ.copy())
    return proc, f"http://127.0.0.1:{port}/v1"


def wait_ready(proc, url: str, timeout: float = 90.0) -> None:
    """Poll url's /health until the server answers; RuntimeError (with its output) if it exits first."""
    import urllib.request

    base = url.removesuffix("/v1")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read().decode(errors='replace')}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"no server at {base} after {timeout} s")


def stop(proc) -> None:
    """Terminate a launched server (kill it if it does not exit within 10 s)."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()
