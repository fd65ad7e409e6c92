"""The two inference routes as plain ASGI: parse, forward, relay, watch for the client leaving.

`POST /v1/completions` and `POST /v1/chat/completions` are served here, not through
FastAPI: py-spy on the router under a closed loop of 1-token chats put Starlette's
middleware stack, FastAPI's per-request exit stack and `StreamingResponse` (its task
group of two tasks listening for a disconnect) at about a fifth of the router's busy
CPU. This path does the same work with one watcher task per request:

- the body is read whole (after `SizeLimitsMiddleware`, which bounds it) and parsed;
- a `RouterError` is answered with its OpenAI error body, as the FastAPI handler would;
- the request runs in an anyio cancel scope; a watcher task waits for `http.disconnect`
  and cancels that scope: an abandoned request does not keep an agent busy (before the
  first byte: recorded as status 499, nginx's convention);
- the upstream is always closed when the reply ends, fails or the client goes away.

Why a cancel scope and not `Task.cancel()` on the request's task (the first version of
this path, reverted for leaking connections): httpcore closes a response inside anyio
shields, and httpx marks a response closed before that close has run. A plain
`Task.cancel()` ignores anyio's shields; landing in such a close (the client leaving just
as a stream ends, while httpx closes the finished response) it left the connection
checked out of its pool and open for good, and nothing would ever close it again (the
soak: router descriptors 29-33 at idle vs 18 at start). A cancelled anyio scope waits
until the task is outside every shield. tests/router/test_disconnect_leaks.py has the
case.

Everything else (the other routes, 404/405, errors no one expected) stays FastAPI's;
`mlxpool.router.app` mounts this in front of it, with the same size limits and the same
last-resort JSON 500.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import anyio

from mlxpool.httpguards import Message, Receive, Scope, Send
from mlxpool.router.errors import Overloaded, RouterError
from mlxpool.router.forwarding import Forwarder, UpstreamReply
from mlxpool.router.metrics import RouterMetrics
from mlxpool.router.parsing import InferenceRequest, parse_inference_request, upstream_headers
from mlxpool.router.tables.holder import TableHolder

INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})

CLIENT_CLOSED_REQUEST = 499
"""Status recorded (nginx's convention) when the client left before the agent answered."""


class InferenceEndpoint:
    """ASGI app for `INFERENCE_PATHS` (POST only: the caller dispatches)."""

    def __init__(self, forwarder: Forwarder, holder: TableHolder, metrics: RouterMetrics) -> None:
        self.forwarder = forwarder
        self.holder = holder
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return  # the client left while sending: nothing to answer
        pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        first: dict[str, str] = {}
        for name, value in pairs:  # ASGI names are lower case; the first of repeated ones counts
            first.setdefault(name, value)
        inference: InferenceRequest | None = None
        reply: UpstreamReply | None = None
        watcher: asyncio.Task[None] | None = None
        try:
            with anyio.CancelScope() as request:
                inference = parse_inference_request(body, first)
                headers = upstream_headers(pairs, first.get("x-request-id") or uuid.uuid4().hex)
                # The body was read: the next message can only be `http.disconnect`.
                watcher = asyncio.create_task(_cancel_on_disconnect(receive, request), name="client-disconnect-watch")
                reply = await self.forwarder.open(scope["path"], inference, headers)
                writer = _Writer(send, reply)
                await self.forwarder.relay(reply, inference.model, writer.write)
                await writer.write(b"")  # the start, if the body was empty
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except RouterError as exc:
            self._count(inference, exc.status_code)
            await _send_json(send, exc.status_code, exc.body(), _error_headers(exc))
            return
        finally:
            if watcher is not None:
                watcher.cancel()
            if reply is not None:
                # `relay` closed it, unless the client left during the response start
                # (`relay` then never ran): an open reply keeps its connection checked out
                # and its endpoint counted in flight.
                await reply.aclose()
        if request.cancelled_caught and reply is None:
            self._count(inference, CLIENT_CLOSED_REQUEST)

    def _count(self, inference: InferenceRequest | None, status: int) -> None:
        """Counts a request the router answered itself (the model only if the table knows it)."""
        table = self.holder.current
        model = inference.model if inference is not None and table is not None and inference.model in table.models \
            else ""
        self.metrics.requests.labels(model, "", str(status)).inc()


class _Writer:
    """Sends the response start with the first body chunk (or at the end, for an empty body)."""

    def __init__(self, send: Send, reply: UpstreamReply) -> None:
        self.send = send
        self.reply = reply
        self.started = False

    async def write(self, chunk: bytes) -> None:
        if not self.started:
            self.started = True
            await self.send({"type": "http.response.start", "status": self.reply.status, "headers": [
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.reply.headers]})
        if chunk:
            await self.send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _error_headers(exc: RouterError) -> list[tuple[str, str]]:
    headers = list((exc.headers or {}).items())
    if isinstance(exc, Overloaded):
        headers.append(("retry-after", str(exc.retry_after)))
    return headers


async def _send_json(send: Send, status: int, content: Any, headers: list[tuple[str, str]]) -> None:
    payload = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers)]})
    await send({"type": "http.response.body", "body": payload})
