"""The router's HTTP app: a factory, a lifespan owning the shared resources, thin routes.

Routes parse, call the `Forwarder`, and wrap its reply; every error the router answers
itself is a `RouterError` turned into the OpenAI error shape by one handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlxpool import __version__
from mlxpool.httpguards import ASGIApp, Receive, Scope, Send, SizeLimitsMiddleware, UnexpectedErrorsMiddleware
from mlxpool.httptransports import PerHostTransport
from mlxpool.openapischema import install_openapi
from mlxpool.priorities import Priority
from mlxpool.router.errors import NoRoutingTable, Overloaded, RouterError, error_body
from mlxpool.router.forwarding import Forwarder
from mlxpool.router.metrics import RouterMetrics
from mlxpool.router.picking.profiles import Strategies, load_strategies
from mlxpool.router.picking.shedding import SheddingPolicy
from mlxpool.router.picking.signals import EndpointSignals
from mlxpool.router.polling import SignalPoller
from mlxpool.router.relaying import INFERENCE_PATHS, InferenceEndpoint
from mlxpool.router.settings import RouterSettings, SheddingSettings, TableSourceSettings, UpstreamSettings
from mlxpool.router.sharing import PrefixSharing
from mlxpool.router.tables.files import follow_file
from mlxpool.router.tables.holder import TableHolder

log = logging.getLogger(__name__)

class RouterApp(FastAPI):
    """FastAPI, except for the two inference routes: `inference` (plain ASGI) serves those.

    Set by the lifespan once the forwarder exists; until then (and without a lifespan)
    FastAPI's own routes answer 503.
    """

    inference: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.inference is not None and scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"] in INFERENCE_PATHS):
            await self.inference(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def tls_verification(settings: UpstreamSettings) -> ssl.SSLContext:
    """How agents' certificates are checked: against `ca_file`, else the system's store."""
    if settings.ca_file is None:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=str(settings.ca_file))


def upstream_transport(settings: UpstreamSettings) -> PerHostTransport:
    """A small pool per agent: one pool for all agents made httpcore scan every connection
    at each request start and end (~40% of the router's CPU at 8 agents under a closed
    loop: `mlxpool.httptransports`)."""
    return PerHostTransport(max_connections=settings.max_connections,
                            max_keepalive_connections=settings.max_keepalive_connections,
                            verify=tls_verification(settings))


def http_client(settings: UpstreamSettings, transport: PerHostTransport) -> httpx.AsyncClient:
    """The one client every request to every agent goes through."""
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout,
                              write=settings.read_timeout, pool=settings.connect_timeout),
        trust_env=False,  # agents are reached directly, never through an environment proxy
    )


async def table_source(settings: TableSourceSettings, holder: TableHolder,
                       stack: AsyncExitStack) -> Coroutine[Any, Any, None]:
    """The coroutine that keeps `holder` current: the routes file, else the pool's ConfigMap."""
    if settings.routes_file is not None:
        return follow_file(holder, settings.routes_file, settings.file_poll_interval)
    # Imported here so that a router following a file never loads the Kubernetes client.
    from mlxpool.kubeclients import open_api_client
    from mlxpool.router.tables.configmaps import ConfigMapFollower

    assert settings.pool is not None
    api = await open_api_client(settings.kubeconfig)
    stack.push_async_callback(api.close)
    return ConfigMapFollower(api, holder, settings.pool, settings).run()


