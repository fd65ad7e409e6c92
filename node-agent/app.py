"""The agent's HTTP API: a FastAPI app factory with thin routes.

Routes parse the body (FastAPI + the `openai_api` models), call the data plane, and
serialize: JSON, or Server-Sent Events (`data: {...}` chunks, then `data: [DONE]`).
The one HTTP concern handled here is the client going away: the request's generation
is cancelled at once, freeing its batch slot (streaming: Starlette cancels the body
on disconnect; non-streaming: a watcher on the ASGI receive channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from mlxpool import __version__
from mlxpool.agent import openai_api as api
from mlxpool.agent.dataplane import DataPlane
from mlxpool.agent.errors import EXCEPTION_HANDLERS, AgentError, error_body
from mlxpool.agent.metrics import AgentMetrics, HttpMetricsMiddleware

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"


def create_app(dataplane: DataPlane, metrics: AgentMetrics) -> FastAPI:
    app = FastAPI(title="mlxpool node agent", version=__version__, exception_handlers=EXCEPTION_HANDLERS)
    app.add_middleware(HttpMetricsMiddleware, counter=metrics.http_requests)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: 200 for as long as the process serves HTTP."""
        return JSONResponse({"status": "alive"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: 200 once the model is loaded and warm; 503 while loading or draining."""
        is_ready, body = dataplane.readiness()
        return JSONResponse(body, status_code=200 if is_ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return _json(dataplane.list_models())

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Response:
        return _json(api.ModelCard(id=model, created=dataplane.models.get(model).created))

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request) -> Response:
        if body.stream:
            return _sse(await dataplane.stream_completion(body))
        return _json(await _unless_disconnected(request, dataplane.complete(body)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Response:
        if body.stream:
            return _sse(await dataplane.stream_chat(body))
        return _json(await _unless_disconnected(request, dataplane.chat(body)))

    return app


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _sse(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        # aclosing: on disconnect the cancellation closes the chunk stream right away,
        # which cancels the request in the engine.
        async with aclosing(chunks) as stream:  # type: ignore[type-var]
            try:
                async for chunk in stream:
                    yield f"data: {chunk.model_dump_json()}\n\n"
            except AgentError as exc:  # headers are sent: report the error in-stream
                yield f"data: {json.dumps(error_body(exc.message, exc.error_type, exc.param, exc.code))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _ClientGone(AgentError):
    status_code = CLIENT_CLOSED_REQUEST
    error_type = "client_closed_request"


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
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


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
