"""How big one request body may be (`--max-body`), enforced while it is read.

A body whose Content-Length is over the limit is refused from that header; a body sent without one (chunked)
is read piece by piece and refused as soon as the pieces pass the limit. Either way the rest of the body is
read and thrown away, one piece at a time, for at most `DRAIN_SECONDS`, before the 413 is sent and the
connection closed: most clients (httpx, requests, openai) send the whole body before they read an answer,
and a server that closes a socket with unread data in it resets the connection, so such a client would
see "connection reset" instead of the 413. A 50 MB body costs the server at most `--max-body` of memory;
a client that trickles it slower than the drain allows gets the 413 and the close early. A body within
the limit is handed to the routes whole.
"""

from __future__ import annotations

import asyncio
import time

from starlette.responses import JSONResponse

from .protocol import ApiError

DEFAULT_MAX_BODY = 4 * 2**20  # a whole context of text many times over, and far from what hurts a server
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
DRAIN_SECONDS = 10.0  # how long the rest of a refused body is read and thrown away (nginx lingers 30 s)


def _too_large(limit: int, size: int | None) -> JSONResponse:
    told = f"has {size} bytes" if size is not None else f"is over {limit} bytes"
    error = ApiError(
        413,
        f"the request body {told}; this server takes at most {limit} bytes (--max-body)",
        code="request_too_large",
    )
    return JSONResponse(error.body(), status_code=413, headers={"Connection": "close"})


async def _refuse(limit: int, size: int | None, scope, receive, send) -> None:
    """Throw away the rest of the body (bounded by DRAIN_SECONDS), then answer 413 unless the client left."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(receive(), timeout=left)
        except asyncio.TimeoutError:
            break
        if message["type"] == "http.disconnect":
            return None
        if not message.get("more_body", False):
            break
    await _too_large(limit, size)(scope, receive, send)


class BodyLimit:
    """ASGI middleware: read the body of POST/PUT/PATCH requests up to `limit` bytes, 413 beyond."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in _WITH_BODY:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                error = ApiError(400, "the Content-Length header is not a number", code="invalid_request")
                return await JSONResponse(error.body(), status_code=400)(scope, receive, send)
            if size > self.limit:
                return await _refuse(self.limit, size, scope, receive, send)
        pieces, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client left while sending: nobody to answer
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                pieces.clear()
                if not message.get("more_body", False):  # all of it already read: answer at once
                    return await _too_large(self.limit, None)(scope, receive, send)
                return await _refuse(self.limit, None, scope, receive, send)
            pieces.append(body)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(pieces), "more_body": False}
        pieces.clear()
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return whole
            return await receive()  # after the body: the disconnect a streaming response waits for

        return await self.app(scope, replay, send)
