"""Budget control across two OpenAI-compatible endpoints: think on a small model, answer on a large one.

The same control as nestlm.inference.two_phase.generate_two_phase, but the two models may be any servers that speak
`/v1/completions` (two vLLM servers of a 23B and a 30B slice, two budgets of one `nestlm serve`, ...):

    from nestlm.inference.client import Endpoint, think_answer
    res = think_answer(Endpoint("http://127.0.0.1:8000/v1", "60%"), Endpoint("http://127.0.0.1:8001/v1", "full"),
                       "Q:3+5-9=?\\n<think>", max_think=64, max_answer=8)
    res.trace, res.ended_by, res.answer, res.think_s, res.answer_s

1. The thinking model streams a completion of the prompt with `max_tokens = max_think` and `stop = [end_think]`:
   it ends at the tag ("tag"), at the budget ("budget", finish_reason "length"), or at its end-of-sequence
   token ("stop": no answer, as in generate_two_phase).
2. The answer model continues prompt + trace + end_think through `/v1/completions` (a plain text prompt:
   the server tokenizes it as it tokenizes any prompt, BOS included where its tokenizer adds one). When the
   budget ran out while the thinking model was writing the tag ('4</th'), those characters are dropped from
   the trace and the tag is written once, whole (nestlm.inference.two_phase.rest_of_tag, the same rule).

Greedy decoding gives the tokens generate_two_phase(..., switch="reprefill") gives in process, as long as
the trace's text tokenizes back to the tokens it came from. With sampling, each phase is seeded on its own
(`seed`, then `seed + 1`), so the tokens differ from one in-process run that shares one generator.

Plain HTTP from the standard library (urllib; server-sent events parsed by hand): no client dependency.
Every request is bounded by `timeout` seconds.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from nestlm.inference.detok import HeldText, held_suffix

__all__ = ["Endpoint", "EndpointError", "RemoteResult", "complete", "think_answer"]


@dataclass(frozen=True)
class Endpoint:
    url: str  # the API base, e.g. http://127.0.0.1:8000/v1
    model: str  # the model id on that server
    api_key: str | None = None  # sent as a Bearer token when given


class EndpointError(Exception):
    """An endpoint that could not be reached, answered an HTTP error, or sent an error event."""


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    stop_reason: object  # vLLM's field: the stop string or token that ended it; "absent" when not sent
    usage: dict | None
    seconds: float


@dataclass
class RemoteResult:
    prompt: str
    trace: str  # what the thinking model wrote, without the end tag
    ended_by: str  # "tag" | "budget" | "stop"
    answer: str
    end_think: str
    think: Completion
    reply: Completion | None  # None when thinking ended at the end of sequence

    @property
    def text(self) -> str:
        """prompt + trace + tag + answer: what the answer model continued and what it wrote."""
        if self.reply is None:
            return self.prompt + self.trace
        return self.prompt + self.trace + self.end_think + self.answer

    @property
    def think_tokens(self) -> int | None:
        return (self.think.usage or {}).get("completion_tokens")

    @property
    def answer_tokens(self) -> int | None:
        return None if self.reply is None else (self.reply.usage or {}).get("completion_tokens")

    @property
    def think_s(self) -> float:
        return self.think.seconds

    @property
    def answer_s(self) -> float:
        return 0.0 if self.reply is None else self.reply.seconds

    @property
    def total_s(self) -> float:
        return self.think_s + self.answer_s


# ---------------------------------------------------------------------------------------------- HTTP
def _events(ep: Endpoint, path: str, body: dict, timeout: float) -> Iterator[dict]:
    """POST body to ep.url + path with stream=True and yield the JSON of each server-sent event."""
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if ep.api_key:
        headers["Authorization"] = f"Bearer {ep.api_key}"
    req = urllib.request.Request(ep.url.rstrip("/") + path, data=json.dumps(body).encode(), headers=headers,
                                 method="POST")
    t0 = time.monotonic()
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise EndpointError(f"{ep.url}: HTTP {e.code}: {_message(e.read())}") from None
    except (urllib.error.URLError, OSError) as e:
        raise EndpointError(f"{ep.url}: {getattr(e, 'reason', e)}") from None
    with resp:
        for raw in resp:
            if time.monotonic() - t0 > timeout:
                raise EndpointError(f"{ep.url}: no complete answer within {timeout} s")
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise EndpointError(f"{ep.url}: {_message(json.dumps(event).encode())}")
            yield event


def _message(raw: bytes) -> str:
    try:
        err = json.loads(raw)
        return err["error"]["message"] if isinstance(err.get("error"), dict) else str(err.get("error", err))
    except (ValueError, KeyError, AttributeError):
        return raw.decode("utf-8", errors="replace")[:200]


def complete(ep: Endpoint, prompt: str, max_tokens: int, stop: list[str] | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, timeout: float = 120.0,
             on_text: Callable[[str], None] | None = None, extra: dict | None = None) -> Completion:
    """One streamed `/v1/completions` request; `on_text(delta)` sees the text as it arrives."""
    body = {"model": ep.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    if stop:
        body["stop"] = stop
    if seed is not None:
        body["seed"] = seed
    t0 = time.perf_counter()
    parts, finish, stop_reason, usage = [], None, "absent", None
    for ev in _events(ep, "/completions", body, timeout):
        if ev.get("usage"):
            usage = ev["usage"]
        for c in ev.get("choices") or []:
            if c.get("text"):
                parts.append(c["text"])
                if on_text is not None:
                    on_text(c["text"])
            if c.get("finish_reason"):
                finish = c["finish_reason"]
                stop_reason = c.get("stop_reason", "absent")
    return Completion("".join(parts), finish, stop_reason, usage, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- control
def think_answer(think: Endpoint, answer: Endpoint, prompt: str, max_think: int = 256, max_answer: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 end_think: str = "</think>", stop: list[str] | None = None, timeout: float = 120.0,
                 on_text: Callable[[str, str], None] | None = None) -> RemoteResult:
    """Think on `think` until `end_think` or `max_think` tokens, then answer on `answer` (at most
    `max_answer` tokens, ending at `stop` strings). `on_text(delta, phase)` streams "prompt" (the prompt,
    once), "think" | "end" | "answer": exactly the text the answer model reads, then its answer. The trace
    shown is the one sent on: a tag the budget cut ('</thin') is never shown before the whole tag, and U+FFFD
    (a character a server cut in two at the budget) is left out of both."""
    if max_think < 0 or max_answer < 0:
        raise ValueError("max_think and max_answer must be >= 0")
    if not end_think:
        raise ValueError("end_think must not be empty")
    held = HeldText([end_think])  # the trace as shown: held back while it may be the start of the tag
    shown = None if on_text is None else (lambda d: (s := held.push(d)) and on_text(s, "think"))
    if on_text is not None:
        on_text(prompt, "prompt")
    if max_think > 0:
        th = complete(think, prompt, max_think, [end_think], temperature, top_p, seed, timeout, shown)
    else:  # no thinking: straight to the tag, as generate_two_phase with a zero budget
        th = Completion("", "length", None, {"completion_tokens": 0}, 0.0)
    trace = th.text.replace("\ufffd", "")
    if th.finish_reason == "length":
        ended_by = "budget"
    elif th.stop_reason in (end_think, "absent") or trace.endswith(end_think):
        ended_by = "tag"  # servers that don't say why they stopped: the only stop string asked for
    else:
        ended_by = "stop"  # the end-of-sequence token (vLLM: stop_reason None or the token id)
    trace = trace.removesuffix(end_think)  # servers that keep the stop string in the text
    if ended_by == "budget":  # a tag the budget cut mid-way ('4</th'): the appended tag completes it
        trace = trace[: len(trace) - held_suffix(trace, [end_think])]
    if on_text is not None and (rest := held.rest(trace)):
        on_text(rest, "think")
    if ended_by == "stop":
        return RemoteResult(prompt, trace, ended_by, "", end_think, th, None)
    if on_text is not None:
        on_text(end_think, "end")
    clean = None if on_text is None else (lambda d: (s := d.replace("\ufffd", "")) and on_text(s, "answer"))
    reply = complete(answer, prompt + trace + end_think, max_answer, stop, temperature, top_p,
                     None if seed is None else seed + 1, timeout, clean)
    return RemoteResult(prompt, trace, ended_by, reply.text.replace("\ufffd", ""), end_think, th, reply)
