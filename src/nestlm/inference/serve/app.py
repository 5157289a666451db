"""`nestlm serve`'s routes (FastAPI) and the server process: requests in, engine generations out.

    /v1/models  /v1/completions  /v1/chat/completions  (streamed as SSE or not)
    /tokenize  /detokenize  /tokenizer_info  /health            (vLLM's, as lm-eval's remote tokenizer probes)

A request becomes one Generation per choice (prompts x n) on the engine (engine.py); its fields are the
protocol's (protocol.py). With an API key (`--api-key` or NESTLM_API_KEY) every route but /health needs
`Authorization: Bearer KEY` (401 otherwise)."""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from nestlm.errors import ConfigError
from nestlm.inference.detok import settled
from nestlm.inference.generate import Sampling
from nestlm.inference.serve.engine import Engine, Generation, Outcome, TokenLogprob
from nestlm.inference.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _Request,
)

__all__ = ["API_KEY_ENV", "DEFAULT_MAX_THINK", "create_app", "launch", "serve", "stop", "wait_ready"]

DEFAULT_MAX_THINK = 256  # thinking budget when a request asks for thinking without giving one
DEFAULT_CHAT_TOKENS = 256  # max_tokens of a chat request that gives none
API_KEY_ENV = "NESTLM_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ---------------------------------------------------------------------------------------------- requests
def _generations(engine: Engine, req: _Request, prompts: list[list[int]], max_tokens: int | None,
                 logprobs: int | None, prompt_logprobs: int | None = None) -> list[Generation]:
    """One Generation per choice: prompt i, sample j -> index i * n + j; choice j samples with seed + j."""
    engine.budget(req.model, "model")
    answer = engine.budget(req.answer_model, "answer_model") if req.answer_model else engine.budget(req.model)
    two = req.thinking_token_budget is not None or req.think_model is not None
    think = (engine.budget(req.think_model, "think_model") if req.think_model else answer) if two else None
    stops = req.stops()
    if len(stops) > 4:
        raise APIError(400, "at most 4 stop sequences", "stop")
    if any(not 0 <= t < engine.vocab_size for t in req.stop_token_ids or []):
        raise APIError(400, f"stop_token_ids must be in [0, {engine.vocab_size})", "stop_token_ids")
    top_k = None if req.top_k in (None, -1, 0) else req.top_k
    top_p = None if req.top_p is None or req.top_p >= 1 else req.top_p
    temperature = 1.0 if req.temperature is None else req.temperature
    out = []
    for ids in prompts:
        mt = max_tokens if max_tokens is not None else DEFAULT_CHAT_TOKENS
        budget = req.thinking_token_budget
        if budget is None:
            budget = DEFAULT_MAX_THINK
        elif budget == -1:  # unlimited: what the context leaves
            budget = max(engine.max_model_len - len(ids) - mt - len(engine.end_ids), 0)
        for j in range(req.n):
            seed = None if req.seed is None else req.seed + j
            g = Generation(ids=ids, answer_sub=answer, think_sub=think, max_think=budget, max_tokens=mt,
                           sampling=Sampling(temperature, top_k, top_p, req.repetition_penalty, seed),
                           stops=stops, stop_ids=list(req.stop_token_ids or []), switch=req.switch,
                           logprobs=logprobs, prompt_logprobs=prompt_logprobs)
            engine.check(g)
            out.append(g)
    return out


def _prompts(engine: Engine, req: CompletionRequest) -> list[list[int]]:
    """A string, a list of strings, token ids or a list of lists of token ids -> token id lists."""
    p = req.prompt
    if isinstance(p, str):
        items = [p]
    elif not p:
        raise APIError(400, "the prompt is empty", "prompt")
    elif isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    if any(not x for x in items):
        raise APIError(400, "the prompt is empty", "prompt")
    return [engine.prompt_ids(x, req.add_special_tokens) for x in items]


def _usage(prompts: list[list[int]], outs: list[Outcome]) -> dict:
    p = sum(len(x) for x in prompts)
    n = sum(len(o.token_ids) for o in outs)
    think, forced = sum(len(o.think_ids) for o in outs), sum(len(o.forced_ids) for o in outs)
    return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n,
            "completion_tokens_details": {"reasoning_tokens": think + forced},
            "thinking_tokens": think, "forced_tokens": forced,
            "answer_tokens": sum(len(o.answer_ids) for o in outs)}


