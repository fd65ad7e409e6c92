"""Noticing that an HTTP client went away, so its generation stops at once.

Both ways a response can be pending use it: a whole response (or a stream not yet
started) watched from the route (`app`), and a Server-Sent Events stream watched
while it is written (`sse`).
"""

from __future__ import annotations

from starlette.types import Receive


async def disconnected(receive: Receive) -> None:
    """Return once the ASGI receive channel says the client disconnected."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
