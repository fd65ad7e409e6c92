"""Adapting upstream replies to the ASGI server: streaming out and client disconnects.

- `RelayResponse` streams a reply chunk by chunk and always closes the upstream when
  the response ends, fails or the client goes away (Starlette alone would leave a
  suspended body iterator to the garbage collector when a send fails).
- `cancel_on_disconnect` runs the connect-and-wait phase of a request and cancels it
  when the client disconnects first, so an abandoned non-streamed completion does not
  keep an agent busy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mlxpool.router.forwarding import UpstreamReply


class RelayResponse(StreamingResponse):
    def __init__(self, reply: UpstreamReply, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, status_code=reply.status)
        # Raw pairs, not a dict: repeated headers (set-cookie, ...) survive.
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


class ClientDisconnected(Exception):
    """The client went away before the upstream answered."""


async def cancel_on_disconnect(receive: Receive, opening: Coroutine[Any, Any, UpstreamReply]) -> UpstreamReply:
    """Await `opening`; if the client disconnects first, cancel it and raise `ClientDisconnected`.

    Call only after the request body was read: then the next ASGI message can only be
    `http.disconnect`.
    """
    work = asyncio.ensure_future(opening)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        # We are being cancelled ourselves: a reply that arrived meanwhile must not leak.
        watcher.cancel()
        work.cancel()
        await asyncio.gather(watcher, work, return_exceptions=True)
        if work.done() and not work.cancelled() and work.exception() is None:
            await work.result().aclose()
        raise
    watcher.cancel()
    work.cancel()
    await asyncio.gather(watcher, work, return_exceptions=True)
    if work.cancelled():
        raise ClientDisconnected()
    return work.result()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
