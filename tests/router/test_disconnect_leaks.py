"""Clients that leave at every stage of a request leave no connection or descriptor behind.

A real router (in-process uvicorn) over fake agents; each client is a raw socket so that
it can leave at an exact point: while the agent is still thinking (before the response
start), right after the response start, mid-stream, and right after the last event but
before the end of the chunked body (the router is then closing its upstream reply). Then,
once every request ended: no upstream connection is still checked out of the router's
per-agent pools, every endpoint's in-flight count is back to 0, and the process holds no
more descriptors than the idle pool connections explain. Closing an upstream reply is made
to take a while (`CLOSE_SECONDS`), as on a loaded machine: the first plain-ASGI version of
the inference path (ce7aa11, cancelling the request's task on a disconnect) fails here
with 12 connections stuck open, one per client that left after [DONE].

And the pool of an agent that left the routing table is closed once its last request
ended (it would otherwise keep its idle connections, in CLOSE-WAIT once the agent closed
its side, for as long as the router lives).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx

from mlxpool.router.settings import SignalSettings

from .conftest import RouterUnderTest, make_table

ROUNDS = 12
"""Requests per way of leaving."""

CLOSE_SECONDS = 0.03
"""How long closing an upstream reply takes here. httpcore's close awaits (its connection's
lock) inside an anyio shield, as this does: on a loaded machine a client can leave during
it, and a cancellation that ignores the shield (a plain `Task.cancel`) then interrupts it.
httpx has already marked the response closed, so nothing closes it again: the connection
stays checked out of its pool, open, for good."""


class _SlowClose(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self.inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            yield chunk

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await asyncio.sleep(CLOSE_SECONDS)
            await self.inner.aclose()


class _SlowCloseTransport(httpx.AsyncBaseTransport):
    """The router's own transport, with replies that take `CLOSE_SECONDS` to close."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _SlowClose(response.stream)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _pool_connections(router: RouterUnderTest) -> tuple[int, int]:
    """(open idle, open busy) connections over all of the router's per-agent pools."""
    idle = busy = 0
    transport = router.app.state.forwarder.client._transport.inner  # PerHostTransport
    for pool in transport._pools.values():
        for connection in pool._pool.connections:
            if connection.is_closed():
                continue
            if connection.is_idle():
                idle += 1
            else:
                busy += 1
    return idle, busy


async def _send(router: RouterUnderTest, body: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = router.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(payload), payload))
    await writer.drain()
    return reader, writer


async def _leave(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def test_clients_leaving_at_any_stage_leave_no_connection_behind(agents, start_router):
    release: asyncio.Queue[None] = asyncio.Queue()
    held = await agents("held", release=release)  # streams: the first event, then nothing (never released)
    ends = await agents("ends", stream_chunks=2)  # streams straight to [DONE]
    slow = await agents("slow", first_byte_delay=1.0)  # completions: thinks for 1 s
    router = await start_router(make_table({"held": [("held", held.url)], "ends": [("ends", ends.url)],
                                            "slow": [("slow", slow.url)]}), signals=SignalSettings(interval=0))
    client = router.app.state.forwarder.client
    client._transport = _SlowCloseTransport(client._transport)
    assert (await router.complete("ends", stream=True)).status_code == 200  # warm: one idle connection
    base_idle, base_busy = _pool_connections(router)
    base_fds = _fds()

    async def before_the_start() -> None:
        """The agent has the request and is still thinking."""
        seen = len(slow.received)
        _, writer = await _send(router, {"model": "slow", "prompt": "hi"})
        async with asyncio.timeout(5):
            while len(slow.received) == seen:
                await asyncio.sleep(0.005)
        await _leave(writer)

    async def after_the_start() -> None:
        """Right after the response start (the first event may be on its way)."""
        reader, writer = await _send(router, {"model": "held", "prompt": "hi", "stream": True})
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        await _leave(writer)

    async def mid_stream() -> None:
        """After the first event, the router waiting on the agent's next one."""
        reader, writer = await _send(router, {"model": "held", "prompt": "hi", "stream": True})
        await asyncio.wait_for(reader.readuntil(b'"i": 0}'), 5)
        await _leave(writer)

    async def after_the_last_event() -> None:
        """After [DONE], before the chunked body's end: the router is closing its upstream."""
        reader, writer = await _send(router, {"model": "ends", "prompt": "hi", "stream": True})
        await asyncio.wait_for(reader.readuntil(b"[DONE]"), 5)
        await _leave(writer)

    for _ in range(ROUNDS):
        for leave in (before_the_start, after_the_start, mid_stream, after_the_last_event):
            await leave()

    signals = router.app.state.signals

    def state() -> dict[str, Any]:
        idle, busy = _pool_connections(router)
        return {"busy": busy - base_busy, "in_flight": sum(signals.get(a.url).in_flight for a in (held, ends, slow)),
                # Each open pool connection is two descriptors here (the router's end and the
                # fake agent's, one process); more than that (and a little slack) leaked.
                "extra_fds": max(0, _fds() - base_fds - 2 * (idle - base_idle) - 2)}

    settled = {"busy": 0, "in_flight": 0, "extra_fds": 0}
    for _ in range(500):  # at most ~10 s
        if state() == settled:
            break
        await asyncio.sleep(0.02)
    assert state() == settled


async def test_the_pool_of_an_agent_that_left_is_closed_once_idle(agents, start_router):
    release: asyncio.Queue[None] = asyncio.Queue()
    stay, leave = await agents("stay"), await agents("leave", release=release, stream_chunks=2)
    router = await start_router(make_table({"m": [("stay", stay.url), ("leave", leave.url)]}),
                                signals=SignalSettings(interval=0.02))
    pools, poll_pools = router.app.state.forwarder.pools, router.app.state.poller.pools
    assert (await router.complete()).status_code == 200  # round-robin: one to each
    async with asyncio.timeout(5):  # the signal poller has polled both
        while len(poll_pools) < 2:
            await asyncio.sleep(0.01)
    async with router.client.stream("POST", "/v1/completions",
                                    json={"model": "m", "prompt": "hi", "stream": True}) as streaming:
        events = streaming.aiter_lines()
        assert '"leave"' in await asyncio.wait_for(anext(events), 5)
        assert len(pools) == 2

        await router.set_table(make_table({"m": [("stay", stay.url)]}, revision=2))
        for _ in range(10):  # the pruning task ran: a pool with a stream in progress stays
            await asyncio.sleep(0.01)
        assert len(pools) == 2
        release.put_nowait(None)
        release.put_nowait(None)
        assert [line async for line in events if line][-1] == "data: [DONE]"

    async with asyncio.timeout(5):  # the stream's end was the last request there: closed
        while len(pools) > 1 or len(poll_pools) > 1:  # and the poller's, after its next round
            await asyncio.sleep(0.01)
    assert (await router.complete()).json()["node"] == "stay"
