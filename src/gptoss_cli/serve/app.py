"""The HTTP side of `gptoss serve`: OpenAI-compatible routes on FastAPI, errors, auth and the request log.

    GET  /health                 {"status": "ok", running, waiting, ...}
    GET  /v1/models[/ID]         the one model this server holds
    POST /v1/completions         text in, text out; `stream: true` sends server-sent events ending in [DONE];
                                 `logprobs`, `echo` (and `max_tokens: 0` with it: score a prompt)
    POST /v1/chat/completions    messages rendered through the run's conversation format; `logprobs`,
                                 `top_logprobs`

Handlers turn a request into engine Requests (one per prompt and choice) whose events come back from the
decode thread through `loop.call_soon_threadsafe` into one asyncio queue per HTTP request. Every error a
client can cause is an OpenAI-style error object with a 4xx status; a client that goes away cancels its
requests, which frees their KV-cache slots at the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
import uuid
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..config import ConfigError, InferConfig
from ..data.chat_format import ChatFormat, MessageError
from .engine import Done, Engine, EngineClosed, Event, Failed, Prompt, QueueFull, Request, Token
from .logprobs import ChoiceLogprobs, TokenPieces
from .protocol import ApiError, ChatRequest, CompletionRequest

POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there


class Served:
    """What the routes need: the engine, the tokenizer, the model's name, its conversation format."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        *,
        model_name: str,
        defaults: InferConfig,
        chat_format: ChatFormat | None = None,
    ):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.defaults, self.chat_format = defaults, chat_format
        self.created = int(time.time())
        self.pieces = TokenPieces(tokenizer)  # token ids as the logprobs objects show them


