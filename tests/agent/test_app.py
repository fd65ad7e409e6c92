"""The HTTP layer in-process (httpx over ASGI): status codes, error shapes, SSE framing,
readiness per phase, metrics. The engine is conftest's FakeEngine; the real engine is
exercised through real agent processes in test_serving.py.
"""

from __future__ import annotations

import json

import httpx
import pytest

from mlxpool.agent.app import create_app
from mlxpool.agent.lifecycle import Phase
from mlxpool.agent.metrics import AgentMetrics


@pytest.fixture
async def client(fake_agent):
    app = create_app(fake_agent.plane, AgentMetrics(fake_agent.models, fake_agent.lifecycle))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent") as c:
        yield c


def sse_payloads(text: str) -> list[str]:
    events = text.split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") for e in events[:-1]), events
    return [e[len("data: "):] for e in events[:-1]]


async def test_ready_follows_the_phase_and_health_does_not(client, fake_agent):
    for phase, code, status in [(Phase.LOADING, 503, "loading"), (Phase.READY, 200, "ready"),
                                (Phase.DRAINING, 503, "draining")]:
        fake_agent.lifecycle.set_phase(phase)
        ready = await client.get("/ready")
        assert (ready.status_code, ready.json()["status"]) == (code, status)
        assert (await client.get("/health")).status_code == 200
    fake_agent.lifecycle.set_phase(Phase.READY)
    fake_agent.engine.healthy = False
    assert (await client.get("/ready")).status_code == 503


async def test_completion_json(client):
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": "Hi", "max_tokens": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["choices"] == [{"index": 0, "text": "Hello world", "finish_reason": "length", "logprobs": None}]
    assert "usage" in body


async def test_streams_are_server_sent_events_ending_in_done(client):
    r = await client.post("/v1/chat/completions", json={
        "model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello world"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in chunks[-1]


@pytest.mark.parametrize(("body", "status", "param", "needle"), [
    ({"model": "nope", "prompt": "x"}, 404, "model", "not served"),
    ({"prompt": "x"}, 400, "model", "Field required"),
    ({"model": "fake"}, 400, "prompt", "Field required"),
    ({"model": "fake", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"model": "fake", "prompt": "x", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"model": "fake", "prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"model": "fake", "prompt": "x", "n": 2}, 400, "n", "less than or equal to 1"),
    ({"model": "fake", "prompt": "x", "stop": ["ok", ""]}, 400, "stop", "must not be empty"),
    ({"model": "fake", "prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ({"model": "fake", "prompt": "x", "priority": "urgent"}, 400, "priority", "critical"),
    ({"model": "fake", "prompt": ""}, 400, "prompt", "empty"),
])
async def test_bad_requests_get_openai_errors_naming_the_field(client, body, status, param, needle):
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert needle in error["message"]


async def test_bad_chat_messages_name_the_field(client):
    r = await client.post("/v1/chat/completions", json={"model": "fake", "messages": []})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "messages")
    wizard = [{"role": "wizard", "content": "x"}]
    r = await client.post("/v1/chat/completions", json={"model": "fake", "messages": wizard})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "messages.0.role")


async def test_malformed_json_is_a_400(client):
    r = await client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "JSON" in r.json()["error"]["message"]


async def test_draining_answers_503_with_retry_after(client, fake_agent):
    fake_agent.lifecycle.set_phase(Phase.DRAINING)
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "draining"


async def test_engine_failure_mid_stream_is_reported_in_the_stream(client, fake_agent):
    fake_agent.engine.fail_with = "the engine crashed: boom"
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": "x", "stream": True})
    assert r.status_code == 200
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["error"]["code"] == "generation_failed"
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": "x"})
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]


async def test_models_endpoints(client):
    assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["fake"]
    assert (await client.get("/v1/models/fake")).json()["id"] == "fake"
    assert (await client.get("/v1/models/other")).status_code == 404


async def test_metrics_count_requests_by_route_and_export_engine_gauges(client, fake_agent):
    fake_agent.engine.stats.running, fake_agent.engine.stats.waiting = 3, 2
    await client.post("/v1/completions", json={"model": "fake", "prompt": "x"})
    await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    await client.get("/no/such/path")
    text = (await client.get("/metrics")).text
    for line in [
        'mlxpool_http_requests_total{endpoint="/v1/completions",method="POST",status="200"} 1.0',
        'mlxpool_http_requests_total{endpoint="/v1/completions",method="POST",status="404"} 1.0',
        'mlxpool_http_requests_total{endpoint="unmatched",method="GET",status="404"} 1.0',
        'vllm:num_requests_running{model_name="fake"} 3.0',
        'vllm:num_requests_waiting{model_name="fake"} 2.0',
        'mlxpool_requests_running{model_name="fake"} 3.0',
        'mlxpool_requests_waiting{model_name="fake"} 2.0',
    ]:
        assert line in text, line