def create_app(settings: RouterSettings, metrics: RouterMetrics | None = None) -> RouterApp:
    strategies = Strategies(load_strategies(settings.strategies_file))
    metrics = metrics if metrics is not None else RouterMetrics()
    holder = TableHolder(settings.tables.pool)
    holder.on_accept(metrics.table_accepted)
    holder.on_result(metrics.table_offered)
    signals = EndpointSignals(max_age=settings.signals.max_age, stale_policy=settings.signals.stale_policy,
                              breaker_failures=settings.upstream.breaker_failures,
                              breaker_open_seconds=settings.upstream.breaker_open_seconds)
    shedding = shedding_policy(settings.shedding)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            pools = upstream_transport(settings.upstream)
            client = await stack.enter_async_context(http_client(settings.upstream, pools))
            forwarder = Forwarder(client, holder, strategies, signals, metrics, settings.upstream, shedding=shedding,
                                  pools=pools)
            app.state.forwarder = forwarder
            assert isinstance(app, RouterApp)
            # Outermost first, as the middleware of FastAPI's stack below.
            app.inference = UnexpectedErrorsMiddleware(SizeLimitsMiddleware(
                InferenceEndpoint(forwarder, holder, metrics), limits=settings.limits))
            stack.callback(setattr, app, "inference", None)
            task = asyncio.create_task(await table_source(settings.tables, holder, stack), name="routing-table-source")
            task.add_done_callback(_log_source_end)
            stack.push_async_callback(_cancel, task)
            if settings.signals.interval > 0:
                # Its own small client: polls never wait behind inference connections.
                poll_pools = PerHostTransport(max_connections=4, max_keepalive_connections=2,
                                              verify=tls_verification(settings.upstream))
                poll_client = await stack.enter_async_context(httpx.AsyncClient(transport=poll_pools, trust_env=False))
                app.state.poller = SignalPoller(poll_client, holder, signals, metrics, settings.signals,
                                                pools=poll_pools)
                poller = asyncio.create_task(app.state.poller.run(), name="signal-poller")
                poller.add_done_callback(_log_poller_end)
                stack.push_async_callback(_cancel, poller)
            if settings.sharing.redis_url is not None:
                app.state.sharing = PrefixSharing(settings.sharing, strategies.prefix_indexes())
                sharing = asyncio.create_task(app.state.sharing.run(), name="prefix-sharing")
                sharing.add_done_callback(_log_sharing_end)
                stack.push_async_callback(_cancel, sharing)
            if settings.first_table_wait > 0:
                await _first_table(holder, settings.first_table_wait)
            yield

    app = RouterApp(title="mlxpool router", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    # Innermost first: sizes checked before the body is read; anything unexpected answered as JSON.
    app.add_middleware(SizeLimitsMiddleware, limits=settings.limits)
    app.add_middleware(UnexpectedErrorsMiddleware)
    app.state.holder = holder
    app.state.metrics = metrics
    app.state.signals = signals

    @app.exception_handler(RouterError)
    async def router_error(request: Request, exc: RouterError) -> JSONResponse:
        headers = dict(exc.headers or {})
        if isinstance(exc, Overloaded):
            headers["Retry-After"] = str(exc.retry_after)
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(f"{request.method} {request.url.path[:256]}: {exc.detail}", "invalid_request_error")
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    def starting() -> JSONResponse:
        """Reached only before the lifespan started: `RouterApp.inference` serves these routes."""
        body = error_body("the router is starting; retry shortly", "server_error", code="starting")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.post("/v1/completions")
    async def completions() -> JSONResponse:
        return starting()

    @app.post("/v1/chat/completions")
    async def chat_completions() -> JSONResponse:
        return starting()

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        table = holder.current
        if table is None:
            raise NoRoutingTable("no routing table loaded yet")
        created = int(table.updated.timestamp()) if table.updated else 0
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "mlxpool"} for name in table.models
        ]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        table = holder.current
        if table is None:
            return JSONResponse({"status": "waiting", "reason": "no routing table loaded yet"}, status_code=503)
        return JSONResponse({"status": "ready", "revision": table.revision, "strategy": table.strategy})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        metrics.loop_tasks.set(len(asyncio.all_tasks()))
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)

    # The router reads only these fields; the rest of the body goes to the agent as it came.
    install_openapi(app, {("POST", "/v1/completions"): INFERENCE_BODY,
                          ("POST", "/v1/chat/completions"): INFERENCE_BODY})
    return app


INFERENCE_BODY: dict[str, Any] = {
    "type": "object", "required": ["model"], "additionalProperties": True,
    "description": "An OpenAI completion or chat completion request; the router reads `model`, `stream` and "
                   "`priority`, and relays the whole body to the agent (its schema: the agent's /openapi.json).",
    "properties": {"model": {"type": "string", "minLength": 1}, "stream": {"type": "boolean"},
                   "priority": {"type": "string", "enum": [p.value for p in Priority]}},
}


def shedding_policy(settings: SheddingSettings) -> SheddingPolicy:
    tiers = {Priority.BACKGROUND: settings.background, Priority.LOW: settings.low,
             Priority.NORMAL: settings.normal, Priority.HIGH: settings.high}
    return SheddingPolicy({p: t for p, t in tiers.items() if t is not None}, settings.mean_output_tokens)


def _log_source_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("routing table source stopped; the table will not change any more",
                  exc_info=task.exception())


def _log_sharing_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("prefix sharing stopped; replicas place prefixes on their own", exc_info=task.exception())


def _log_poller_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("signal poller stopped; agents' load reports will go stale", exc_info=task.exception())


async def _first_table(holder: TableHolder, timeout: float) -> None:
    """Until the holder has a table, at most `timeout` seconds (then serve anyway: 503s say why)."""
    loaded = asyncio.Event()
    holder.on_accept(lambda _table: loaded.set())
    if holder.current is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(loaded.wait(), timeout)
    if holder.current is None:
        log.warning("no routing table after %.1fs; listening anyway (503 until one loads)", timeout)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
