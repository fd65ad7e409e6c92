"""One small HTTP connection pool per agent, behind one httpx client (operator and router).

httpcore's connection pool looks at every connection it holds each time a request
starts or a response ends (`_assign_requests_to_connections`: for each queued request,
a scan of all connections), so one pool shared by a thousand agents costs
O(requests x connections): profiled at 100 simulated agents, that bookkeeping took ~75%
of the operator's CPU at rest (a full core), starved its event loop, and made healthy
agents miss the 0.5 s probe timeout, which was the "mass watch silence" of the first
fleet runs. Here each origin (scheme, host, port) gets its own
`httpx.AsyncHTTPTransport` with a few connections, created on first use, so a request
only ever scans its own agent's connections. At most `max_hosts` pools are kept; the one
used least recently is closed beyond that.

The router had the same cost on its request path: py-spy on a router relaying 1-token
chats over 8 agents (bench.scaling's max phase) spent ~40% of its CPU in that scan, so
it forwards through this transport too. Shared here, below both components.
"""

from __future__ import annotations

import importlib.util
import ssl
import sys
from collections import OrderedDict
from collections.abc import Iterable

import httpx

if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
    # httpcore 1.0 runs `import sniffio` on every request (`current_async_library`); with
    # sniffio not installed (anyio 4.16 no longer needs it) each of those is a failed search
    # of sys.path: 5% of the operator's CPU at 1,000 agents (py-spy). A None entry makes
    # the import fail at once, with the same outcome (httpcore then assumes asyncio).
    sys.modules["sniffio"] = None  # type: ignore[assignment]  # None blocks an import (documented)

MAX_HOSTS = 10_000
"""Pools kept at once (far more than a fleet's agents; bounded like every size)."""


class PerHostTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, max_connections: int | None = 8, max_keepalive_connections: int = 4,
                 max_hosts: int = MAX_HOSTS, verify: ssl.SSLContext | None = None,
                 keepalive_expiry: float | None = 5.0) -> None:
        """`keepalive_expiry`: seconds an idle connection is kept (httpx's default, 5 s); the
        operator keeps its probe connections longer than the longest probe period, or every
        probe of a large fleet opens a connection (and a TLS session) of its own."""
        self._limits = httpx.Limits(max_connections=max_connections,
                                    max_keepalive_connections=max_keepalive_connections,
                                    keepalive_expiry=keepalive_expiry)
        self._max_hosts = max_hosts
        # One TLS context for all: each transport would otherwise load the CA bundle
        # (~1 MB of RSS per agent; 200 MB at 100 agents with two clients).
        self._ssl = verify if verify is not None else ssl.create_default_context()
        self._pools: OrderedDict[tuple[bytes, bytes, int | None], httpx.AsyncHTTPTransport] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pools)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        key = _origin(request.url)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = httpx.AsyncHTTPTransport(limits=self._limits, verify=self._ssl)
            if len(self._pools) > self._max_hosts:
                _, oldest = self._pools.popitem(last=False)
                await oldest.aclose()
        else:
            self._pools.move_to_end(key)
        return await pool.handle_async_request(request)

    async def retain(self, urls: Iterable[str]) -> int:
        """Close the pools of origins that none of `urls` is on and that have no request in
        progress; returns how many were closed. A pool still busy stays (call again later).

        Without this the pool of an agent that left keeps its idle connections until
        something uses that pool again, which nothing will: once the agent closes its
        side they sit in CLOSE-WAIT, a descriptor each, for as long as the process lives.
        """
        keep = {_origin(httpx.URL(url)) for url in urls}
        idle = [key for key, pool in self._pools.items() if key not in keep and _is_idle(pool)]
        for key in idle:
            await self._pools.pop(key).aclose()
        return len(idle)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            await pool.aclose()


def _origin(url: httpx.URL) -> tuple[bytes, bytes, int | None]:
    return url.raw_scheme, url.raw_host, url.port


def _is_idle(pool: httpx.AsyncHTTPTransport) -> bool:
    """No request in progress on the pool: each connection idle or closed (httpcore 1.0's pool)."""
    return all(c.is_idle() or c.is_closed() for c in pool._pool.connections)
