"""The server's ASGI middleware: the API key check and one log line per request.

Outermost first: RequestLog (every request, whatever answers it), then Auth, then the body limit
(limits.py) and the routes (app.py).
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time

from starlette.responses import JSONResponse

from .protocol import ApiError


class Auth:
    """With an API key, every request needs `Authorization: Bearer KEY` (401 otherwise), except GET /health
    unless `health_needs_key`: a load balancer's health check carries no key."""

    def __init__(self, app, api_key: str | None, health_needs_key: bool = False):
        self.app, self.expected = app, f"Bearer {api_key}".encode() if api_key else None
        self.open_paths = frozenset() if health_needs_key else frozenset({"/health"})

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.expected is not None and scope["path"] not in self.open_paths:
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
