"""Serving (nestlm.inference.serve) and the two-endpoint client (nestlm.inference.client), live: two
`nestlm serve` processes on 127.0.0.1, queried with the official `openai` client, checked against the
in-process generate_two_phase / generate tokens of the same checkpoint, seed and sampling fields."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch
from conftest import free_port
from test_budget import hybrid

import nestlm
from nestlm.arch import SubArch
from nestlm.data import ByteTokenizer
from nestlm.inference.generate import Sampling, generate, sample
from nestlm.inference.serve import launch, stop, wait_ready
from nestlm.inference.two_phase import generate_two_phase

openai = pytest.importorskip("openai")

PROMPT = "Q:1+2=?\n<think>"
# the contents joined by newlines, then '<think>' (or 'A:' with enable_thinking false)
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}"
                 "{% if enable_thinking is defined and not enable_thinking %}A:{% else %}<think>{% endif %}{% endif %}")
TOK = ByteTokenizer()


def write_ascii_elastic(path: Path) -> None:
    """A random hybrid as an elastic checkpoint (budgets full and 70%) whose head only favours printable
    ASCII (other rows zero, printable rows scaled up): greedy text round-trips through UTF-8, as the
    two-endpoint client's text prompts need."""
    from nestlm.elastic.artifact import export
    from nestlm.elastic.config import ElasticConfig
    from nestlm.elastic.router import Router

    model = hybrid("M*-M", seed=3, vocab=TOK.vocab_size)
    with torch.no_grad():
        w = model.lm_head.weight  # [v, d]
        keep = torch.zeros(w.shape[0], dtype=torch.bool)
        keep[32:127] = True
        w[~keep] = 0
        w[keep] *= 10
    ecfg = ElasticConfig(budgets=[1.0, 0.7], align=4, router_hidden=4, steps=1, sort=False,
                         choices={"hidden": [1.0, 0.75], "mamba_heads_per_group": [1.0, 0.5]})
    with warnings.catch_warnings():  # the untrained router's own choice may miss 70%: the manifest says so
        warnings.simplefilter("ignore")
        export(model, Router(model.cfg, ecfg), ecfg, path)
    TOK.save(path)


