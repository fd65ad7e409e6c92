"""The agent's HTTP API: a FastAPI app factory with thin routes.

Routes parse the body (FastAPI + the `serving.openai` models) and the headers the data
plane understands (`x-priority`, `x-deadline-ms`), call the data plane, and
serialize: JSON, or Server-Sent Events (`sse`). The inference endpoints take the
optional API key (`auth.require_api_key`); probes, /metrics and /v1/signals are open.
The one HTTP concern handled here is the client going away: the request's
generation is cancelled at once, freeing its batch slot (streaming: the SSE
response watches the connection; before the stream starts and for whole responses:
a watcher on the ASGI receive channel, `disconnects`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from mlxpool import __version__
from mlxpool.agent.errors import AgentError, InvalidRequest, TooManyWatches
from mlxpool.agent.http.auth import Credentials, KeyIdentity, require_api_key
from mlxpool.agent.http.disconnects import disconnected
from mlxpool.agent.http.errors import EXCEPTION_HANDLERS
from mlxpool.agent.http.metrics import AgentMetrics, HttpMetricsMiddleware
from mlxpool.agent.http.operations import OPS_BODIES
from mlxpool.agent.http.sse import EventStreamResponse
from mlxpool.agent.serving import openai as api
from mlxpool.agent.serving.dataplane import DataPlane, RequestHints
from mlxpool.agent.serving.signals import agent_signals
from mlxpool.httpguards import SizeLimits, SizeLimitsMiddleware, UnexpectedErrorsMiddleware
from mlxpool.loadsignals import SIGNALS_PATH
from mlxpool.openapischema import install_openapi
from mlxpool.priorities import DEADLINE_HEADER, PRIORITY_HEADER, TENANT_HEADER

log = logging.getLogger(__name__)

T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"
HEALTH_WATCHES = 16
"""`GET /health/watch` streams open at once (operator replicas, a few tools): each holds a connection."""
WATCH_INTERVAL_RANGE = (0.1, 300.0)


def create_app(
    dataplane: DataPlane, metrics: AgentMetrics, credentials: Credentials | None = None, ops: APIRouter | None = None,
    limits: SizeLimits | None = None, publish_signals: bool = True,
) -> FastAPI:
    app = FastAPI(title="mlxpool node agent", version=__version__, exception_handlers=EXCEPTION_HANDLERS)
    app.state.credentials = credentials or Credentials()
    inference = [Depends(require_api_key)]
    # Innermost first: sizes are checked before anything reads the body; what is refused is
    # still counted; anything no handler expected is answered as JSON without dropping keep-alive.
    app.add_middleware(SizeLimitsMiddleware, limits=limits or SizeLimits())
    app.add_middleware(HttpMetricsMiddleware, counter=metrics.http_requests)
    app.add_middleware(UnexpectedErrorsMiddleware)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: 200 for as long as the process serves HTTP."""
        return JSONResponse({"status": "alive"})

    watching = [0]  # open /health/watch streams

    @app.get("/health/watch")
    async def health_watch(interval: float = 10.0) -> StreamingResponse:
        """Liveness as a stream: a line now and every `interval` seconds for as long as the
        process serves. A watcher (the operator) hears of the agent's death the moment its
        connection closes, without polling `/health`; the lines prove a hung one alive."""
        low, high = WATCH_INTERVAL_RANGE
        if not low <= interval <= high:
            raise InvalidRequest(f"interval must be between {low:g} and {high:g} seconds, got {interval:g}",
                                 param="interval")
        if watching[0] >= HEALTH_WATCHES:
            raise TooManyWatches(f"{HEALTH_WATCHES} health watches are open already (the most this agent keeps)")
        watching[0] += 1

        async def lines() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b'{"status":"alive"}\n'
                    await asyncio.sleep(interval)
            finally:
                watching[0] -= 1

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers={"Cache-Control": "no-cache"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: 200 once the model is loaded and warm; 503 while loading or draining."""
        is_ready, body = dataplane.readiness()
        return JSONResponse(body, status_code=200 if is_ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.loop_tasks.set(len(asyncio.all_tasks()))
        # Off the loop: the collectors measure weight residency (mincore over every array).
        content, content_type = await asyncio.to_thread(metrics.render)
        return Response(content, media_type=content_type)

    if publish_signals:  # off (runtime.yaml horizontal_scaling.publish_signals): 404, routers use local counts
        @app.get(SIGNALS_PATH)
        async def signals() -> Response:
            """Load signals for routers (`mlxpool.loadsignals`), open like /metrics."""
            return _json(agent_signals(dataplane.models, dataplane.lifecycle))

    @app.get("/v1/models", dependencies=inference)
    async def list_models() -> Response:
        return _json(dataplane.list_models())

    @app.get("/v1/models/{model:path}", dependencies=inference)
    async def get_model(model: str) -> Response:
        return _json(api.ModelCard(id=model, created=dataplane.models.get(model).created))

    @app.post("/v1/completions", dependencies=inference)
    async def completions(body: api.CompletionRequest, request: Request) -> Response:
        hints = _hints(request)
        if body.stream:
            return EventStreamResponse(await _unless_disconnected(request, dataplane.stream_completion(body, hints)))
        return _json(await _unless_disconnected(request, dataplane.complete(body, hints)))

    @app.post("/v1/chat/completions", dependencies=inference)
    async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Response:
        hints = _hints(request)
        if body.stream:
            return EventStreamResponse(await _unless_disconnected(request, dataplane.stream_chat(body, hints)))
        return _json(await _unless_disconnected(request, dataplane.chat(body, hints)))

    if ops is not None:
        app.include_router(ops)  # the operations API (/v1/node), behind the ops token
    install_openapi(app, OPS_BODIES if ops is not None else None)  # 400 not 422; the ops bodies
    return app


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _hints(request: Request) -> RequestHints:
    headers = request.headers
    identity = getattr(request.state, "api_key", None)
    return RequestHints(priority=headers.get(PRIORITY_HEADER), deadline_ms=headers.get(DEADLINE_HEADER),
                        tenant=headers.get(TENANT_HEADER),
                        key_ref=identity.ref if isinstance(identity, KeyIdentity) else None,
                        key_tenant=identity.tenant if isinstance(identity, KeyIdentity) else None)


class _ClientGone(AgentError):
    status_code = CLIENT_CLOSED_REQUEST
    error_type = "client_closed_request"


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():  # the client left (or we were cancelled): stop generating
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if task.cancelled():
        log.info("client disconnected before the response path=%s", request.url.path)
        raise _ClientGone("the client disconnected")
    return task.result()
