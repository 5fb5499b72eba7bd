"""What the HTTP side hands the engine (Request) and what comes back through a request's `emit` callback
(Token, Prompt, Done, Failed), called on the decode thread (serve/engine.py); Running is a request inside
the engine's loop."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import InferConfig
from ..errors import GptossError
from ..infer.decode import DecodeState
from ..infer.logprobs import TokenLogprob


class QueueFull(GptossError):
    """The waiting queue is at --max-queue: the client should retry later."""


class EngineClosed(GptossError):
    """The server is shutting down and takes no new requests."""


@dataclass
class Token:
    text: str  # newly releasable text (may be empty: an unfinished character or a held-back stop prefix)
    token_id: int
    logprob: TokenLogprob | None = None  # when the request asked for logprobs


@dataclass
class Prompt:
    logprobs: list[TokenLogprob]  # of prompt tokens 1.. (the first has none): sent once it is prefilled (echo)


@dataclass
class Done:
    reason: str  # stop (EOS, a stop id or string) | length (max_tokens or the context)
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    text: str


@dataclass
class Failed:
    message: str
    shutdown: bool = False  # the server stopped before the request finished (not the request's fault)


Event = Token | Prompt | Done | Failed


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: InferConfig  # this request's settings: the run's infer defaults with the request's fields
    emit: Callable[[Event], None]
    stop_ids: frozenset[int] = frozenset()  # besides EOS: e.g. the chat format's end-of-turn ids
    logprobs: int | None = None  # a log-probability per sampled token with this many alternatives (None: off)
    echo: bool = False  # the prompt tokens' log-probabilities too (with `logprobs` alternatives each)
    generate: bool = True  # False: only score the prompt (echo with max_tokens 0)
    cancelled: bool = False  # set from the HTTP side when the client disconnects
    id: int = field(default_factory=itertools.count().__next__)

    def cancel(self) -> None:
        self.cancelled = True


class Running:
    """A request inside the engine's loop: its decode state, how much of its prompt is cached, the next token."""

    def __init__(self, request: Request, state: DecodeState):
        self.request, self.state = request, state
        self.prefilled = 0  # prompt tokens already in the cache
        self.last = 0  # the token the next decode step feeds, at position `pos`
        self.pos = len(request.prompt)
        self.prompt_logprobs: list[TokenLogprob] = []  # echo: prompt tokens 1.. scored so far