class Server:
    """`nestlm serve` in a subprocess on a free port of 127.0.0.1 (nestlm.inference.serve.launch)."""

    def __init__(self, path: Path, *args: str):
        self.proc, self.url = launch(path, "--threads", "1", *args)

    def wait(self) -> Server:
        wait_ready(self.proc, self.url, timeout=90)
        return self

    def stop(self) -> None:
        stop(self.proc)

    def client(self):
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(checkpoint path, in-process model, {budget: SubArch}, end tag, server A, server B). The end tag is
    a 2-character string the 70% budget writes greedily after PROMPT, at position >= 4 of its output, so
    both ways thinking ends (tag and budget) are reachable."""
    path = tmp_path_factory.mktemp("ascii_elastic")
    write_ascii_elastic(path)
    model, _, manifest = nestlm.load_elastic(path)
    subs = {k: SubArch.from_dict(v["sub"]) for k, v in manifest["budgets"].items()}
    ids = torch.tensor([TOK.encode(PROMPT, bos=True)])
    free = TOK.decode(generate(model, ids, 16, sub=subs["70%"])[0, ids.shape[1]:])
    tag = next(free[i:i + 2] for i in range(4, 14) if free.find(free[i:i + 2]) == i)
    templated = path.parent / (path.name + "_chat")  # server B: the same weights with a chat template
    shutil.copytree(path, templated)
    (templated / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    servers = [Server(path, "--end-think", tag), Server(templated, "--end-think", tag)]
    try:
        for s in servers:
            s.wait()
        yield path, model, subs, tag, servers[0], servers[1]
    finally:
        for s in servers:
            s.stop()


def reference(live, prompt: str, think: str | None, answer: str, budget: int, max_tokens: int,
              switch: str = "reprefill", **sampling):
    """The in-process tokens: generate_two_phase (think given) or generate, as the server should run them."""
    _, model, subs, tag, _, _ = live
    sampling = Sampling(**sampling)
    ids = torch.tensor([TOK.encode(prompt, bos=True)])  # [1, t]
    if think is None:
        out = generate(model, ids, max_tokens, subs[answer], sampling, stop_tokens=TOK.eos_id)
        return out[0, ids.shape[1]:].tolist(), None
    res = generate_two_phase(model, ids, subs[think], subs[answer], budget, max_tokens, TOK.encode(tag),
                             stop_tokens=TOK.eos_id, switch=switch, sampling=sampling)
    return res.tokens[0, ids.shape[1]:].tolist(), res


def stream_completion(client, **kw):
    """(text, token_ids, finish_reason, usage) from the streamed chunks."""
    text, ids, finish, usage = [], [], None, None
    for ch in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            text.append(c.text)
            ids += getattr(c, "token_ids", None) or []
            finish = c.finish_reason or finish
    return "".join(text), ids, finish, usage


# ---------------------------------------------------------------------------------------------- completions
def test_models_lists_every_budget(live):
    models = live[4].client().models.list()
    assert [m.id for m in models.data] == ["full", "70%"]  # largest first
    assert models.data[1].fraction == 0.7


@pytest.mark.parametrize("think, budget, switch, sampling", [
    ("70%", 3, "reprefill", {"temperature": 0.0}),  # S->L, thinking cut at the budget: the tag appended
    ("70%", 14, "transplant", {"temperature": 0.0}),  # S->L, S writes the tag itself
    ("full", 3, "reprefill", {"temperature": 0.9, "top_p": 0.8, "seed": 11}),  # L with a cap, sampled
    ("70%", 6, "reprefill", {"temperature": 1.0, "seed": 5}),
])
def test_completion_equals_generate_two_phase(live, think, budget, switch, sampling):
    client = live[4].client()
    want, res = reference(live, PROMPT, think, "full", budget, 7, switch=switch, **sampling)
    extra = {"thinking_token_budget": budget, "think_model": think, "switch": switch, "return_token_ids": True}
    r = client.completions.create(model="full", prompt=PROMPT, max_tokens=7, extra_body=extra, **sampling)
    c = r.choices[0]
    assert c.token_ids == want
    assert c.text == TOK.decode(want)  # trace + tag + answer
    assert r.usage.thinking_tokens == res.think_len and r.usage.forced_tokens == res.forced_len
    assert r.usage.answer_tokens == res.answer_len and r.usage.completion_tokens == len(want)
    assert r.usage.completion_tokens_details.reasoning_tokens == res.think_len + res.forced_len
    assert r.usage.prompt_tokens == len(TOK.encode(PROMPT)) + 1  # + BOS
    assert r.nestlm["ended_by"] == res.ended_by and r.nestlm["switch"] == res.switch
    assert c.finish_reason == "length"
    # streamed: the same text, tokens, finish reason and usage
    text, ids, finish, usage = stream_completion(client, model="full", prompt=PROMPT, max_tokens=7,
                                                 extra_body=extra, **sampling)
    assert (text, ids, finish) == (c.text, c.token_ids, c.finish_reason)
    assert usage.model_dump() == r.usage.model_dump()


def test_both_endings_of_thinking_are_covered(live):
    _, cut = reference(live, PROMPT, "70%", "full", 3, 2)
    _, tag = reference(live, PROMPT, "70%", "full", 14, 2)
    assert cut.ended_by == "budget" and tag.ended_by == "tag"


def test_plain_completion_and_stop_strings(live):
    client = live[4].client()
    want, _ = reference(live, PROMPT, None, "70%", 0, 12)
    r = client.completions.create(model="70%", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == want and r.choices[0].text == TOK.decode(want)
    assert r.usage.completion_tokens_details.reasoning_tokens == 0 and r.nestlm["think_model"] is None
    full = TOK.decode(want)
    stop = full[6:8]
    cut = full.index(stop)  # the first occurrence ends the answer, the stop string left out
    r = client.completions.create(model="70%", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "@@@"],
                                  extra_body={"return_token_ids": True})
    c = r.choices[0]
    assert (c.text, c.finish_reason, c.stop_reason) == (full[:cut], "stop", stop)
    assert c.token_ids == want[: cut + len(stop)]  # generation ended at the token that completed it
    text, _, finish, _ = stream_completion(client, model="70%", prompt=PROMPT, max_tokens=12, temperature=0,
                                           stop=[stop, "@@@"])
    assert (text, finish) == (c.text, "stop")  # the held-back start of the stop string never leaks
    # token ids as the prompt: the same continuation
    ids = TOK.encode(PROMPT, bos=True)
    r2 = client.completions.create(model="70%", prompt=ids, max_tokens=12, temperature=0)
    assert r2.choices[0].text == full


def test_chat_with_reasoning_streams_like_it_answers(live):
    client = live[4].client()
    msgs = [{"role": "system", "content": "Q:1+2=?"}, {"role": "user", "content": "<think>"}]
    # no chat template in this folder: BOS + the contents joined by newlines, i.e. PROMPT
    want, res = reference(live, PROMPT, "70%", "full", 14, 5, switch="transplant")
    extra = {"thinking_token_budget": 14, "think_model": "70%", "switch": "transplant"}
    r = client.chat.completions.create(model="full", messages=msgs, max_tokens=5, temperature=0, extra_body=extra)
    m = r.choices[0].message
    tag = live[3]
    assert m.reasoning_content + tag == TOK.decode(res.think_ids) and res.ended_by == "tag"
    assert m.content == TOK.decode(res.answer_ids) and r.usage.answer_tokens == res.answer_len
    reasoning, content, finish = "", "", None
    for ch in client.chat.completions.create(model="full", messages=msgs, max_tokens=5, temperature=0,
                                             extra_body=extra, stream=True):
        for c in ch.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert (reasoning, content, finish) == (m.reasoning_content, m.content, r.choices[0].finish_reason)


def test_concurrent_requests_are_queued_and_each_gets_its_own_answer(live):
    client = live[4].client()
    prompts = [f"Q:{i}+{i}=?\n<think>" for i in range(4)]
    got: dict[int, list[int]] = {}

    def ask(i):
        r = client.completions.create(model="full", prompt=prompts[i], max_tokens=4, temperature=0,
                                      extra_body={"thinking_token_budget": 3, "think_model": "70%",
                                                  "return_token_ids": True})
        got[i] = r.choices[0].token_ids

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, p in enumerate(prompts):
        assert got[i] == reference(live, p, "70%", "full", 3, 4)[0]


# ---------------------------------------------------------------------------------------------- errors
def post(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors_and_the_server_goes_on(live):
    server = live[4]
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="33%", prompt="x", max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="full", prompt="x", max_tokens=2, extra_body={"think_model": "10%"})
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="full", prompt="x", max_tokens=2, extra_body={"thinking_token_budget": -2})
    assert e.value.body["param"] == "thinking_token_budget"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="full", prompt="x", max_tokens=-3)
    with pytest.raises(openai.BadRequestError) as e:  # 5,000 prompt tokens > the 4,096 default context
        client.completions.create(model="full", prompt="x" * 5000, max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # the thinking budget counts toward the context
        client.completions.create(model="full", prompt="x", max_tokens=2, extra_body={"thinking_token_budget": 5000})
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="full", messages=[], max_tokens=2)
    status, body = post(server.url + "/completions", b'{"model": "full", "prompt": ')
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]
    status, body = post(server.url + "/completions", b'{"model": "full", "prompt": "x", "switch": "magic"}')
    assert status == 400 and body["error"]["param"] == "switch"
    status, body = post(server.url + "/nowhere", b"{}")
    assert status == 404 and "error" in body
    # still serving, and still exact
    r = client.completions.create(model="70%", prompt=PROMPT, max_tokens=3, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == reference(live, PROMPT, None, "70%", 0, 3)[0]


# ---------------------------------------------------------------------------------------------- the client
@pytest.mark.parametrize("budget", [3, 14])
def test_client_thinks_on_one_server_and_answers_on_another(live, budget):
    from nestlm.inference.client import Endpoint, think_answer

    _, _, _, tag, a, b = live
    want, res = reference(live, PROMPT, "70%", "full", budget, 6)
    seen = []
    got = think_answer(Endpoint(a.url, "70%"), Endpoint(b.url, "full"), PROMPT, max_think=budget, max_answer=6,
                       end_think=tag, on_text=lambda d, phase: seen.append((d, phase)))
    assert got.ended_by == res.ended_by
    assert got.text == PROMPT + TOK.decode(want)  # the same tokens as one in-process generate_two_phase
    assert got.answer == TOK.decode(res.answer_ids)
    assert got.answer_tokens == res.answer_len
    assert seen[0] == (PROMPT, "prompt") and "".join(d for d, _ in seen) == got.text  # the prompt, then the rest
    assert [p for _, p in seen if p not in ("prompt", "think")][0] == "end"


def test_cli_think_and_its_errors(live, capsys):
    from nestlm.cli import main

    _, _, _, tag, a, b = live
    want, _ = reference(live, PROMPT, "70%", "full", 3, 4)
    assert main(["think", "--prompt", PROMPT, "--think-url", a.url, "--think-model", "70%", "--answer-url",
                 b.url, "--answer-model", "full", "--max-think", "3", "--max-answer", "4", "--end-think", tag]) == 0
    out, err = capsys.readouterr()
    assert out.rstrip("\n") == PROMPT + TOK.decode(want) and "ended by budget" in err  # the prompt first
    with pytest.raises(SystemExit) as e:  # unknown model on a live server: its error message, exit 2
        main(["think", "--prompt", "x", "--think-url", a.url, "--think-model", "9%", "--answer-url", b.url,
              "--answer-model", "full", "--max-think", "2"])
    assert e.value.code == 2 and "9%" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # nothing listens there
        main(["think", "--prompt", "x", "--think-url", f"http://127.0.0.1:{free_port()}/v1", "--think-model", "s",
              "--answer-url", b.url, "--answer-model", "full", "--timeout", "5"])
    assert e.value.code == 2 and "refused" in capsys.readouterr().err.lower()


def test_cli_serve_refuses_a_folder_that_is_not_elastic(tmp_path, capsys):
    from nestlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path), "--port", str(free_port())])
    assert e.value.code == 2 and "not an elastic checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- top_p
def test_top_p_samples_only_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    got = {int(sample(logits, Sampling(1.0, top_p=0.7), gen)) for _ in range(200)}
    assert got == {1, 3}  # 0.5 + 0.3 reaches 0.7; 0.5 alone does not
    assert {int(sample(logits, Sampling(1.0, top_p=0.5), gen)) for _ in range(50)} == {1}
    a = sample(logits.repeat(64, 1), Sampling(1.0), torch.Generator().manual_seed(1))
    b = sample(logits.repeat(64, 1), Sampling(1.0, top_p=1.0), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # top_p 1: no change


# ---------------------------------------------------------------------------------------------- issue 28
def logprobs_of(live, ids: list[int], budget: str) -> torch.Tensor:
    """The in-process model's log-probabilities after each position of `ids`: [t, v]."""
    _, model, subs, _, _, _ = live
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]), sub=subs[budget])[0].float(), -1)


