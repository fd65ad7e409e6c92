"""The data plane: choose candidates for a request, try them in order, relay the answer.

`Forwarder.open` walks the ranked candidates of the table's strategy: a connect error,
a timeout before the first body byte, a broken connection or a 5xx from an agent moves
on to the next candidate (at most `max_attempts`). The first body chunk is read before
a reply is returned, so nothing has reached the client while failover is still
possible; once `relay` has yielded bytes, an upstream failure is never retried.

No HTTP server types here: `relaying` serves the inference routes over ASGI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import httpx

from mlxpool.httptransports import PerHostTransport
from mlxpool.priorities import Priority
from mlxpool.router.errors import (
    BadRequest,
    ModelNotFound,
    NoHealthyEndpoint,
    NoRoutingTable,
    Overloaded,
    UpstreamUnavailable,
    error_body,
)
from mlxpool.router.metrics import RouterMetrics
from mlxpool.router.parsing import STRATEGY_HEADER, InferenceRequest, downstream_headers
from mlxpool.router.picking.plugins import PickRequest
from mlxpool.router.picking.profiles import Strategies
from mlxpool.router.picking.shedding import SheddingPolicy, shed
from mlxpool.router.picking.signals import EndpointSignals
from mlxpool.router.settings import UpstreamSettings
from mlxpool.router.tables.holder import TableHolder
from mlxpool.routing import RouteEndpoint, RoutingTable

log = logging.getLogger(__name__)

MAX_CACHED_URLS = 4096
"""Parsed endpoint URLs kept (endpoints x the two paths; cleared with each new table)."""

ENDPOINT_HEADER = "x-mlxpool-endpoint"
"""Response header naming the node that answered."""


@dataclass(eq=False)
class UpstreamReply:
    """An agent's answer whose status, headers and first chunk are known; the rest may still stream."""

    endpoint: RouteEndpoint
    status: int
    headers: list[tuple[str, str]]
    first_chunk: bytes
    response: httpx.Response | None = None
    chunks: AsyncIterator[bytes] | None = None
    on_close: Callable[[], None] | None = None
    _closed: bool = field(default=False, init=False)

    @property
    def is_sse(self) -> bool:
        return any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in self.headers)

    async def aclose(self) -> None:
        """Close the upstream stream (idempotent; completes even while being cancelled)."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await _close_stream(self.chunks, self.response)
        if self.on_close is not None:
            self.on_close()


class UpstreamFailure(Exception):
    """One attempt at one endpoint failed before any byte reached the client."""

    def __init__(self, endpoint: RouteEndpoint, kind: str, detail: str, reply: UpstreamReply | None = None) -> None:
        super().__init__(f"{endpoint.node}: {detail}")
        self.endpoint, self.kind, self.detail, self.reply = endpoint, kind, detail, reply


class _ServerError(Exception):
    def __init__(self, response: httpx.Response, body: bytes) -> None:
        self.response, self.body = response, body


class Forwarder:
    def __init__(self, client: httpx.AsyncClient, holder: TableHolder, strategies: Strategies,
                 signals: EndpointSignals, metrics: RouterMetrics, settings: UpstreamSettings,
                 clock: Callable[[], float] = time.monotonic, shedding: SheddingPolicy | None = None,
                 pools: PerHostTransport | None = None) -> None:
        """`pools`: the client's transport, whose pools of agents that left the table get closed."""
        self.client = client
        self.holder = holder
        self.strategies = strategies
        self.signals = signals
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self.shedding = shedding
        self.pools = pools
        self._urls: dict[tuple[str, str], httpx.URL] = {}
        self._live: frozenset[str] = frozenset()
        self._pruning: set[asyncio.Task[int]] = set()
        holder.on_accept(self._table_accepted)
        if holder.current is not None:
            self._table_accepted(holder.current)

    def _table_accepted(self, table: RoutingTable) -> None:
        self._live = frozenset(e.url for es in table.models.values() for e in es)
        self.signals.retain(self._live)
        self._urls.clear()
        self._prune_pools()

    def _prune_pools(self) -> None:
        """Close, soon, the connection pools of agents no longer in the table (once idle)."""
        if self.pools is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(self.pools.retain(self._live), name="prune-agent-pools")
        except RuntimeError:
            return  # no loop (a table offered before serving): the next table or release prunes
        self._pruning.add(task)
        task.add_done_callback(self._pruning.discard)

    def _url(self, endpoint: RouteEndpoint, path: str) -> httpx.URL:
        """The request URL, parsed once per table (httpx parses a string URL in ~40 us per request)."""
        url = self._urls.get((endpoint.url, path))
        if url is None:
            if len(self._urls) >= MAX_CACHED_URLS:
                self._urls.clear()
            url = self._urls[(endpoint.url, path)] = httpx.URL(endpoint.url.rstrip("/") + path)
        return url

    async def open(self, path: str, request: InferenceRequest, headers: list[tuple[str, str]]) -> UpstreamReply:
        """Send `request` to the best candidate that answers; raises a `RouterError` when none can."""
        table = self.holder.current
        if table is None:
            raise NoRoutingTable("no routing table loaded yet")
        if request.model not in table.models:
            raise ModelNotFound(
                f"model {request.model!r} is not served by pool {table.namespace}/{table.pool}", param="model")
        endpoints = table.endpoints_for(request.model)
        pick = PickRequest(request.model, request.prompt, request.priority, self.clock(), request.session)
        self._shed_if_saturated(pick, endpoints)
        pipeline = self.strategies.for_name(self._strategy(table, request))
        ranked = pipeline.rank(pick, endpoints, self.signals) if endpoints else []
        if not ranked:
            raise NoHealthyEndpoint(
                f"model {request.model!r} has no healthy endpoint (routing table revision {table.revision})")
        failures: list[UpstreamFailure] = []
        for endpoint in ranked[: self.settings.max_attempts]:
            if failures:
                self.metrics.failovers.labels(request.model).inc()
                log.info("failover model=%s from=%s to=%s reason=%s", request.model, failures[-1].endpoint.node,
                         endpoint.node, failures[-1].detail)
            try:
                return await self._attempt(endpoint, path, request, headers)
            except UpstreamFailure as failure:
                failures.append(failure)
        summary = "; ".join(str(f) for f in failures)
        log.warning("all candidates failed model=%s attempts=%d failures=%s", request.model, len(failures), summary)
        if failures[-1].reply is not None:
            return failures[-1].reply  # the last agent answered: its own error tells the client most
        raise UpstreamUnavailable(f"all {len(failures)} candidate endpoints failed: {summary}")

    def _shed_if_saturated(self, pick: PickRequest, endpoints: list[RouteEndpoint]) -> None:
        if self.shedding is None or not endpoints:
            return
        priority = pick.priority or Priority.NORMAL
        views = [self.signals.load(e.url, pick.model, pick.now) for e in endpoints]
        retry_after = shed(priority, views, self.shedding)
        if retry_after is not None:
            self.metrics.shed.labels(pick.model, priority.value).inc()
            raise Overloaded(f"every endpoint of model {pick.model!r} is saturated; {priority.value} requests are "
                             f"refused first (retry after {retry_after} s)", retry_after)

    def _strategy(self, table: RoutingTable, request: InferenceRequest) -> str:
        """The table's strategy, or the one the request's header chose when the pool allows it."""
        chosen = request.strategy
        if chosen is None or chosen == table.strategy:
            return table.strategy
        if chosen not in table.selectable_strategies or not self.strategies.known(chosen):
            allowed = ", ".join([table.strategy, *table.selectable_strategies])
            raise BadRequest(f"{STRATEGY_HEADER}: strategy {chosen!r} is not selectable in pool "
                             f"{table.namespace}/{table.pool} (allowed: {allowed})", param=STRATEGY_HEADER)
        return chosen

    async def _attempt(self, endpoint: RouteEndpoint, path: str, request: InferenceRequest,
                       headers: list[tuple[str, str]]) -> UpstreamReply:
        self.signals.started(endpoint.url)
        self.signals.attempting(endpoint.url, self.clock())
        self.metrics.in_flight.labels(endpoint.node).inc()
        started = self.clock()
        response: httpx.Response | None = None
        chunks: AsyncIterator[bytes] | None = None
        try:
            async with asyncio.timeout(self.settings.first_byte_timeout):
                upstream = self.client.build_request("POST", self._url(endpoint, path), content=request.body,
                                                     headers=headers)
                response = await self.client.send(upstream, stream=True)
                self.signals.connected(endpoint.url)
                if response.status_code >= 500:
                    raise _ServerError(response, await response.aread())
                # The raw stream, not `aiter_raw()`: that closes the response itself when
                # the body ends, and httpx marks a response closed before its close has run,
                # so a close cut short there would never be retried (`UpstreamReply.aclose`
                # closes it, shielded, whatever happens).
                assert isinstance(response.stream, httpx.AsyncByteStream)
                chunks = aiter(response.stream)
                first_chunk = await anext(chunks, b"")
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await _close_stream(chunks, response)
            self._release(endpoint)
            failure = self._failure(endpoint, exc)
            if failure is None:
                raise
            self.metrics.upstream_errors.labels(endpoint.node, failure.kind).inc()
            if self.signals.failed(endpoint.url, self.clock(), trip=failure.kind == "connect"):
                self.metrics.breaker_trips.labels(endpoint.node).inc()
                log.warning("circuit breaker open endpoint=%s reason=%s", endpoint.node, failure.detail)
            raise failure from exc
        self.signals.succeeded(endpoint.url)

        elapsed = self.clock() - started
        self.metrics.first_byte_seconds.labels(request.model, str(request.stream).lower()).observe(elapsed)
        if request.stream:
            self.signals.observe_first_byte(endpoint.url, elapsed)
        return UpstreamReply(
            endpoint, response.status_code, [*downstream_headers(response.headers.multi_items()),
                                             (ENDPOINT_HEADER, endpoint.node)],
            first_chunk, response, chunks, on_close=lambda: self._release(endpoint))

    def _failure(self, endpoint: RouteEndpoint, exc: BaseException) -> UpstreamFailure | None:
        """The failover-worthy failure `exc` is, or None for exceptions that must propagate."""
        if isinstance(exc, _ServerError):
            status = exc.response.status_code
            reply = UpstreamReply(endpoint, status, [*downstream_headers(exc.response.headers.multi_items()),
                                                     (ENDPOINT_HEADER, endpoint.node)], exc.body)
            return UpstreamFailure(endpoint, "http_5xx", f"HTTP {status}", reply)
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            self.signals.connect_failed(endpoint.url, self.clock())
            return UpstreamFailure(endpoint, "connect", f"cannot connect ({exc.__class__.__name__}: {exc})")
        if isinstance(exc, httpx.PoolTimeout):
            return UpstreamFailure(endpoint, "timeout", "no free connection in the router's pool to agents")
        if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
            return UpstreamFailure(endpoint, "timeout", "no response before the first-byte timeout")
        if isinstance(exc, httpx.HTTPError):
            return UpstreamFailure(endpoint, "protocol", f"{exc.__class__.__name__}: {exc}")
        return None

    def _release(self, endpoint: RouteEndpoint) -> None:
        self.signals.finished(endpoint.url)
        self.metrics.in_flight.labels(endpoint.node).dec()
        if endpoint.url not in self._live and self.signals.get(endpoint.url).in_flight == 0:
            self._prune_pools()  # the last request to an agent that left the table

    async def relay(self, reply: UpstreamReply, model: str, write: Callable[[bytes], Awaitable[None]]) -> None:
        """Writes the reply's body chunk by chunk as the agent sends it; always closes the upstream.

        A coroutine rather than an async generator: its `finally` runs however the caller
        ends (a generator never started, or left suspended, never runs its own).
        """
        try:
            if reply.first_chunk:
                await write(reply.first_chunk)
            if reply.chunks is not None:
                async for chunk in reply.chunks:
                    await write(chunk)
        except httpx.HTTPError as exc:
            # Bytes already reached the client: no failover. SSE clients get an error event;
            # other bodies are cut short, which the client sees as a truncated response.
            self.metrics.upstream_errors.labels(reply.endpoint.node, "stream").inc()
            log.warning("upstream broke off mid-response model=%s endpoint=%s error=%r",
                        model, reply.endpoint.node, exc)
            if not reply.is_sse:
                raise
            message = f"endpoint {reply.endpoint.node} broke off the stream: {exc.__class__.__name__}"
            await write(
                f"data: {json.dumps(error_body(message, 'upstream_error', code='stream_interrupted'))}\n\n".encode())
        finally:
            await reply.aclose()
            self.metrics.requests.labels(model, reply.endpoint.node, str(reply.status)).inc()


async def _close_stream(chunks: AsyncIterator[bytes] | None, response: httpx.Response | None) -> None:
    if chunks is not None:
        await chunks.aclose()  # type: ignore[attr-defined]
    if response is not None:
        await response.aclose()
