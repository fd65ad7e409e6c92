"""Guards at the HTTP boundary shared by the agent and the router: size limits, last-resort errors.

A server that reads whatever it is sent can be stalled or bloated by one client: a
10 MB body was read, parsed and tokenized before any length check. `SizeLimits` stops
such requests before the app sees them, with the OpenAI error shape:

- header bytes (names and values together) above `max_header_bytes`: 431;
- a `Content-Length` above `max_body_bytes`: 413 at once, before the body is read;
- a body without a length (chunked) is counted as it arrives and refused with 413 as
  soon as it passes the limit, so nothing larger is ever held in memory.

The body is read here whole (bounded) and handed to the app in one message; after it
the app's `receive` is the server's again, so disconnect watchers keep working.
Pure ASGI (no web framework): both servers mount it the same way, and the limits are
identical at the router and the agent.

`UnexpectedErrors` answers what no handler expected with a JSON 500 (the OpenAI
shape, no traceback) and does not re-raise it: Starlette's outermost error
middleware would, and uvicorn then drops the client's keep-alive connection. Mounted
inside Starlette's own (`app.add_middleware`), in place of an `Exception` handler.

What it does not do: rate limits, and it cannot
bound what the HTTP parser itself buffers for headers (uvicorn's h11 limit does that
where h11 is the parser; with httptools this check is the bound on what is processed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from mlxpool.apierrors import error_body

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_HEADER_BYTES", "SizeLimits", "SizeLimitsMiddleware",
           "UnexpectedErrorsMiddleware"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
"""8 MiB: a long-context prompt of a few hundred thousand tokens as JSON, with room."""
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
"""32 KiB: nginx's default large_client_header_buffers (4 x 8k) and then some."""


@dataclass(frozen=True)
class SizeLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body accepted; larger: 413."""
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    """Largest total of header names and values accepted; larger: 431."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


class SizeLimitsMiddleware:
    def __init__(self, app: ASGIApp, limits: SizeLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = self.limits
        header_bytes = sum(len(k) + len(v) for k, v in scope.get("headers", ()))
        if header_bytes > limits.max_header_bytes:
            await _refuse(send, 431, f"the request headers have {header_bytes} bytes; this server accepts at "
                                     f"most {limits.max_header_bytes}", "request_headers_too_large")
            return
        declared = _content_length(scope)
        if declared is None:
            await _refuse(send, 400, "the Content-Length header is not a non-negative integer",
                          "invalid_content_length")
            return
        if declared > limits.max_body_bytes:
            await _refuse(send, 413, _too_large(f"{declared} bytes (Content-Length)", limits), "request_too_large")
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending: nothing to answer
                return
            body = message.get("body", b"")
            total += len(body)
            if total > limits.max_body_bytes:
                await _refuse(send, 413, _too_large(f"more than {limits.max_body_bytes} bytes", limits),
                              "request_too_large")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    delivered = False

    async def replayed() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _content_length(scope: Scope) -> int | None:
    """The declared length (0 when absent); None when it is malformed."""
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            # 18 digits: any real body, and never a huge int parse.
            if not text or len(text) > 18 or text.strip("0123456789"):
                return None
            return int(text)
    return 0


def _too_large(what: str, limits: SizeLimits) -> str:
    return f"the request body has {what}; this server accepts at most {limits.max_body_bytes}"


async def _refuse(send: Send, status: int, message: str, code: str) -> None:
    payload = json.dumps(error_body(message, "invalid_request_error", code=code)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),  # the unread rest of the body makes the connection unusable
    ]})
    await send({"type": "http.response.body", "body": payload})


class UnexpectedErrorsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:  # the last resort: everything else already answered what it knew
            log.error("unhandled error path=%s started=%s", scope.get("path", ""), started, exc_info=exc)
            if not started:
                payload = json.dumps(error_body("internal error", "server_error")).encode()
                await send({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
                await send({"type": "http.response.body", "body": payload})
