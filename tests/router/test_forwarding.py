"""Forwarding through a real router to fake agents: relaying, spreading, failover, errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from mlxpool.router.app import create_app
from mlxpool.router.settings import RouterSettings, TableSourceSettings
from mlxpool.routing import RouteEndpoint

from .conftest import make_table


async def test_completion_is_forwarded_with_headers_and_body(agents, start_router):
    agent = await agents("a")
    router = await start_router(make_table({"m": [("a", agent.url)]}))

    response = await router.client.post(
        "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3},
        headers={"authorization": "Bearer secret", "x-priority": "high", "x-request-id": "req-1"})

    assert response.status_code == 200, response.text
    assert response.json()["node"] == "a"
    assert response.headers["x-mlxpool-endpoint"] == "a"
    [seen] = agent.received
    assert seen["path"] == "/v1/completions"
    assert seen["body"] == {"model": "m", "prompt": "hi", "max_tokens": 3}
    assert seen["headers"]["authorization"] == "Bearer secret"
    assert seen["headers"]["x-priority"] == "high"
    assert seen["headers"]["x-request-id"] == "req-1"


async def test_chat_stream_is_relayed_chunk_by_chunk(agents, start_router):
    release: asyncio.Queue[None] = asyncio.Queue()
    agent = await agents("a", release=release, stream_chunks=3)
    router = await start_router(make_table({"m": [("a", agent.url)]}))

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with router.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = (line async for line in response.aiter_lines() if line)
        # The agent sends each next event only when released: every event can only arrive
        # here if the router passes chunks through as they come, without buffering.
        for i in range(3):
            event = await asyncio.wait_for(anext(events), 5)
            assert json.loads(event.removeprefix("data: ")) == {"node": "a", "i": i}
            release.put_nowait(None)
        assert await asyncio.wait_for(anext(events), 5) == "data: [DONE]"


async def test_round_robin_spreads_evenly_in_turn(agents, start_router):
    fleet = [await agents(n) for n in ("a", "b", "c")]
    router = await start_router(make_table({"m": [(a.node, a.url) for a in fleet]}))

    nodes = [(await router.complete()).json()["node"] for _ in range(6)]

    assert nodes == ["a", "b", "c", "a", "b", "c"]


async def test_round_robin_follows_weights(agents, start_router):
    a, b = await agents("a"), await agents("b")
    router = await start_router(make_table({"m": [RouteEndpoint(node="a", url=a.url, weight=2),
                                                  RouteEndpoint(node="b", url=b.url, weight=1)]}))

    nodes = [(await router.complete()).json()["node"] for _ in range(9)]

    assert nodes.count("a") == 6 and nodes.count("b") == 3


async def test_failover_when_an_endpoint_refuses_connections(agents, start_router, refused_url):
    good = await agents("good")
    router = await start_router(make_table({"m": [("dead", refused_url), ("good", good.url)]}))

    responses = [await router.complete() for _ in range(4)]

    assert [r.status_code for r in responses] == [200] * 4
    assert {r.json()["node"] for r in responses} == {"good"}
    metrics = await router.metrics()
    assert 'mlxpool_router_failovers_total{model="m"} 1.0' in metrics  # then the dead one cools down
    assert 'mlxpool_router_upstream_errors_total{endpoint="dead",kind="connect"} 1.0' in metrics


async def test_failover_when_an_endpoint_answers_500(agents, start_router):
    broken, good = await agents("broken", status=500), await agents("good")
    router = await start_router(make_table({"m": [("broken", broken.url), ("good", good.url)]}))

    responses = [await router.complete() for _ in range(4)]

    assert [r.json()["node"] for r in responses] == ["good"] * 4
    assert len(broken.received) == 2  # round-robin keeps offering it first every other turn
    assert 'mlxpool_router_upstream_errors_total{endpoint="broken",kind="http_5xx"} 2.0' in await router.metrics()


@pytest.mark.parametrize("stream", [True, False])
async def test_failover_when_the_first_byte_is_late(agents, start_router, stream):
    # Streamed: the agent sends headers at once and stalls the body; not streamed: it stalls the headers.
    slow, good = await agents("slow", first_byte_delay=5), await agents("good")
    # 1 s, not less: the budget covers the router's first connect to the agent, which took
    # over 0.3 s once on the loaded shared machine (the request never reached `slow`).
    router = await start_router(make_table({"m": [("slow", slow.url), ("good", good.url)]}),
                                first_byte_timeout=1.0)

    response = await router.complete(stream=stream)

    assert response.status_code == 200
    assert response.headers["x-mlxpool-endpoint"] == "good"
    assert len(slow.received) == 1
    assert 'mlxpool_router_upstream_errors_total{endpoint="slow",kind="timeout"} 1.0' in await router.metrics()


async def test_failover_is_bounded_by_max_attempts(agents, start_router):
    fleet = [await agents(n, status=503) for n in ("a", "b", "c")]
    router = await start_router(make_table({"m": [(a.node, a.url) for a in fleet]}), max_attempts=2)

    response = await router.complete()

    # The last agent's own answer is relayed when every attempt got an HTTP error.
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "b failed"
    assert [len(a.received) for a in fleet] == [1, 1, 0]


async def test_every_endpoint_unreachable_is_502(start_router, refused_url):
    router = await start_router(make_table({"m": [("x", refused_url), ("y", refused_url + "/")]}))

    response = await router.complete()

    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_unavailable" and "x: cannot connect" in error["message"]


async def test_no_retry_once_bytes_were_relayed(agents, start_router):
    breaking, other = await agents("breaking", break_stream=True), await agents("other")
    router = await start_router(make_table({"m": [("breaking", breaking.url), ("other", other.url)]}))

    response = await router.complete(stream=True)

    events = [json.loads(line.removeprefix("data: ")) for line in response.text.splitlines() if line]
    assert events[0] == {"node": "breaking", "i": 0}
    assert events[-1]["error"]["code"] == "stream_interrupted"
    assert other.received == []


async def test_client_disconnect_closes_the_upstream_stream(agents, start_router):
    agent = await agents("a", release=asyncio.Queue())  # never fed: the stream would last forever
    router = await start_router(make_table({"m": [("a", agent.url)]}))

    async with router.client.stream("POST", "/v1/completions", json={"model": "m", "stream": True}) as response:
        await anext(response.aiter_lines())
    # Leaving the block closed the client's connection; the router must close the agent's.
    await asyncio.wait_for(agent.stream_closed.wait(), 5)
    await _wait_until_idle(router)


async def test_client_disconnect_before_the_first_byte_cancels_the_upstream(agents, start_router):
    agent = await agents("a", first_byte_delay=60)
    router = await start_router(make_table({"m": [("a", agent.url)]}))

    with pytest.raises(httpx.ReadTimeout):
        await router.client.post("/v1/completions", json={"model": "m", "stream": True}, timeout=0.3)

    await asyncio.wait_for(agent.stream_closed.wait(), 5)
    await _wait_until_idle(router)
    assert 'status="499"' in await router.metrics()


async def _wait_until_idle(router) -> None:
    """In-flight counts return to zero once every upstream is closed."""
    async with asyncio.timeout(5):
        while any(router.app.state.signals.get(e.url).in_flight
                  for es in router.app.state.holder.current.models.values() for e in es):
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(("body", "status", "code", "needle"), [
    (b'{"model": "m", "prompt": ', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    (b'{"prompt": "hi"}', 400, None, "missing required field 'model'"),
    (b'{"model": "m", "priority": "urgent"}', 400, None, "priority must be one of"),
    (b'{"model": "m", "stream": "yes"}', 400, None, "'stream' must be a boolean"),
    (b'{"model": "nope", "prompt": "hi"}', 404, "model_not_found", "'nope'"),
    (b'{"model": "drained", "prompt": "hi"}', 503, "no_healthy_endpoint", "no healthy endpoint"),
])
async def test_errors_use_the_openai_shape(agents, start_router, body, status, code, needle):
    agent = await agents("a")
    router = await start_router(make_table({
        "m": [("a", agent.url)],
        "drained": [RouteEndpoint(node="a", url=agent.url, healthy=False),
                    RouteEndpoint(node="b", url=agent.url, weight=0)],
    }))

    response = await router.client.post("/v1/completions", content=body, headers={"content-type": "application/json"})

    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and needle in error["message"]
    assert agent.received == []


async def test_bad_priority_header_is_400(agents, start_router):
    agent = await agents("a")
    router = await start_router(make_table({"m": [("a", agent.url)]}))

    response = await router.client.post("/v1/completions", json={"model": "m"}, headers={"x-priority": "asap"})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "x-priority"


async def test_unknown_path_is_404_in_openai_shape(start_router):
    router = await start_router(make_table({"m": []}))

    response = await router.client.get("/v1/nothing")

    assert response.status_code == 404
    assert "error" in response.json()


async def test_inference_paths_keep_fastapi_answers_for_other_methods(start_router):
    router = await start_router(make_table({"m": []}))

    response = await router.client.get("/v1/chat/completions")

    assert response.status_code == 405
    assert "error" in response.json()


async def test_inference_before_the_lifespan_is_503_in_openai_shape(tmp_path):
    settings = RouterSettings(tables=TableSourceSettings(pool=None, routes_file=tmp_path / "routes.json"))
    app = create_app(settings)  # its lifespan never runs: no forwarder yet
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
        response = await client.post("/v1/chat/completions", json={"model": "m"})

    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "starting"


async def test_models_lists_the_table(agents, start_router):
    agent = await agents("a")
    router = await start_router(make_table({"m": [("a", agent.url)], "other": []}))

    listing = (await router.client.get("/v1/models")).json()

    assert listing["object"] == "list"
    assert [(m["id"], m["object"]) for m in listing["data"]] == [("m", "model"), ("other", "model")]


async def test_metrics_count_requests_and_show_the_revision(agents, start_router):
    agent = await agents("a")
    router = await start_router(make_table({"m": [("a", agent.url)]}, revision=7))
    await router.complete()
    await router.complete(model="unknown")

    metrics = await router.metrics()

    assert 'mlxpool_router_requests_total{endpoint="a",model="m",status="200"} 1.0' in metrics
    assert 'mlxpool_router_requests_total{endpoint="",model="",status="404"} 1.0' in metrics
    assert "mlxpool_router_table_revision 7.0" in metrics
