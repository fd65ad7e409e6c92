"""`relaying.InferenceEndpoint`: the upstream is closed however the client leaves."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from mlxpool.router.forwarding import Forwarder, UpstreamReply
from mlxpool.router.metrics import RouterMetrics
from mlxpool.router.relaying import InferenceEndpoint
from mlxpool.router.tables.holder import TableHolder
from mlxpool.routing import RouteEndpoint


class OneReply:
    """A forwarder whose `open` answers one streamed reply; `relay` is the real one."""

    def __init__(self) -> None:
        self.metrics = RouterMetrics()
        self.closed = asyncio.Event()
        self.reply = UpstreamReply(endpoint=RouteEndpoint(node="node-0", url="http://127.0.0.1:1"), status=200,
                                   headers=[("content-type", "text/event-stream")], first_chunk=b"data: 1\n\n",
                                   on_close=self.closed.set)

    async def open(self, path: str, inference: Any, headers: Any) -> UpstreamReply:
        return self.reply

    relay = Forwarder.relay


async def test_a_client_gone_while_the_response_starts_still_closes_the_upstream() -> None:
    forwarder = OneReply()
    endpoint = InferenceEndpoint(forwarder, TableHolder(), forwarder.metrics)  # type: ignore[arg-type]
    body = json.dumps({"model": "m", "prompt": "hi", "stream": True}).encode()
    left = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":  # a slow client: the start waits on its socket
            left.set()  # ... and the client goes away meanwhile
            await asyncio.sleep(30)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    await asyncio.wait_for(endpoint(scope, receive, send), 5)
    await asyncio.wait_for(forwarder.closed.wait(), 5)