def create_app(served: Served, api_key: str | None = None):
    async def health(request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "model": served.model_name, **served.engine.load()})

    card = {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "gptoss"}

    async def models(request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [card]})

    async def model(request: HttpRequest) -> Response:
        _check_model(served, request.path_params["model"])
        return JSONResponse(card)

    async def completions(request: HttpRequest) -> Response:
        body = await _parse(request, CompletionRequest)
        _check_model(served, body.model)
        prompts = _encode_prompts(served, body.prompt)
        return await _generate(request, served, body, prompts, chat=False)

    async def chat_completions(request: HttpRequest) -> Response:
        body = await _parse(request, ChatRequest)
        _check_model(served, body.model)
        fmt = served.chat_format
        if fmt is None:
            raise ApiError(
                400,
                f"the model {served.model_name} has no conversation format (its run defines no "
                "chat template): use /v1/completions",
                param="messages",
                code="no_chat_format",
            )
        try:
            ids = fmt.render(body.plain_messages(), add_generation_prompt=True)
        except MessageError as err:
            raise ApiError(400, str(err), param="messages") from None
        return await _generate(request, served, body, [ids], chat=True)

    async def api_error(request: HttpRequest, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: HttpRequest, exc: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), code=kind).body(), status_code=exc.status_code)

    async def server_error(request: HttpRequest, exc: Exception) -> Response:
        print(
            f"serve: {request.method} {request.url.path} failed: {type(exc).__name__}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        error = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        served.engine.start()
        try:
            yield
        finally:
            served.engine.stop()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    # Plain routes that parse their own bodies, so every error is the OpenAI error object (FastAPI's own
    # validation answers 422 in another shape); no generated docs pages.
    app = FastAPI(
        routes=routes,
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
    )
    return RequestLog(Auth(app, api_key))


# ---- parsing and checking a request --------------------------------------------------------------


async def _parse(request: HttpRequest, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
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


def _check_model(served: Served, name: str) -> None:
    if name != served.model_name:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server holds {served.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _encode_prompts(served: Served, prompt: Any) -> list[list[int]]:
    """A string, a list of strings, a list of token ids or a list of such lists -> token-id prompts."""
    if isinstance(prompt, str):
        prompts = [served.tokenizer.encode(prompt).ids]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [served.tokenizer.encode(p).ids for p in prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    vocab = served.engine.model.config.vocab_size
    if not prompts or any(not p for p in prompts):
        raise ApiError(400, "empty prompt: give some text to continue", param="prompt")
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
    return prompts


def _sampling(served: Served, body, prompt_len: int, chat: bool, choice: int) -> InferConfig:
    limit = served.engine.max_length
    scoring = body.max_tokens == 0  # echo with max_tokens 0: the prompt is scored, nothing generated
    if prompt_len > limit or (prompt_len == limit and not scoring):
        raise ApiError(
            400,
            f"the prompt has {prompt_len} tokens; this model's context is {limit} tokens, leaving no room to generate",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    d = served.defaults
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if scoring:
        max_tokens = 1  # never sampled (the engine request does not generate); the config needs a budget
    elif max_tokens is None:  # completions: the run's infer.max_new_tokens; chat: the rest of the context
        max_tokens = limit if chat else d.max_new_tokens
    seed = body.seed if body.seed is None else body.seed + choice  # n choices of one seed differ
    try:  # the request's fields over the run's defaults (a field left out is None: the default stays)
        return d.with_overrides(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            seed=seed,
            stop=body.stop_list(),
        )
    except ConfigError as err:
        raise ApiError(400, str(err)) from None


# ---- generating and answering --------------------------------------------------------------------


async def _generate(request: HttpRequest, served: Served, body, prompts: list[list[int]], chat: bool) -> Response:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    stop_ids = frozenset()
    if chat:  # a reply ends at the format's end-of-turn ids; gptoss's own format also cuts at a new turn's start
        start = getattr(served.chat_format, "start", None)
        stop_ids = frozenset(served.chat_format.stop_ids) | ({start} if start is not None else set())

    def emitter(index: int):
        def emit(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody to tell
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))

        return emit

    if len(prompts) * body.n > served.engine.max_queue:
        raise ApiError(
            400,
            f"{len(prompts)} prompts x n={body.n} exceed what the queue holds ({served.engine.max_queue}, --max-queue)",
            param="n" if body.n > 1 else "prompt",
        )
    jobs = []
    for ids in prompts:
        for j in range(body.n):
            params = _sampling(served, body, len(ids), chat, j)
            jobs.append(Request(ids, params, emitter(len(jobs)), stop_ids=stop_ids, **_logprob_options(body)))
    try:
        served.engine.submit(jobs)
    except QueueFull as err:
        raise ApiError(
            429,
            f"the server is busy: {err}; retry shortly",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    except EngineClosed as err:
        raise ApiError(503, str(err), type="server_error", code="shutting_down", headers={"Retry-After": "5"}) from None

    info = request.scope.get("gptoss", {})
    info["tokens"] = [sum(map(len, prompts)), 0]
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": served.model_name,
    }
    scores = [_choice_logprobs(served, body, job, chat, stop_ids) for job in jobs]
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _stream(queue, jobs, head, chat, include_usage, info, scores),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    results: dict[int, Done] = {}
    try:
        while len(results) < len(jobs):
            try:
                index, event = await asyncio.wait_for(queue.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; the finally frees the slots
                continue
            if isinstance(event, Failed):
                raise _failure(event)
            if isinstance(event, Done):
                results[index] = event
            else:
                _record(scores[index], event)
    finally:
        for job in jobs:
            job.cancel()
    info["tokens"][1] = sum(d.completion_tokens for d in results.values())
    choices = []
    for i in range(len(jobs)):
        done = results[i]
        if chat:
            content = done.text if jobs[i].params.stop else served.chat_format.parse_reply(done.token_ids)["content"]
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": scores[i].whole(content or ""),
                    "finish_reason": done.reason,
                }
            )
        else:
            text = scores[i].prefix + done.text  # the prompt first, with echo
            choices.append({"index": i, "text": text, "logprobs": scores[i].whole(text), "finish_reason": done.reason})
    return JSONResponse({**head, "choices": choices, "usage": _usage(info["tokens"])})


async def _stream(
    queue: asyncio.Queue,
    jobs: list[Request],
    head: dict,
    chat: bool,
    include_usage: bool,
    info: dict,
    scores: list[ChoiceLogprobs],
):
    """Server-sent events: one chunk per piece of text (per token with logprobs), a last chunk per choice
    with its finish reason; with echo a completion's first chunk is its prompt."""
    if chat:
        head = {**head, "object": "chat.completion.chunk"}

    def chunk(index: int, text: str | None, reason: str | None = None, logprobs: dict | None = None) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        return _sse({**head, "choices": [choice]})

    try:
        if chat:
            for i in range(len(jobs)):
                yield _sse(
                    {
                        **head,
                        "choices": [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
        for i, score in enumerate(scores):  # echo without logprobs: the prompt needs no scoring
            if score.prefix and not jobs[i].echo:
                yield chunk(i, score.prefix)
        finished = 0
        while finished < len(jobs):
            index, event = await queue.get()
            if isinstance(event, Token):
                yield chunk(index, event.text, logprobs=scores[index].token_chunk(event.logprob, event.text))
            elif isinstance(event, Prompt):
                yield chunk(index, scores[index].prefix, logprobs=scores[index].prompt_chunk(event.logprobs))
            elif isinstance(event, Done):
                finished += 1
                info["tokens"][1] += event.completion_tokens
                yield chunk(index, None, event.reason)
            else:
                yield _sse(_failure(event).body())
                break
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(info["tokens"])})
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects mid-stream (the generator is cancelled)
        for job in jobs:
            job.cancel()


def _logprob_options(body) -> dict:
    """The engine's settings for a request's log-probabilities: alternatives per sampled token (None: off),
    whether the prompt is scored (echo with logprobs) and whether anything is generated (max_tokens 0)."""
    return {
        "logprobs": body.top,
        "echo": getattr(body, "echo", False) and body.top is not None,
        "generate": body.max_tokens != 0,
    }


def _choice_logprobs(served: Served, body, job: Request, chat: bool, stop_ids: frozenset[int]) -> ChoiceLogprobs:
    echo = getattr(body, "echo", False)
    return ChoiceLogprobs(served.pieces, top=body.top, chat=chat, prompt=job.prompt, echo=echo, stop_ids=stop_ids)


def _record(score: ChoiceLogprobs, event: Event) -> None:
    if isinstance(event, Prompt):
        score.add_prompt(event.logprobs)
    elif isinstance(event, Token):
        score.add(event.logprob)


def _failure(event: Failed) -> ApiError:
    if event.shutdown:
        return ApiError(503, event.message, type="server_error", code="shutting_down")
    return ApiError(500, event.message, type="server_error", code="generation_failed")


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(tokens: list[int]) -> dict[str, int]:
    return {"prompt_tokens": tokens[0], "completion_tokens": tokens[1], "total_tokens": sum(tokens)}


# ---- middleware ----------------------------------------------------------------------------------


class Auth:
    """With an API key, every request needs `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.expected = app, f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.expected is not None:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = ApiError(
                    401, "a valid API key is needed: send 'Authorization: Bearer KEY'", code="invalid_api_key"
                )
                response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class RequestLog:
    """One line per request on stderr: client, method, path, status, prompt+completion tokens, latency."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, info = time.perf_counter(), {}
        scope["gptoss"] = info
        status = [0]

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except asyncio.CancelledError:  # uvicorn cancels what outlives the drain: the log line says so
            status[0] = status[0] or 503
            info["cancelled"] = True
        finally:
            tokens = info.get("tokens")
            count = f" tokens {tokens[0]}+{tokens[1]}" if tokens else ""
            client = scope.get("client") or ("-", 0)
            cut = " (cut off at shutdown)" if info.get("cancelled") else ""
            print(
                f"{client[0]} {scope['method']} {scope['path']} {status[0] or 499}{count} "
                f"{(time.perf_counter() - start) * 1e3:.0f} ms{cut}",
                file=sys.stderr,
                flush=True,
            )
