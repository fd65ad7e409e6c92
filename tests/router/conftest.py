"""Router tests: the real router against fake agents.

Real here: the router (its app served by an in-process uvicorn on 127.0.0.1, or the
`mlxpool router` process in test_cli.py), its HTTP client, its routes-file follower,
and in test_kube_watch.py the real kube-apiserver of tests/conftest.py.

Faked here: the agents. `FakeAgent` is a small real HTTP server on a free loopback port
that answers /v1/completions and /v1/chat/completions with canned JSON or SSE, records
what it received, and can be told to fail (HTTP 500), stall, or hold a stream open.
Integration with real agents serving the real tiny model lives in tests/integration/,
except test_prefix_affinity_agents.py: its point is the real agents' prefix caches.
A fixture fails any test that leaves asyncio tasks behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlxpool.router.app import create_app
from mlxpool.router.settings import (
    RouterSettings,
    SharingSettings,
    SignalSettings,
    TableSourceSettings,
    UpstreamSettings,
)
from mlxpool.routing import RouteEndpoint, RoutingTable

LOOPBACK = "127.0.0.1"


class _Server(uvicorn.Server):
    """uvicorn in the test's event loop, leaving signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


@contextlib.asynccontextmanager
async def serving(app: Any, *, lifespan: str = "off") -> AsyncIterator[str]:
    """Serve `app` on a free loopback port; yields its base URL."""
    server = _Server(uvicorn.Config(app, host=LOOPBACK, port=0, log_level="warning", lifespan=lifespan,
                                    timeout_graceful_shutdown=2))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server stopped during startup")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.should_exit = True
        await task


@dataclass
class FakeAgent:
    """A stand-in for an agent (see the module docstring)."""

    node: str
    status: int = 200
    """Status of every answer; >= 500 answers an OpenAI-shaped error."""
    first_byte_delay: float = 0.0
    """Seconds before the first body byte (streamed answers send headers at once)."""
    stream_chunks: int = 3
    release: asyncio.Queue[None] | None = None
    """If set, a stream sends its first chunk at once and each later one (and [DONE])
    only after taking one item from this queue."""
    break_stream: bool = False
    """Abort the connection after the first streamed chunk."""
    signals: dict[str, Any] | None = None
    """The body of GET /v1/signals (`mlxpool.loadsignals.AgentSignals`); None answers 404."""
    signals_status: int = 200
    signal_polls: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    stream_closed: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/completions", self._handle, methods=["POST"]),
            Route("/v1/chat/completions", self._handle, methods=["POST"]),
            Route("/v1/signals", self._signals, methods=["GET"]),
        ])

    async def _signals(self, request: Request) -> Response:
        self.signal_polls += 1
        if self.signals is None:
            return JSONResponse({"error": {"message": "not found"}}, status_code=404)
        return JSONResponse(self.signals, status_code=self.signals_status)

    async def _handle(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.received.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
        if self.status >= 500:
            return JSONResponse({"error": {"message": f"{self.node} failed", "type": "server_error",
                                           "param": None, "code": None}}, status_code=self.status)
        if body.get("stream"):
            return StreamingResponse(self._events(body), media_type="text/event-stream")
        await asyncio.sleep(self.first_byte_delay)
        return JSONResponse({"node": self.node, "model": body["model"], "choices": [{"text": "hello"}]},
                            status_code=self.status)

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[str]:
        try:
            await asyncio.sleep(self.first_byte_delay)
            for i in range(self.stream_chunks):
                yield f"data: {json.dumps({'node': self.node, 'i': i})}\n\n"
                if i == 0 and self.break_stream:
                    raise ConnectionAbortedError("fake agent breaks the stream")
                if self.release is not None:
                    await self.release.get()
            yield "data: [DONE]\n\n"
        finally:
            self.stream_closed.set()


@pytest.fixture
async def agents() -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await agents("a", status=500)` starts a fake agent and returns it (its `url` set)."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(node: str, **behaviour: Any) -> FakeAgent:
            agent = FakeAgent(node, **behaviour)
            agent.url = await stack.enter_async_context(serving(agent.app()))
            return agent

        yield start


@pytest.fixture
def refused_url() -> Any:
    """A loopback URL that refuses connections: a bound socket that never listens."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    yield f"http://{LOOPBACK}:{sock.getsockname()[1]}"
    sock.close()


def make_table(models: dict[str, list[tuple[str, str] | RouteEndpoint]], revision: int = 1,
               strategy: str = "round-robin", namespace: str = "ns", pool: str = "pool") -> RoutingTable:
    """A table of pool `namespace/pool`; endpoints as (node, url) pairs or RouteEndpoints."""
    return RoutingTable(pool=pool, namespace=namespace, revision=revision, strategy=strategy, models={
        model: [e if isinstance(e, RouteEndpoint) else RouteEndpoint(node=e[0], url=e[1]) for e in endpoints]
        for model, endpoints in models.items()
    })


@dataclass
class RouterUnderTest:
    url: str
    app: Any
    routes_file: Path
    client: httpx.AsyncClient

    async def set_table(self, table: RoutingTable) -> None:
        """Write the routes file and wait until the router serves this revision."""
        write_atomically(self.routes_file, table.to_json())
        await self.wait_for_revision(table.revision)

    async def wait_for_revision(self, revision: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                current = self.app.state.holder.current
                if current is not None and current.revision == revision:
                    return
                await asyncio.sleep(0.01)

    async def complete(self, model: str = "m", **body: Any) -> httpx.Response:
        return await self.client.post("/v1/completions", json={"model": model, "prompt": "hi", **body})

    async def metrics(self) -> str:
        return (await self.client.get("/metrics")).text


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@pytest.fixture
async def start_router(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await start_router(table, max_attempts=2, ...)` serves a router following a routes file."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(table: RoutingTable | None = None, *, strategies_file: Path | None = None,
                        signals: SignalSettings | None = None, sharing: SharingSettings | None = None,
                        **upstream: Any) -> RouterUnderTest:
            routes_file = tmp_path / "routes.json"
            if table is not None:
                write_atomically(routes_file, table.to_json())
            settings = RouterSettings(
                tables=TableSourceSettings(pool=None, routes_file=routes_file, file_poll_interval=0.02),
                upstream=UpstreamSettings(**{"connect_timeout": 2.0, "first_byte_timeout": 10.0, **upstream}),
                signals=signals or SignalSettings(),
                sharing=sharing or SharingSettings(),
                strategies_file=strategies_file,
            )
            app = create_app(settings)
            url = await stack.enter_async_context(serving(app, lifespan="on"))
            client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, trust_env=False, timeout=30))
            router = RouterUnderTest(url, app, routes_file, client)
            if table is not None:
                await router.wait_for_revision(table.revision)
            return router

        yield start


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    for _ in range(5):  # let cancelled tasks finish unwinding
        await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()]
    assert not leaked, f"tasks left running: {leaked}"
