"""How big one request body may be (`--max-body`), enforced while it is read.

A body whose Content-Length is over the limit is answered 413 before any of it is read; a body sent without
one (chunked) is read piece by piece and answered 413 as soon as the pieces pass the limit, so a 50 MB body
costs the server at most `--max-body` of memory. The connection is closed after a 413: the rest of that body
is never read. A body within the limit is handed to the routes whole.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from .protocol import ApiError

DEFAULT_MAX_BODY = 4 * 2**20  # a whole context of text many times over, and far from what hurts a server
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


def _too_large(limit: int, size: int | None) -> JSONResponse:
    told = f"has {size} bytes" if size is not None else f"is over {limit} bytes"
    error = ApiError(
        413,
        f"the request body {told}; this server takes at most {limit} bytes (--max-body)",
        code="request_too_large",
    )
    return JSONResponse(error.body(), status_code=413, headers={"Connection": "close"})


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
                return await _too_large(self.limit, size)(scope, receive, send)
        pieces, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client left while sending: nobody to answer
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                return await _too_large(self.limit, None)(scope, receive, send)
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