def _meta(req: _Request, g: Generation, out: Outcome) -> dict:
    return {"think_model": (req.think_model or req.answer_model or req.model) if g.think_sub is not None else None,
            "answer_model": req.answer_model or req.model, "switch": out.switch, "ended_by": out.ended_by,
            "queue_s": round(out.queued, 6), "generate_s": round(out.seconds, 6), "peak_batch": out.peak_batch}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# ---------------------------------------------------------------------------------------------- logprobs
def _offsets(engine: Engine, ids: list[int], start: int = 0) -> list[int]:
    """Character offset of each token in the text of `ids` (from `start`): an incomplete character counts
    where it completes. Byte tokenizer: exact; otherwise the sum of each token's own text."""
    out, n = [], start
    if engine.tok.byte:
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for t in ids:
            out.append(n)
            if t < 256:
                n += len(dec.decode(bytes([t])))
        return out
    for t in ids:
        out.append(n)
        n += len(engine.decode([t]))
    return out


def _legacy(engine: Engine, entries: list[TokenLogprob], start: int = 0) -> dict:
    """The completions (legacy) logprobs: tokens, token_logprobs (None where not sampled), top_logprobs (a
    dict per token: the top k and the chosen token; None where not sampled), text_offset."""
    tops = []
    for e in entries:
        if e.logprob is None:
            tops.append(None)
            continue
        d = {engine.token_str(i): lp for i, lp in e.top}
        d.setdefault(engine.token_str(e.token), e.logprob)
        tops.append(d)
    return {"tokens": [engine.token_str(e.token) for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": _offsets(engine, [e.token for e in entries], start)}


def _chat_logprobs(engine: Engine, entries: list[TokenLogprob]) -> dict:
    def one(t: int, lp: float | None) -> dict:
        s = engine.token_str(t)
        return {"token": s, "logprob": lp, "bytes": list(engine.detokenize([t]).encode())}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]}
                        for e in entries]}