def test_completion_prompt_forms_and_n(live):
    """A string, a list of strings, token ids, a list of lists: one choice per prompt (x n), each the same
    as that prompt alone; sampled choice j uses seed + j."""
    client = live[4].client()
    prompts = [PROMPT, "Q:2+2=?\n<think>"]
    want = [reference(live, p, None, "70%", 0, 5)[0] for p in prompts]
    ids = [TOK.encode(p, bos=True) for p in prompts]
    for prompt in (prompts, ids):
        r = client.completions.create(model="70%", prompt=prompt, max_tokens=5, temperature=0,
                                      extra_body={"return_token_ids": True})
        assert [c.index for c in r.choices] == [0, 1]
        assert [c.token_ids for c in r.choices] == want
        assert r.usage.prompt_tokens == sum(len(x) for x in ids)
    r = client.completions.create(model="70%", prompt=ids[0], max_tokens=5, temperature=0)
    assert r.choices[0].text == TOK.decode(want[0])
    r = client.completions.create(model="full", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7, n=3,
                                  extra_body={"return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for j, c in enumerate(r.choices):
        assert c.token_ids == reference(live, PROMPT, None, "full", 0, 6, temperature=1.0, seed=7 + j)[0]
    assert len({tuple(c.token_ids) for c in r.choices}) > 1


@pytest.mark.parametrize("max_tokens", [0, 1, 3])
def test_echo_with_logprobs_is_the_legacy_format(live, max_tokens):
    """lm-eval's loglikelihood request: token ids, echo, logprobs 1, max_tokens 1 (and 0, and more)."""
    client = live[4].client()
    ids = TOK.encode(PROMPT, bos=True)
    r = client.completions.create(model="70%", prompt=ids, max_tokens=max_tokens, temperature=0, echo=True,
                                  logprobs=2, extra_body={"return_token_ids": True})
    c = r.choices[0]
    gen = c.token_ids
    assert len(gen) == max_tokens
    full = ids + gen
    ref = logprobs_of(live, full, "70%")  # [t, v]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(full)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [float(ref[i - 1, full[i]]) for i in range(1, len(full))]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), torch.tensor(want), atol=1e-4, rtol=1e-4)
    for i in range(1, len(full)):
        top = torch.topk(ref[i - 1], 2)
        d = lp.top_logprobs[i]
        assert set(d) >= {chr(int(t)) for t in top.indices if int(t) < 128}
        assert max(d.values()) == pytest.approx(float(top.values[0]), abs=1e-4)
        assert lp.tokens[i] in d
    text = TOK.decode(full)
    assert c.text == text  # the prompt (BOS has no text) + the completion
    assert lp.tokens[0] == "<bos>" and lp.text_offset[:2] == [0, 0]
    assert all(text[o] == t for o, t in zip(lp.text_offset[1:], lp.tokens[1:], strict=True))
    # greedy: every generated token is its position's most likely one
    assert all(lp.token_logprobs[i] == max(lp.top_logprobs[i].values()) for i in range(len(ids), len(full)))


def test_logprobs_without_echo_and_streamed(live):
    client = live[4].client()
    want, _ = reference(live, PROMPT, None, "full", 0, 6)
    r = client.completions.create(model="full", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0)
    lp = r.choices[0].logprobs
    ids = TOK.encode(PROMPT, bos=True)
    ref = logprobs_of(live, ids + want, "full")
    assert lp.tokens == [chr(t) for t in want] and lp.text_offset == list(range(6))
    torch.testing.assert_close(torch.tensor(lp.token_logprobs),
                               torch.tensor([float(ref[len(ids) - 1 + i, t]) for i, t in enumerate(want)]),
                               atol=1e-4, rtol=1e-4)
    got, offsets = [], []
    for ch in client.completions.create(model="full", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                        stream=True):
        for c in ch.choices:
            if c.logprobs is not None:
                got += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert got == lp.token_logprobs and offsets == lp.text_offset


def test_chat_fields(live):
    """logprobs / top_logprobs, n, max_completion_tokens, reasoning (+ reasoning_content), include_reasoning,
    chat_template_kwargs, thinking_budget (the alias) and -1 (unlimited)."""
    b = live[5]
    client = b.client()
    msgs = [{"role": "user", "content": "Q:1+2=?"}]
    # the template writes 'Q:1+2=?\n<think>' (no BOS), or 'Q:1+2=?\nA:' without thinking
    tokens = post(b.url.removesuffix("/v1") + "/tokenize", json.dumps({"messages": msgs}).encode())[1]["tokens"]
    assert tokens == TOK.encode("Q:1+2=?\n<think>")
    off = post(b.url.removesuffix("/v1") + "/tokenize", json.dumps(
        {"messages": msgs, "chat_template_kwargs": {"enable_thinking": False}}).encode())[1]["tokens"]
    assert off == TOK.encode("Q:1+2=?\nA:")
    _, model, subs, tag, _, _ = live
    plain = generate(model, torch.tensor([off]), 5, subs["full"], stop_tokens=TOK.eos_id)[0, len(off):].tolist()
    r = client.chat.completions.create(model="full", messages=msgs, max_completion_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3, n=2,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert len(r.choices) == 2 and r.usage.completion_tokens == 10
    for c in r.choices:
        assert c.message.content == TOK.decode(plain)
        assert getattr(c.message, "reasoning", None) is None
        ref = logprobs_of(live, off + plain, "full")
        assert [e.token for e in c.logprobs.content] == [chr(t) for t in plain]
        for i, e in enumerate(c.logprobs.content):
            assert e.logprob == pytest.approx(float(ref[len(off) - 1 + i, plain[i]]), abs=1e-4)
            assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)
            assert e.bytes == list(e.token.encode())
    # thinking: the trace in reasoning and reasoning_content; the alias; -1 unlimited (the 70% writes the tag)
    ids = torch.tensor([tokens])
    res = generate_two_phase(model, ids, subs["70%"], subs["full"], 14, 4, TOK.encode(tag), stop_tokens=TOK.eos_id)
    assert res.ended_by == "tag"
    for extra in ({"thinking_budget": 14}, {"thinking_token_budget": -1}):
        r = client.chat.completions.create(model="full", messages=msgs, max_completion_tokens=4, temperature=0,
                                           extra_body={"think_model": "70%", **extra})
        m = r.choices[0].message
        assert m.reasoning == m.reasoning_content == TOK.decode(res.think_ids)[: -len(tag)]
        assert m.content == TOK.decode(res.answer_ids) and r.nestlm["ended_by"] == "tag"
    r = client.chat.completions.create(model="full", messages=msgs, max_completion_tokens=4, temperature=0,
                                       extra_body={"think_model": "70%", "thinking_budget": 14,
                                                   "include_reasoning": False})
    m = r.choices[0].message
    assert getattr(m, "reasoning", None) is None and getattr(m, "reasoning_content", None) is None
    assert m.content == TOK.decode(res.answer_ids)
    # the alias and the name give the same cut
    a = client.completions.create(model="full", prompt=PROMPT, max_tokens=3, temperature=0,
                                  extra_body={"think_model": "70%", "thinking_budget": 3, "return_token_ids": True})
    assert a.choices[0].token_ids == reference(live, PROMPT, "70%", "full", 3, 3)[0]


@pytest.mark.parametrize("endpoint, field, value", [
    ("completions", "frequency_penalty", 0.5), ("completions", "presence_penalty", 1.0),
    ("completions", "logit_bias", {"65": 5}), ("completions", "suffix", "x"), ("completions", "best_of", 2),
    ("completions", "tools", []), ("chat", "response_format", {"type": "json_object"}),
    ("chat", "tools", [{"type": "function", "function": {"name": "f"}}]), ("chat", "reasoning_effort", "low"),
    ("chat", "frequency_penalty", 0.1),
])
def test_unimplemented_fields_are_refused_by_name(live, endpoint, field, value):
    client = live[4].client()
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "completions":
            client.completions.create(model="full", prompt="x", max_tokens=1, extra_body={field: value})
        else:
            client.chat.completions.create(model="full", messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                           extra_body={field: value})
    assert e.value.body["param"] == field and field in e.value.body["message"]


def test_every_budget_spelling_is_a_model_id(live):
    client = live[4].client()
    want, _ = reference(live, PROMPT, None, "70%", 0, 4)
    for name in ("70%", "0.7", " 70% "):
        r = client.completions.create(model=name, prompt=PROMPT, max_tokens=4, temperature=0,
                                      extra_body={"return_token_ids": True})
        assert r.choices[0].token_ids == want and r.model == name
    full, _ = reference(live, PROMPT, None, "full", 0, 4)
    for name in ("1.0", "100%", "FULL"):
        r = client.completions.create(model=name, prompt=PROMPT, max_tokens=4, temperature=0,
                                      extra_body={"return_token_ids": True})
        assert r.choices[0].token_ids == full
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="0.1", prompt=PROMPT, max_tokens=1)


def test_tokenizer_routes(live):
    base = live[4].url.removesuffix("/v1")
    with urllib.request.urlopen(base + "/tokenizer_info", timeout=10) as r:
        info = json.loads(r.read())
    assert (info["eos_token"], info["bos_token"]) == ("<eos>", "<bos>")
    status, body = post(base + "/tokenize", json.dumps({"prompt": "ab<eos>", "add_special_tokens": False}).encode())
    assert status == 200 and body["tokens"] == [97, 98, TOK.eos_id] and body["count"] == 3
    status, body = post(base + "/tokenize", json.dumps({"prompt": "ab"}).encode())
    assert body["tokens"] == [TOK.bos_id, 97, 98]
    text = "Q: é <eos>"
    ids = post(base + "/tokenize", json.dumps({"prompt": text, "add_special_tokens": False}).encode())[1]["tokens"]
    assert post(base + "/detokenize", json.dumps({"tokens": ids}).encode())[1]["prompt"] == text
    status, body = post(base + "/detokenize", json.dumps({"tokens": [999]}).encode())
    assert status == 400


def test_echo_holds_back_an_incomplete_character(live):
    client = live[4].client()
    r = client.completions.create(model="full", prompt=[65, 0xE2, 0x82], max_tokens=0, echo=True)
    assert r.choices[0].text == "A"


def test_concurrent_requests_batch_and_equal_the_same_requests_alone(live):
    """Plain requests on two budgets and S->L requests, sent together: the engine runs them in shared steps
    (peak_batch > 1), and every answer equals the same request alone (in-process reference)."""
    client = live[4].client()
    jobs = [(f"Q:{i}+1=?\n<think>", None if i % 3 else "70%", "full" if i % 2 else "70%") for i in range(8)]
    got: dict[int, tuple] = {}

    def ask(i):
        prompt, think, answer = jobs[i]
        extra = {"return_token_ids": True}
        if think:
            extra |= {"thinking_token_budget": 5, "think_model": think}
        r = client.completions.create(model=answer, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra)
        got[i] = (r.choices[0].token_ids, r.nestlm["peak_batch"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, (prompt, think, answer) in enumerate(jobs):
        assert got[i][0] == reference(live, prompt, think, answer, 5, 12)[0]
    assert max(p for _, p in got.values()) > 1


# ---------------------------------------------------------------------------------------------- the process
def test_api_key_from_the_flag_or_the_environment(live):
    path = live[0]
    s = Server(path, "--api-key", "sekrit").wait()
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client().models.list()
        ok = openai.OpenAI(base_url=s.url, api_key="sekrit", max_retries=0, timeout=60)
        assert [m.id for m in ok.models.list().data] == ["full", "70%"]
        status, _ = post(s.url.removesuffix("/v1") + "/tokenize", b'{"prompt": "a"}')
        assert status == 401
    finally:
        s.stop()
    proc, url = launch(path, "--threads", "1", env={"NESTLM_API_KEY": "envkey"})
    try:
        wait_ready(proc, url)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=url, api_key="envkey", max_retries=0).models.list().data
    finally:
        stop(proc)


def test_open_host_without_a_key_warns(live):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nestlm.cli", "serve", str(live[0]), "--host", "0.0.0.0",
                             "--port", str(port), "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("nestlm: warning: serving on 0.0.0.0 without an API key")
        assert proc.stdout.readline().startswith("nestlm serve:")
    finally:
        stop(proc)


def test_a_busy_port_fails_with_one_line_before_the_banner(live):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "nestlm.cli", "serve", str(live[0]), "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr


def test_wait_ready_waits_for_its_own_server_not_another_on_the_port(live):
    """Two servers given one port: the one that did not get it exits, and wait_ready says so instead of
    taking the other server's /health for its own (a flaky cause of requests reaching the wrong server)."""
    port = int(live[4].url.removesuffix("/v1").rsplit(":", 1)[1])  # server A's, live
    proc, url = launch(live[0], "--threads", "1", port=port)
    try:
        with pytest.raises(RuntimeError, match="cannot listen"):
            wait_ready(proc, url, timeout=60)
    finally:
        stop(proc)


@pytest.mark.parametrize("argv, flag", [(["--max-queue", "-1"], "--max-queue"), (["--max-batch", "0"], "--max-batch"),
                                        (["--device", "nowhere"], "nowhere")])
def test_serve_flags_are_checked(tmp_path, capsys, argv, flag):
    from nestlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path), "--port", str(free_port()), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err and err.count("\n") == 1


def test_search_params_nan_is_refused(tmp_path, capsys):
    from nestlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["search", str(tmp_path), "--params", "nan"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "target must be > 0 and finite (got params nan)" in err and err.count("\n") == 1


def test_streamed_choices_and_echo_equal_the_response(live):
    client = live[4].client()
    kw = dict(model="full", prompt=[PROMPT, "Q:5+5=?\n<think>"], max_tokens=6, temperature=0.8, seed=3, n=2,
              echo=True, extra_body={"thinking_token_budget": 3, "think_model": "70%"})
    r = client.completions.create(**kw)
    texts, finish = {}, {}
    for ch in client.completions.create(stream=True, **kw):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert len(r.choices) == 4 and r.choices[2].text.startswith("Q:5+5=?\n<think>")
    assert texts == {c.index: c.text for c in r.choices}
    assert finish == {c.index: c.finish_reason for c in r.choices}


def test_engine_in_bf16_equals_generate_on_the_same_weights(live):
    """--dtype bf16 (the CUDA default; it runs on the CPU too): the weights are held in bf16 and a greedy
    request equals nestlm.inference.generate on that bf16 model."""
    from nestlm.inference.serve import Engine, Generation

    e = Engine(live[0], dtype="bf16", device="cpu", end_think=live[3])
    assert e.elastic.embeddings.weight.dtype == torch.bfloat16
    e.start()
    try:
        got, done = {}, threading.Event()

        def sink(i, kind, item):
            if kind in ("done", "error"):
                got[i] = item
                done.set()

        ids = TOK.encode(PROMPT, bos=True)
        e.submit([Generation(ids=ids, answer_sub=e.budget("70%"), think_sub=None, max_think=0, max_tokens=8)], sink)
        assert done.wait(60)
        want = generate(e.model, torch.tensor([ids]), 8, e.budget("70%"), stop_tokens=TOK.eos_id)[0, len(ids):]
        assert got[0].token_ids == want.tolist()
    finally:
        e.stop()
