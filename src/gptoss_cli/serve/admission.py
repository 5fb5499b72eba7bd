"""What a request must pass before it is admitted to the engine: its body, its model, its prompts and settings.

Every field is checked against what the engine really takes (a seed torch.Generator accepts, finite numbers,
token ids inside the vocabulary, a prompt that leaves room in the context) here, on the HTTP side, so a bad
request is answered 400 and never reaches the decode step that all requests share.

Prompts are tokenized on a small thread pool, never on the event loop, with `encode_batch`, which releases
the GIL while it encodes (`encode` holds it, which would stall the loop just the same): /health and every
other client keep being answered while a long prompt is encoded.
Before that, a prompt that cannot fit is refused without being tokenized at all: with a byte-level BPE
tokenizer (no normalizer, no added token that swallows its neighbours' whitespace) every token stands for at
most `max_token_bytes` bytes of the text, so a text of B bytes has at least ceil(B / max_token_bytes) tokens.
"""

from __future__ import annotations

import asyncio
import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request as HttpRequest

from ..config import ConfigError, InferConfig, seed64
from ..data.chat_format import MessageError, TemplateFormat
from .protocol import ApiError


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


async def parse_body(request: HttpRequest, model: type[BaseModel]) -> Any:
    """The body as `model`; any problem is a 400 naming the field. (Its size was bounded by BodyLimit.)"""
    raw = await request.body()
    try:  # Python's json accepts NaN and Infinity, which are not JSON and no sampling setting can take
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            message = f"unknown field {param!r}"
        else:
            message = f"{param}: {first['msg']}" if param else first["msg"].removeprefix("Value error, ")
        raise ApiError(400, message, param=param, code=first["type"]) from None


def check_model(name: str, served_name: str) -> None:
    if name != served_name:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server holds {served_name!r}",
            param="model",
            code="model_not_found",
        )


def max_token_bytes(tokenizer) -> int | None:
    """The most bytes of text one token can stand for, when that bounds the token count from below: a
    byte-level BPE (every vocabulary string is one character per byte) with no normalizer and no added token
    that strips whitespace around it. None for any other tokenizer (prompts are then counted exactly)."""
    spec = json.loads(tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    # ByteLevel turns every byte into one character; a Split that keeps its delimiters drops nothing.
    keeps_every_byte = all(
        p.get("type") == "ByteLevel" or (p.get("type") == "Split" and p.get("behavior") != "Removed") for p in steps
    )
    byte_level = (
        model.get("type") == "BPE"
        and not model.get("byte_fallback")
        and spec.get("normalizer") is None
        and keeps_every_byte
        and any(p.get("type") == "ByteLevel" for p in steps)
    )
    added = spec.get("added_tokens") or []
    if not byte_level or any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    longest = max((len(token) for token in model.get("vocab", {})), default=1)
    return max([longest, *(len(t["content"].encode("utf-8")) for t in added)])


class PromptEncoder:
    """Tokenizes prompts off the event loop, refusing what cannot fit `max_length` before encoding it."""

    def __init__(self, tokenizer, vocab_size: int, max_length: int, workers: int = 2):
        self.tokenizer, self.vocab_size, self.max_length = tokenizer, vocab_size, max_length
        self.max_token_bytes = max_token_bytes(tokenizer)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="gptoss-tokenize")
        self.busy = 0  # prompts being tokenized now (for /health)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _check_bound(self, text: str, param: str) -> None:
        if self.max_token_bytes is None:
            return
        size = len(text.encode("utf-8"))
        least = math.ceil(size / self.max_token_bytes)
        if least > self.max_length:
            raise ApiError(
                400,
                f"the prompt has at least {least} tokens ({size} bytes, at most {self.max_token_bytes} per "
                f"token); this model's context is {self.max_length} tokens",
                param=param,
                code="context_length_exceeded",
            )

    def _encode(self, texts: list[str], param: str) -> list[list[int]]:
        for text in texts:  # every prompt is bounded before any is encoded
            self._check_bound(text, param)
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def _render(self, fmt, messages: list[dict]) -> list[int]:
        if isinstance(fmt, TemplateFormat):  # a template may drop or rewrite messages: bound what it renders
            self._check_bound(fmt.render_text(messages, add_generation_prompt=True), "messages")
        else:  # gptoss's own format encodes every message's content whole
            self._check_bound("".join(c for m in messages if isinstance(c := m.get("content"), str)), "messages")
        return fmt.render(messages, add_generation_prompt=True)

    async def _off_loop(self, fn, *args):
        self.busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self.busy -= 1

    async def prompts(self, prompt: Any, copies: int, max_queue: int) -> list[list[int]]:
        """A string, a list of strings, a list of token ids or a list of such lists -> token-id prompts."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        if not prompt or any(len(p) == 0 for p in prompt):
            raise ApiError(400, "empty prompt: give some text to continue", param="prompt")
        if len(prompt) * copies > max_queue:
            raise ApiError(
                400,
                f"{len(prompt)} prompts x n={copies} exceed what the queue holds ({max_queue}, --max-queue)",
                param="n" if copies > 1 else "prompt",
            )
        given = [p for p in prompt if not isinstance(p, str)]  # token ids: bounded by the body's size
        if any(not 0 <= t < self.vocab_size for p in given for t in p):
            raise ApiError(400, f"token ids must be in [0, {self.vocab_size})", param="prompt")
        texts = [p for p in prompt if isinstance(p, str)]
        encoded = iter(await self._off_loop(self._encode, texts, "prompt") if texts else [])
        prompts = [next(encoded) if isinstance(p, str) else list(p) for p in prompt]
        if any(not p for p in prompts):
            raise ApiError(400, "empty prompt: give some text to continue", param="prompt")
        return prompts

    async def chat(self, fmt, messages: list[dict]) -> list[int]:
        try:
            return await self._off_loop(self._render, fmt, messages)
        except MessageError as err:
            raise ApiError(400, str(err), param="messages") from None


def sampling_params(defaults: InferConfig, body, prompt_len: int, max_length: int, chat: bool, choice: int):
    """The request's settings over the run's defaults, checked as `gptoss infer` checks its options."""
    scoring = body.max_tokens == 0  # echo with max_tokens 0: the prompt is scored, nothing generated
    if prompt_len > max_length or (prompt_len == max_length and not scoring):
        raise ApiError(
            400,
            f"the prompt has {prompt_len} tokens; this model's context is {max_length} tokens, leaving no room "
            "to generate",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if scoring:
        max_tokens = 1  # never sampled (the engine request does not generate); the config needs a budget
    elif max_tokens is None:  # completions: the run's infer.max_new_tokens; chat: the rest of the context
        max_tokens = max_length if chat else defaults.max_new_tokens
    seed = None if body.seed is None else seed64(body.seed + choice)  # n choices of one seed differ
    try:  # a field left out is None: the default stays
        return defaults.with_overrides(
            lambda key: {"max_new_tokens": "max_tokens"}.get(key, key),
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            seed=seed,
            stop=body.stop_list(),
        )
    except ConfigError as err:
        raise ApiError(400, str(err), param=str(err).partition(":")[0]) from None
