"""The HTTP layer in-process (httpx over ASGI): status codes, error shapes, SSE framing,
readiness per phase, auth, metrics. The engine is conftest's FakeEngine; the real
engine is exercised through real agent processes in test_serving.py.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import APIRouter, Depends

from mlxpool.agent.errors import DeadlineExceeded, QueueFull
from mlxpool.agent.http.app import create_app
from mlxpool.agent.http.auth import Credentials, require_ops_token
from mlxpool.agent.http.metrics import AgentMetrics
from mlxpool.agent.serving.lifecycle import Phase
from mlxpool.priorities import Priority


def make_client(fake_agent, credentials: Credentials | None = None) -> httpx.AsyncClient:
    metrics = AgentMetrics(fake_agent.models, fake_agent.lifecycle)
    fake_agent.plane.observer = metrics
    app = create_app(fake_agent.plane, metrics, credentials)
    ops = APIRouter(dependencies=[Depends(require_ops_token)])  # how the operations API mounts

    @ops.get("/v1/node")
    async def node() -> dict:
        return {"name": "test"}

    app.include_router(ops)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent")


@pytest.fixture
async def client(fake_agent):
    async with make_client(fake_agent) as c:
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
    assert body["usage"]["total_tokens"] == 5


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
    ({"model": "fake", "prompt": "x", "max_tokens": -5}, 400, "max_tokens", "greater than or equal to 1"),
    ({"model": "fake", "prompt": "x", "max_tokens": 10**12}, 400, "max_tokens", "less than or equal to"),
    ({"model": "fake", "prompt": "x", "max_tokens": 5.5}, 400, "max_tokens", "integer"),
    ({"model": "fake", "prompt": 42}, 400, "prompt", "valid"),
    ({"model": "fake", "prompt": "x", "stream": "yes please"}, 400, "stream", "boolean"),
    ({"model": "fake", "prompt": "x", "top_k": -2}, 400, "top_k", "greater than or equal to -1"),
    ({"model": "fake", "prompt": "x", "min_p": 1.5}, 400, "min_p", "less than or equal to 1"),
    ({"model": "fake", "prompt": "x", "seed": "lucky"}, 400, "seed", "integer"),
    ({"model": "fake", "prompt": "x", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ({"model": "fake", "prompt": "x", "deadline_ms": 0}, 400, "deadline_ms", "greater than 0"),
    ({"model": "fake", "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", "less than or equal to 2"),
    ({"model": "fake", "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "greater than 0"),
    ({"model": "fake", "prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias", "token ids"),
    ({"model": "fake", "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias", "between -100 and 100"),
    ({"model": "fake", "prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ({"model": "fake", "prompt": "x", "best_of": 3}, 400, "best_of", "not supported"),
    ({"model": "fake", "prompt": "x", "suffix": "end"}, 400, "suffix", "not supported"),
    ({"model": "fake", "prompt": [1, -1]}, 400, "prompt", ">= 0"),
    ({"model": "fake", "prompt": [1, 999]}, 400, "prompt", "vocabulary"),
    ({"model": "fake", "prompt": "x" * 64}, 400, "prompt", "context"),
    ({"model": "fake", "prompt": "x" * 60, "max_tokens": 5}, 400, "max_tokens", "exceed"),
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
    hi = [{"role": "user", "content": "hi"}]
    for extra, param in [({"tools": [{"type": "function"}]}, "tools"),
                         ({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"top_logprobs": 2}, "body"), ({"max_completion_tokens": 0}, "max_completion_tokens")]:
        r = await client.post("/v1/chat/completions", json={"model": "fake", "messages": hi, **extra})
        assert r.status_code == 400, extra
        error = r.json()["error"]
        assert (error["param"] or "body") == param or param in error["message"], error


async def test_body_that_is_not_an_object_is_a_400(client):
    for body in (b"[1, 2]", b'"text"', b"null"):
        r = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, body
        assert r.json()["error"]["type"] == "invalid_request_error"


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
    fake_agent.engine.fail_after = 1
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": "x", "stream": True})
    assert r.status_code == 200
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[0])["choices"][0]["text"] == "Hel"
    assert json.loads(payloads[-2])["error"]["code"] == "generation_failed"
    fake_agent.engine.fail_after = None
    fake_agent.engine.fail_with = "the engine crashed: boom"
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": "x", "stream": True})
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]  # before the stream: a real status
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": "x"})
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_full_queue_is_429_and_a_missed_deadline_504(client, fake_agent, stream):
    fake_agent.engine.fail_with = QueueFull(Priority.LOW, 1, retry_after_s=7)
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": "x", "stream": stream},
                          headers={"x-priority": "low"})
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["code"] == "queue_full" and "low tier" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "priority"
    fake_agent.engine.fail_with = DeadlineExceeded()
    r = await client.post("/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "x"}],
                                                        "stream": stream}, headers={"x-deadline-ms": "10"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert r.json()["error"]["param"] == "deadline_ms"
    assert fake_agent.engine.requests[-1].deadline is not None


async def test_priority_and_deadline_headers_reach_the_engine_and_bad_ones_are_400(client, fake_agent):
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": "x"},
                          headers={"x-priority": "critical", "x-deadline-ms": "5000"})
    assert r.status_code == 200
    assert fake_agent.engine.requests[-1].priority.value == "critical"
    for headers, param in [({"x-priority": "asap"}, "x-priority"), ({"x-deadline-ms": "later"}, "x-deadline-ms")]:
        r = await client.post("/v1/completions", json={"model": "fake", "prompt": "x"}, headers=headers)
        assert (r.status_code, r.json()["error"]["param"]) == (400, param)


async def test_api_key_guards_inference_but_not_probes_or_metrics(fake_agent):
    async with make_client(fake_agent, Credentials(api_keys=frozenset({"k1", "k2"}))) as c:
        body = {"model": "fake", "prompt": "x"}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic k1"},
                        {"authorization": "Bearer"}):
            r = await c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "authentication_error"
        assert (await c.get("/v1/models")).status_code == 401
        assert (await c.post("/v1/chat/completions", json={})).status_code == 401  # before validation
        for key in ("k1", "k2"):
            r = await c.post("/v1/completions", json=body, headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200
        for path in ("/health", "/ready", "/metrics"):
            assert (await c.get(path)).status_code == 200, path


async def test_without_keys_inference_is_open(client):
    assert (await client.get("/v1/models")).status_code == 200


async def test_ops_token_guards_ops_routes(fake_agent):
    async with make_client(fake_agent) as closed:  # no ops token configured: never open by accident
        r = await closed.get("/v1/node", headers={"authorization": "Bearer anything"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "ops_api_disabled"
        assert "--ops-token-file" in r.json()["error"]["message"]
    async with make_client(fake_agent, Credentials(api_keys=frozenset({"inference"}), ops_token="s3cret")) as c:
        assert (await c.get("/v1/node")).status_code == 401
        assert (await c.get("/v1/node", headers={"authorization": "Bearer inference"})).status_code == 401
        r = await c.get("/v1/node", headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json() == {"name": "test"}
        # The ops token is not an API key.
        r = await c.post("/v1/completions", json={"model": "fake", "prompt": "x"},
                         headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 401


async def test_models_endpoints(client):
    assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["fake"]
    assert (await client.get("/v1/models/fake")).json()["id"] == "fake"
    assert (await client.get("/v1/models/other")).status_code == 404


async def test_metrics_count_requests_by_route_and_export_engine_gauges(client, fake_agent):
    stats = fake_agent.engine.stats
    stats.running, stats.max_running, stats.waiting, stats.waiting_by_priority = 3, 4, 2, {"high": 2}
    stats.prompt_cache_bytes, stats.prompt_cache_max_bytes = 250, 1000
    stats.prompt_cache_lookups_total, stats.prompt_cache_hits_total = 4, 1
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
        'mlxpool_requests_waiting_by_priority{model_name="fake",priority="high"} 2.0',
        'mlxpool_requests_waiting_by_priority{model_name="fake",priority="low"} 0.0',
        'vllm:gpu_cache_usage_perc{model_name="fake"} 0.75',
        'mlxpool_prompt_cache_hit_rate{model_name="fake"} 0.25',
        'mlxpool_model_memory_bytes{model_name="fake"} 1234.0',
        'mlxpool_requests_total{model_name="fake",outcome="length",priority="normal"} 1.0',
        'mlxpool_time_to_first_token_seconds_count{model_name="fake",priority="normal"} 1.0',
        'mlxpool_inter_token_latency_seconds_count{model_name="fake",priority="normal"} 2.0',
        'mlxpool_e2e_request_latency_seconds_count{model_name="fake",priority="normal"} 1.0',
    ]:
        assert line in text, line
    assert 'vllm:lora_requests_info{max_lora="0",running_lora_adapters="",waiting_lora_adapters=""}' in text


async def test_signals_are_open_and_report_the_engine_and_draining(fake_agent):
    from mlxpool.agent.http.auth import Credentials
    fake_agent.engine.stats.running, fake_agent.engine.stats.max_running = 3, 8
    fake_agent.engine.stats.waiting_by_priority = {"high": 2, "low": 0}
    fake_agent.engine.stats.queued_prompt_tokens = 500
    fake_agent.engine.stats.prompt_tokens_total, fake_agent.engine.stats.prompt_tokens_cached_total = 1200, 200
    fake_agent.engine.stats.prefill_seconds_total = 2.0
    fake_agent.engine.stats.decode_seconds_total, fake_agent.engine.stats.decode_only_steps_total = 1.0, 50
    fake_agent.engine.stats.decode_only_tokens_total = 200
    async with make_client(fake_agent, Credentials(api_keys=frozenset({"k"}))) as c:  # no key needed, like /metrics
        body = (await c.get("/v1/signals")).json()
        assert body["draining"] is False
        assert body["models"]["fake"] == {
            "waiting": {"high": 2}, "running": 3, "slots": 8, "queued_prompt_tokens": 500, "kv_bytes": 0,
            "prefix_cache_bytes": 0, "prefix_cache_max_bytes": 0, "prefill_tokens_per_second": 500.0,
            "decode_step_seconds": 0.02, "decode_tokens_per_second": 200.0}
        fake_agent.lifecycle.set_phase(Phase.DRAINING)
        assert (await c.get("/v1/signals")).json()["draining"] is True


async def test_signals_can_be_turned_off(fake_agent):
    metrics = AgentMetrics(fake_agent.models, fake_agent.lifecycle)
    app = create_app(fake_agent.plane, metrics, publish_signals=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent") as c:
        assert (await c.get("/v1/signals")).status_code == 404
