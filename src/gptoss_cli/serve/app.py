"""The HTTP side of `gptoss serve`: OpenAI-compatible routes on FastAPI, errors, auth and the request log.

    GET  /health                 {"status": "ok", running, waiting, ...}
    GET  /v1/models[/ID]         the one model this server holds
    POST /v1/completions         text in, text out; `stream: true` sends server-sent events ending in [DONE];
                                 `logprobs`, `echo` (and `max_tokens: 0` with it: score a prompt)
    POST /v1/chat/completions    messages rendered through the run's conversation format; `logprobs`,
                                 `top_logprobs`

Handlers turn a request into engine Requests (one per prompt and choice) whose events come back from the
decode thread through a Mailbox (mailbox.py: one loop callback per batch of events) into one asyncio queue
per HTTP request; a stream writes every event that is ready in one go. Every error a
client can cause is an OpenAI-style error object with a 4xx status; a client that goes away cancels its
requests, which frees their KV-cache slots at the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..config import InferConfig
from ..data.chat_format import ChatFormat
from .admission import PromptEncoder, check_model, parse_body, sampling_params
from .engine import Engine
from .limits import DEFAULT_MAX_BODY, BodyLimit
from .logprobs import ChoiceLogprobs, TokenPieces
from .mailbox import Mailbox
from .middleware import Auth, RequestLog
from .protocol import ApiError, ChatRequest, CompletionRequest
from .requests import Done, EngineClosed, Event, Failed, Prompt, QueueFull, Request, Token

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
        self.encoder = PromptEncoder(tokenizer, engine.model.config.vocab_size, engine.max_length)
        self.created = int(time.time())
        self.pieces = TokenPieces(tokenizer)  # token ids as the logprobs objects show them
        self._mailbox: Mailbox | None = None

    def mailbox(self) -> Mailbox:
        """The running event loop's mailbox for events from the decode thread."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        return self._mailbox


SERVED_ROUTES = "GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions"


def create_app(
    served: Served, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY, health_needs_key: bool = False
):
    async def health(request: HttpRequest) -> Response:
        load = served.engine.load()
        return JSONResponse({"status": "ok", "model": served.model_name, **load, "tokenizing": served.encoder.busy})

    card = {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "gptoss"}

    async def models(request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [card]})

    async def model(request: HttpRequest) -> Response:
        check_model(request.path_params["model"], served.model_name)
        return JSONResponse(card)

    async def completions(request: HttpRequest) -> Response:
        body = await parse_body(request, CompletionRequest)
        check_model(body.model, served.model_name)
        prompts = await served.encoder.prompts(body.prompt, body.n, served.engine.max_queue)
        return await _generate(request, served, body, prompts, chat=False)

    async def chat_completions(request: HttpRequest) -> Response:
        body = await parse_body(request, ChatRequest)
        check_model(body.model, served.model_name)
        fmt = served.chat_format
        if fmt is None:
            raise ApiError(
                400,
                f"the model {served.model_name} has no conversation format (its run defines no "
                "chat template): use /v1/completions",
                param="messages",
                code="no_chat_format",
            )
        ids = await served.encoder.chat(fmt, body.plain_messages())
        return await _generate(request, served, body, [ids], chat=True)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        served.engine.start()
        try:
            yield
        finally:
            served.engine.stop()
            served.encoder.close()

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
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error},
    )
    return RequestLog(Auth(BodyLimit(app, max_body), api_key, health_needs_key))


# ---- generating and answering --------------------------------------------------------------------


async def _api_error(request: HttpRequest, exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: HttpRequest, exc: HTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = str(exc.detail)
    if exc.status_code in (404, 405):  # e.g. /v1/responses: say what this server does answer
        message = f"{request.method} {request.url.path} is not served here; this server answers {SERVED_ROUTES}"
    return JSONResponse(ApiError(exc.status_code, message, code=kind).body(), status_code=exc.status_code)


async def _server_error(request: HttpRequest, exc: Exception) -> Response:
    print(
        f"serve: {request.method} {request.url.path} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True
    )
    error = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")
    return JSONResponse(error.body(), status_code=500)


async def _generate(request: HttpRequest, served: Served, body, prompts: list[list[int]], chat: bool) -> Response:
    mailbox = served.mailbox()
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    stop_ids = frozenset()
    if chat:  # a reply ends at the format's end-of-turn ids; gptoss's own format also cuts at a new turn's start
        start = getattr(served.chat_format, "start", None)
        stop_ids = frozenset(served.chat_format.stop_ids) | ({start} if start is not None else set())

    def emitter(index: int):
        def emit(event: Event) -> None:
            mailbox.post(queue, (index, event))

        return emit

    jobs = []
    for ids in prompts:
        for j in range(body.n):
            params = sampling_params(served.defaults, body, len(ids), served.engine.max_length, chat, j)
            jobs.append(Request(ids, params, emitter(len(jobs)), stop_ids=stop_ids, **_logprob_options(body)))
    _submit(served, jobs)

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

    results = await _collect(request, queue, jobs, scores)
    if results is None:
        return Response(status_code=499)  # the client went away; nobody reads an answer
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


def _submit(served: Served, jobs: list[Request]) -> None:
    """Hand the requests to the engine, all or none: a full queue is a 429, a server shutting down a 503."""
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


async def _collect(request: HttpRequest, queue: asyncio.Queue, jobs: list[Request], scores) -> dict[int, Done] | None:
    """Every job's Done (tokens' log-probabilities recorded on the way), or None when the client went away;
    the jobs are cancelled either way, so their slots are free at the next decode step."""
    results: dict[int, Done] = {}
    try:
        while len(results) < len(jobs):
            try:
                index, event = await asyncio.wait_for(queue.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
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
    return results


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
        finished, failed = 0, False
        while finished < len(jobs) and not failed:
            events = [await queue.get()]
            while not queue.empty():  # what is ready goes out in one write
                events.append(queue.get_nowait())
            out = []
            for index, event in events:
                if isinstance(event, Token):
                    out.append(chunk(index, event.text, logprobs=scores[index].token_chunk(event.logprob, event.text)))
                elif isinstance(event, Prompt):
                    out.append(chunk(index, scores[index].prefix, logprobs=scores[index].prompt_chunk(event.logprobs)))
                elif isinstance(event, Done):
                    finished += 1
                    info["tokens"][1] += event.completion_tokens
                    out.append(chunk(index, None, event.reason))
                else:
                    out.append(_sse(_failure(event).body()))
                    failed = True
                    break
            yield "".join(out)
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
