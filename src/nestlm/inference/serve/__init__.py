"""`nestlm serve ELASTIC_DIR`: one elastic checkpoint behind an OpenAI-compatible API (FastAPI + uvicorn),
split as vLLM's server is: protocol (request/response models), engine (continuous-batching scheduler and
batched runner), app (routes and the server process).

One copy of the weights serves every budget: `/v1/models` lists each manifest budget ('full', '60%', ...), and
a request's `model` may name any budget the CLI accepts (a name, `0.6`, `60%`: nestlm.elastic.artifact.
resolve_budget). Endpoints: `/v1/models`, `/v1/completions` (prompts as text, token ids or lists of them;
`echo`, `logprobs`, `n`), `/v1/chat/completions` (the tokenizer's chat template; `logprobs`, `reasoning`),
streamed (SSE) or not; `/tokenize`, `/detokenize`, `/tokenizer_info` (lm-eval's remote tokenizer).

    curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{"model": "full",
         "prompt": "Q:3+5-9=?\\n<think>", "max_tokens": 8, "temperature": 0,
         "thinking_token_budget": 32, "think_model": "60%", "switch": "reprefill"}'

A request is a plain generation on `model` unless it asks for thinking (`thinking_token_budget`, vLLM's
name, alias `thinking_budget`, -1 unlimited; or `think_model`): then it is budget control: `think_model`
(default: `model`) thinks until the end-of-thinking tag or `thinking_token_budget` tokens (then the tag is
appended), and `answer_model` (default: `model`) writes at most `max_tokens` answer tokens after prompt +
trace + tag; `switch` is "reprefill" (exact) or "transplant" (the thinking model's cache moved over).
Chat responses put the trace in `message.reasoning` (and `reasoning_content`) and the answer in `content`.

Requests run in one continuously batched loop (engine.py). Fields nestlm does not implement are refused
(400 naming the field). Errors are OpenAI-style JSON: 400 (invalid), 401 (API key), 404 (unknown model or
path), 503 (queue full).
"""

from nestlm.inference.serve.app import create_app, launch, serve, stop, wait_ready
from nestlm.inference.serve.engine import Engine, Generation, Outcome
from nestlm.inference.serve.protocol import APIError, ChatRequest, CompletionRequest

__all__ = ["APIError", "ChatRequest", "CompletionRequest", "Engine", "Generation", "Outcome", "create_app",
           "launch", "serve", "stop", "wait_ready"]
