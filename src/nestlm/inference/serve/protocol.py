"""`nestlm serve`'s wire format: the request models (what a request may say), the errors, and the logprob
formats. Every field a request may send is declared here; any other field is refused with a 400 that names it
(a silently ignored field is a wrong answer). Shared by the routes (app.py) and the engine (engine.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

__all__ = ["APIError", "ChatRequest", "CompletionRequest", "DetokenizeRequest", "TokenizeRequest"]

MAX_LOGPROBS = 20  # OpenAI's limit on top logprobs per token
MAX_N = 16  # choices per prompt


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, param, code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    """The fields both endpoints share: OpenAI's sampling fields, vLLM's `thinking_token_budget`, and
    nestlm's nested switch. Unknown fields are refused (extra='forbid')."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 is off
    repetition_penalty: float | None = Field(None, gt=0.0)  # transformers' rule; 1.0 is off
    frequency_penalty: float | None = 0.0  # accepted only as 0 (off): nestlm does not implement them
    presence_penalty: float | None = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None  # choice i samples with seed + i
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = None  # an end-user id: recorded nowhere, changes nothing
    thinking_token_budget: int | None = Field(
        None, ge=-1, validation_alias=AliasChoices("thinking_token_budget", "thinking_budget"))  # -1: unlimited
    think_model: str | None = None  # nestlm: the budget that thinks (default: model)
    answer_model: str | None = None  # nestlm: the budget that answers (default: model)
    switch: Literal["reprefill", "transplant"] = "reprefill"
    return_token_ids: bool = False  # vLLM's name: the generated token ids in each choice

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _off(cls, v):
        if v not in (None, 0, 0.0):
            raise ValueError("is not supported by nestlm serve (only 0)")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v):
        extra = set(v or {}) - {"include_usage", "continuous_usage_stats"}
        if extra:
            raise ValueError(f"unsupported key(s) {sorted(extra)} (nestlm serve supports include_usage)")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    add_special_tokens: bool = True  # start a text prompt with the tokenizer's BOS
    echo: bool = False  # the prompt before the completion (and its logprobs with `logprobs`)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top logprobs per token (legacy format)


class ChatRequest(_Request):
    messages: list[dict] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    include_reasoning: bool = True  # vLLM: the trace in message.reasoning (and reasoning_content)
    chat_template_kwargs: dict | None = None  # passed to the chat template (e.g. enable_thinking)
    add_generation_prompt: bool = True


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a text `prompt` (or chat `messages`) -> token ids."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]
