"""The request bodies of the OpenAI HTTP API that `gptoss serve` speaks, and its error object.

Unknown fields are rejected (400), as the OpenAI API does; fields the API has but this server does not
implement are accepted only at their neutral value (e.g. `best_of: null`, `presence_penalty: 0`), so a
client never silently gets something other than what it asked for. Log-probabilities are implemented:
completions' `logprobs` (0..5 alternatives) and `echo` (with `max_tokens` 0 to score a prompt only), chat's
`logprobs` and `top_logprobs` (0..20). Response bodies are plain dicts built
in app.py (their shapes follow the OpenAI API reference for completions and chat completions).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import SEED_MAX, SEED_MIN

MAX_STOP_CHARS = 256  # per stop string: the decode loop looks for every prefix of each after every token

# Fields the API defines that we accept only at the value that means "off".
_NEUTRAL = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "best_of": None,
    "logit_bias": None,
    "suffix": None,
    "tools": None,
    "tool_choice": None,
    "response_format": None,
    "parallel_tool_calls": None,
}


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """What both endpoints share: sampling, stopping, streaming. Numbers must be finite; the ranges the engine
    needs beyond these types (temperature, repetition_penalty) are config.InferConfig's, checked on admission."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # not in the OpenAI API; vLLM and others accept it
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None  # likewise
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None  # what torch.Generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _neutral(self):
        for name, off in _NEUTRAL.items():
            value = getattr(self, name, off)
            if value is not off and value not in (None, False, 0, {}, []):
                raise ValueError(f"{name} is not supported by this server (leave it unset)")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if len(stops) > 4:
            raise ValueError("stop takes at most 4 strings")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings may have at most {MAX_STOP_CHARS} characters")
        return stop

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0: score the prompt only (with echo)
    logprobs: Annotated[int, Field(strict=True, ge=0, le=5)] | None = None  # alternatives per token
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _scoring(self):
        if self.max_tokens == 0 and not self.echo:  # an ApiError passes through pydantic with its param
            raise ApiError(
                400,
                "max_tokens 0 generates nothing: it is only useful with echo (to score the prompt)",
                param="max_tokens",
            )
        return self

    @property
    def top(self) -> int | None:
        """Alternatives per token in the answer's logprobs (None: no logprobs)."""
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: the conversation format decides
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None
    logprobs: Annotated[bool, Field(strict=True)] | None = None
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return self

    @property
    def top(self) -> int | None:
        """Alternatives per token in the answer's logprobs (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def plain_messages(self) -> list[dict[str, Any]]:
        """Messages as dicts, content parts of type "text" joined into one string."""
        out = []
        for m in self.messages:
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in m.content):
                    raise ApiError(400, "only text content parts (with a string text) are supported", param="messages")
                d["content"] = "".join(part["text"] for part in m.content)
            out.append(d)
        return out
