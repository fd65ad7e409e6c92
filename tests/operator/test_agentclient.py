"""The operations-API client against a real local HTTP server (aiohttp on 127.0.0.1):
bearer token, typed answers, the agent's error messages, unreachable agents."""

from __future__ import annotations

import httpx
import pytest
from aiohttp import web

from mlxpool.agentapi import CachePhase, LoadModelRequest, ModelPhase, StageRequest
from mlxpool.operator.io.agentclient import AgentClient, AgentError, AgentUnreachable


@pytest.fixture
async def agent():
    """A tiny stand-in speaking the contract: it records what it was sent."""
    seen: list[tuple[str, str, str | None, dict | None]] = []

    async def record(request: web.Request) -> None:
        body = await request.json() if request.can_read_body else None
        seen.append((request.method, request.path, request.headers.get("Authorization"), body))

    async def load(request: web.Request) -> web.Response:
        await record(request)
        if (await request.json())["name"] == "huge":
            return web.json_response({"error": {"message": "not enough free memory", "type": "capacity",
                                                "param": None, "code": None}}, status=507)
        return web.json_response({"name": "tiny", "phase": "loading"}, status=202)

    async def cache_get(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"detail": "no such entry"}, status=404)

    async def stage(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"key": request.match_info["key"], "source": "hf://o/r", "phase": "Pending"},
                                 status=202)

    async def unload(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"unexpected": True})

    app = web.Application()
    app.router.add_post("/v1/node/models", load)
    app.router.add_delete("/v1/node/models/{name}", unload)
    app.router.add_get("/v1/node/cache/{key}", cache_get)
    app.router.add_put("/v1/node/cache/{key}", stage)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_calls_carry_the_token_and_answers_are_typed(agent):
    url, seen = agent
    async with httpx.AsyncClient() as http:
        client = AgentClient(http, "s3cret")
        state = await client.load(url, LoadModelRequest(name="tiny", path="/m/tiny"))
        entry = await client.stage(url, "k1", StageRequest(source="hf://o/r"))
        assert await client.cache_entry(url, "missing") is None
    assert state.phase is ModelPhase.LOADING and entry.phase is CachePhase.PENDING
    assert seen[0] == ("POST", "/v1/node/models", "Bearer s3cret",
                       {"name": "tiny", "path": "/m/tiny", "warm": True, "pin": False})
    assert seen[1][:3] == ("PUT", "/v1/node/cache/k1", "Bearer s3cret")


async def test_errors_carry_the_agents_message(agent):
    url, _ = agent
    async with httpx.AsyncClient() as http:
        client = AgentClient(http, None)
        with pytest.raises(AgentError) as refused:
            await client.load(url, LoadModelRequest(name="huge", path="/m/huge"))
        assert (refused.value.status, refused.value.message) == (507, "not enough free memory")
        with pytest.raises(AgentError, match="answer is not a ModelState"):
            await client.unload(url, "tiny")


async def test_an_agent_that_is_gone_is_unreachable():
    async with httpx.AsyncClient() as http:
        with pytest.raises(AgentUnreachable) as gone:
            await AgentClient(http, "t", timeout=1).node("http://127.0.0.1:9")
    assert gone.value.status == 0 and "ConnectError" in str(gone.value)