# ---------------------------------------------------------------------------------------------- the app
def create_app(path: str | Path, end_think: str = "</think>", max_model_len: int | None = None,
               extract: bool = False, max_queue: int = 256, threads: int | None = None,
               device: str | None = None, dtype: str | None = None, max_batch: int = 32,
               api_key: str | None = None):
    """The FastAPI app serving the elastic checkpoint at `path` (loaded once, now)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    engine = Engine(path, end_think=end_think, max_model_len=max_model_len, extract=extract, device=device,
                    dtype=dtype, threads=threads, max_batch=max_batch, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="nestlm", lifespan=lifespan)
    app.state.engine = engine

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if given != f"Bearer {api_key}":
                return JSONResponse(APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                             code="invalid_api_key", kind="authentication_error").body(), 401)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":
            return JSONResponse(APIError(400, f"malformed JSON: {err.get('ctx', {}).get('error', '')}").body(), 400)
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "extra_forbidden":
            name = loc[-1] if loc else "?"
            msg = f"`{name}` is not supported by nestlm serve (see docs/serving.md for the supported fields)"
            return JSONResponse(APIError(400, msg, name, "unsupported_parameter").body(), 400)
        if loc and loc[0] == "prompt":  # a union's errors name each member: say what a prompt may be
            msg = "prompt: must be a string, a list of strings, a list of token ids or a list of lists of them"
            return JSONResponse(APIError(400, msg, "prompt").body(), 400)
        msg = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}"
        return JSONResponse(APIError(400, msg, loc[0] if loc else None).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.inbox.qsize(), "running": engine.running, "pid": os.getpid()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": engine.created, "owned_by": "nestlm",
             "root": str(engine.path), "max_model_len": engine.max_model_len, **engine.cards[name]}
            for name in engine.budgets]}

    # ---- tokenizer (vLLM's routes; lm-eval's remote tokenizer)
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        special = (lambda t: None if t is None else engine.token_str(t))
        pad = getattr(engine.tok.tok, "pad_id", None) if engine.tok.byte else engine.tok.tok.pad_token_id
        return {"tokenizer_class": "ByteTokenizer" if engine.tok.byte else type(engine.tok.tok).__name__,
                "bos_token": special(engine.bos_id), "eos_token": special(engine.eos_id),
                "pad_token": special(pad), "vocab_size": engine.vocab_size,
                "model_max_length": engine.max_model_len, "chat_template": None}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of `prompt` and `messages`", "prompt")
        if req.model is not None:
            engine.budget(req.model)
        if req.prompt is not None:
            ids = engine.tokenize(req.prompt, req.add_special_tokens)
        else:
            ids = engine.chat_ids(req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        out = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [engine.token_str(t) for t in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        if req.model is not None:
            engine.budget(req.model)
        return {"prompt": engine.detokenize(req.tokens)}

    # ---- generation
    def submit(gens: list[Generation], deltas: bool = True):
        """Queue the choices; their events arrive on the returned asyncio.Queue (deltas only when streamed:
        a non-streamed request would wake the event loop once per token for nothing)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink(i, kind, item):
            if deltas or kind != "delta":
                loop.call_soon_threadsafe(events.put_nowait, (i, kind, item))

        return events, engine.submit(gens, sink)

    async def collect(gens: list[Generation]) -> list[Outcome]:
        events, cancel = submit(gens, deltas=False)
        outs: list[Outcome | None] = [None] * len(gens)
        try:
            while any(o is None for o in outs):
                i, kind, item = await events.get()
                if kind == "error":
                    raise item
                if kind == "done":
                    outs[i] = item
            return outs
        finally:
            cancel.set()  # a no-op once done; stops the rest when one failed or the client left

    def stream(gens: list[Generation], chunk, final, usage_chunk, include_usage: bool):
        events, cancel = submit(gens)

        async def gen():
            try:
                outs: list[Outcome | None] = [None] * len(gens)
                while any(o is None for o in outs):
                    i, kind, item = await events.get()
                    if kind == "error":
                        yield _sse(item.body())
                        break
                    if kind == "delta":
                        c = chunk(i, *item)
                        if c is not None:
                            yield _sse(c)
                    elif kind == "done":
                        outs[i] = item
                        yield _sse(final(i, item))
                else:
                    if include_usage:
                        yield _sse(usage_chunk(outs))
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = _prompts(engine, req)
        echo_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        gens = _generations(engine, req, prompts, req.max_tokens, req.logprobs, echo_lp)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
        texts = [settled(engine.decode(p)) if req.echo else "" for p in prompts]

        def prompt_text(i: int) -> str:
            return texts[i // req.n]

        def body_choice(i: int, out: Outcome) -> dict:
            text = prompt_text(i) + out.reasoning + out.end_text + out.answer
            c = {"index": i, "text": text, "logprobs": None, "finish_reason": out.finish_reason,
                 "stop_reason": out.stop_reason}
            if req.logprobs is not None:
                entries = (out.prompt_logprobs or []) + (out.logprobs or [])
                c["logprobs"] = _legacy(engine, entries)
            if req.return_token_ids:
                c["token_ids"] = out.token_ids
                if req.echo:
                    c["prompt_token_ids"] = gens[i].ids
            return c

        if not req.stream:
            outs = await collect(gens)
            return {**head, "choices": [body_choice(i, o) for i, o in enumerate(outs)],
                    "usage": _usage(prompts, outs), "nestlm": _meta(req, gens[0], outs[0])}

        offsets = [0] * len(gens)  # characters streamed per choice (text_offset)

        def chunk(i: int, phase: str, delta: str, tokens: list[int], lps: list[TokenLogprob] | None):
            c = {"index": i, "text": delta, "logprobs": None, "finish_reason": None}
            if phase == "prompt":
                if not req.echo:
                    return None
                c["text"] = prompt_text(i)
                if lps is not None:
                    c["logprobs"] = _legacy(engine, lps)
            elif req.logprobs is not None and tokens:
                ents = lps or [TokenLogprob(t, None, []) for t in tokens]
                c["logprobs"] = _legacy(engine, ents, offsets[i])
            if not c["text"] and c["logprobs"] is None and not (req.return_token_ids and tokens):
                return None
            if req.return_token_ids:
                c["token_ids"] = tokens if phase != "prompt" else []
            offsets[i] += len(c["text"])
            return {**head, "choices": [c]}

        def final(i: int, out: Outcome):
            return {**head, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": out.finish_reason,
                                         "stop_reason": out.stop_reason, **({"token_ids": []} if req.return_token_ids
                                                                            else {})}]}

        return stream(gens, chunk, final, lambda outs: {**head, "choices": [], "usage": _usage(prompts, outs)},
                      req.include_usage())

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        ids = engine.chat_ids(req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        k = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        gens = _generations(engine, req, [ids], limit, k)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": req.model}
        show_reasoning = req.include_reasoning

        def body_choice(i: int, out: Outcome) -> dict:
            msg = {"role": "assistant", "content": out.answer}
            if gens[i].think_sub is not None and show_reasoning:
                msg["reasoning"] = msg["reasoning_content"] = out.reasoning
            c = {"index": i, "message": msg, "logprobs": None, "finish_reason": out.finish_reason,
                 "stop_reason": out.stop_reason}
            if req.logprobs:
                c["logprobs"] = _chat_logprobs(engine, (out.logprobs or [])[len(out.think_ids) + len(out.forced_ids):])
            if req.return_token_ids:
                c["token_ids"] = out.token_ids
            return c

        if not req.stream:
            outs = await collect(gens)
            return {**head, "choices": [body_choice(i, o) for i, o in enumerate(outs)],
                    "usage": _usage([ids], outs), "nestlm": _meta(req, gens[0], outs[0])}

        h = {**head, "object": "chat.completion.chunk"}
        started = [False] * len(gens)

        def chunk(i: int, phase: str, delta: str, tokens: list[int], lps: list[TokenLogprob] | None):
            d = {} if started[i] else {"role": "assistant"}
            if delta and phase == "answer":
                d["content"] = delta
            elif delta and phase == "think" and show_reasoning:  # the end tag is neither reasoning nor content
                d["reasoning"] = d["reasoning_content"] = delta
            c = {"index": i, "delta": d, "logprobs": None, "finish_reason": None}
            if req.logprobs and phase == "answer" and lps:
                c["logprobs"] = _chat_logprobs(engine, lps)
            if req.return_token_ids and tokens:
                c["token_ids"] = tokens
            if not d and c["logprobs"] is None and "token_ids" not in c:
                return None
            started[i] = True
            return {**h, "choices": [c]}

        def final(i: int, out: Outcome):
            d = {} if started[i] else {"role": "assistant", "content": ""}
            return {**h, "choices": [{"index": i, "delta": d, "logprobs": None, "finish_reason": out.finish_reason,
                                      "stop_reason": out.stop_reason}]}

        return stream(gens, chunk, final, lambda outs: {**h, "choices": [], "usage": _usage([ids], outs)},
                      req.include_usage())

    return app


# ---------------------------------------------------------------------------------------------- serve
def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, end_think: str = "</think>",
          max_model_len: int | None = None, extract: bool = False, max_queue: int = 256,
          threads: int | None = None, device: str | None = None, dtype: str | None = None,
          max_batch: int = 32, api_key: str | None = None, log_level: str = "warning") -> None:
    """Serve the elastic checkpoint at `path` on http://host:port/v1 until interrupted (uvicorn). The port is
    bound before the model loads, so a busy port fails at once (OSError), before the listening line.
    api_key: None -> the NESTLM_API_KEY environment variable (unset: no key)."""
    import socket

    import uvicorn

    if not 0 <= port < 65536:
        raise ConfigError(f"port must be in 0..65535, got {port}")
    api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        app = create_app(path, end_think=end_think, max_model_len=max_model_len, extract=extract,
                         max_queue=max_queue, threads=threads, device=device, dtype=dtype, max_batch=max_batch,
                         api_key=api_key)
        sock.listen(2048)
        engine = app.state.engine
        if api_key is None and host not in LOOPBACK:
            print(f"nestlm: warning: serving on {host} without an API key: anyone who can reach this port can use "
                  f"it (pass --api-key or set {API_KEY_ENV})", file=sys.stderr, flush=True)
        port = sock.getsockname()[1]
        print(f"nestlm serve: {path} on http://{host}:{port}/v1 (models: {', '.join(engine.budgets)}; "
              f"{engine.device.type} {str(engine.dtype).removeprefix('torch.')}, batch <= {max_batch})", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()


# ---------------------------------------------------------------------------------------------- a server process
_LAUNCHED: set[int] = set()  # ports launch() has given servers in this process


def launch(path: str | Path, *args: str, port: int | None = None, env: dict | None = None):
    """Start `python -m nestlm.cli serve PATH --port PORT *args` on 127.0.0.1 (a free port by default) in a
    subprocess, without waiting: -> (Popen, "http://127.0.0.1:PORT/v1"). For tests and benchmarks; pair with
    wait_ready and stop."""
    import socket
    import subprocess

    while port is None:  # a free port, but none handed out before: it stays free until its server binds
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1] if s.getsockname()[1] not in _LAUNCHED else None
    _LAUNCHED.add(port)
    proc = subprocess.Popen([sys.executable, "-m", "nestlm.cli", "serve", str(path), "--host", "127.0.0.1",
                             "--port", str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    return proc, f"http://127.0.0.1:{port}/v1"


def wait_ready(proc, url: str, timeout: float = 90.0) -> None:
    """Poll url's /health until THIS server (`proc`: its pid) answers; RuntimeError (with its output) if it
    exits first. Another process answering on the port (it took the port first) does not count."""
    import urllib.request

    base = url.removesuffix("/v1")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read().decode(errors='replace')}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if json.loads(r.read()).get("pid") == proc.pid:
                    return
        except (OSError, ValueError):
            pass
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
