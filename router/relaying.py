"""The two inference routes as plain ASGI: parse, forward, relay, watch for the client leaving.

`POST /v1/completions` and `POST /v1/chat/completions` are served here, not through
FastAPI: py-spy on the router under a closed loop of 1-token chats put Starlette's
middleware stack, FastAPI's per-request exit stack and `StreamingResponse` (its task
group of two tasks listening for a disconnect) at about a fifth of the router's busy
CPU. This path does the same work with one watcher task per request:

- the body is read whole (after `SizeLimitsMiddleware`, which bounds it) and parsed;
- a `RouterError` is answered with its OpenAI error body, as the FastAPI handler would;
- while the request is open and while a stream is relayed, a watcher task waits for
  `http.disconnect` and cancels the request: an abandoned request does not keep an agent
  busy (before the first byte: recorded as status 499, nginx's convention);
- the upstream is always closed when the reply ends, fails or the client goes away.

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
        watch = _DisconnectWatch(receive)
        try:
            inference = parse_inference_request(body, first)
            headers = upstream_headers(pairs, first.get("x-request-id") or uuid.uuid4().hex)
            watch.start()
            reply = await self.forwarder.open(scope["path"], inference, headers)
        except RouterError as exc:
            watch.stop()
            self._count(inference, exc.status_code)
            await _send_json(send, exc.status_code, exc.body(), _error_headers(exc))
            return
        except asyncio.CancelledError:
            if not watch.stop():
                raise
            self._count(inference, CLIENT_CLOSED_REQUEST)
            return
        except BaseException:
            watch.stop()
            raise
        if not (inference.stream or reply.is_sse):
            watch.stop()  # the agent sent its first byte: the rest of a whole body follows at once
        await self._relay(reply, inference.model, send, watch)

    async def _relay(self, reply: UpstreamReply, model: str, send: Send, watch: _DisconnectWatch) -> None:
        chunks = self.forwarder.relay(reply, model)
        try:
            await send({"type": "http.response.start", "status": reply.status,
                        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.stop():
                raise
        finally:
            watch.stop()
            with anyio.CancelScope(shield=True):
                await chunks.aclose()  # type: ignore[attr-defined]
                # A relay cancelled before its first chunk (the client left during the
                # response start) never ran its own `finally`: close the upstream here, or
                # its connection stays checked out and its in-flight count never drops.
                await reply.aclose()

    def _count(self, inference: InferenceRequest | None, status: int) -> None:
        """Counts a request the router answered itself (the model only if the table knows it)."""
        table = self.holder.current
        model = inference.model if inference is not None and table is not None and inference.model in table.models \
            else ""
        self.metrics.requests.labels(model, "", str(status)).inc()


class _DisconnectWatch:
    """A task that cancels the request's task when the client disconnects.

    Start it only once the request body was read: then the next ASGI message can only be
    `http.disconnect`. `stop()` ends it and says whether the client left (and if so takes
    back the cancellation it caused, so the caller can finish cleaning up).
    """

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.task: asyncio.Task[Any] | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.gone = False

    def start(self) -> None:
        self.task = asyncio.current_task()
        self.watcher = asyncio.create_task(self._watch(), name="client-disconnect-watch")

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        assert self.task is not None
        self.task.cancel()

    def stop(self) -> bool:
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None
            if self.gone:
                assert self.task is not None
                self.task.uncancel()
        return self.gone


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
