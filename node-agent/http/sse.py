"""Server-Sent Events over ASGI for a data-plane `ChunkStream`, cancelled on disconnect.

Each JSON chunk goes out as `data: {...}\n\n`, the stream ends with `data: [DONE]`;
the chunks of one batch (tokens the engine handed over together) go out in one write.
Two tasks run per response: one pumps chunks to the client, one waits for the
client to go away; whichever ends first ends the other, and the chunk stream is
closed in every case, so a client that leaves mid-stream frees its batch slot at
once. A slow client only slows its own pump: the engine never waits for anyone.
An error after the 200 header went out is reported in-stream, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from mlxpool.agent.errors import AgentError
from mlxpool.agent.http.disconnects import disconnected
from mlxpool.agent.serving.dataplane import ChunkStream

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, stream: ChunkStream) -> None:
        self.stream = stream
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        gone = asyncio.ensure_future(disconnected(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pump.cancel()
            gone.cancel()
            await asyncio.gather(pump, gone, return_exceptions=True)
            await self.stream.aclose()
        if not pump.cancelled() and pump.exception() is not None and not isinstance(pump.exception(), OSError):
            log.error("event stream failed path=%s error=%r", scope.get("path"), pump.exception())

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for batch in self.stream:  # one write per batch of chunks
                body = "".join(f"data: {chunk}\n\n" for chunk in batch).encode()
                if self.stream.complete:  # the last batch: the end marker goes with it
                    await send({"type": "http.response.body", "body": body + DONE, "more_body": False})
                    return
                await send({"type": "http.response.body", "body": body, "more_body": True})
        except AgentError as exc:  # headers are sent: report the error in-stream
            event = json.dumps(exc.body())
            await send({"type": "http.response.body", "body": f"data: {event}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": DONE, "more_body": False})
