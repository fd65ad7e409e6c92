"""A real agent process serving the tiny model over HTTP: the OpenAI API end to end.

All tests here share one agent (module fixture `agent`, started with
`--max-tokens-default 16`); none of them stops it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer

PROMPT = "Once upon a time"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, world!"}]


@pytest.fixture
def client(agent) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.url, timeout=60) as c:
        yield c


def sse(client: httpx.Client, path: str, body: dict) -> list[dict]:
    """POST with stream=true; the parsed chunks (asserting the [DONE] ending)."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def metric(client: httpx.Client, name: str, labels: str = 'model_name="tiny"') -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_health_ready_and_models(client):
    assert client.get("/health").json() == {"status": "alive"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_completion_streamed_and_whole_agree_at_temperature_zero(client):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()
    chunks = sse(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["text"] != ""
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == whole["usage"]


def test_chat_streamed_and_whole_agree_at_temperature_zero(client):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 12, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["role"] == "assistant"
    chunks = sse(client, "/v1/chat/completions", body)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    # The tokenizer's chat template was applied: its markers are counted in the prompt.
    assert whole["usage"]["prompt_tokens"] > 10


def test_max_tokens_gives_length_and_exact_usage(client, tiny_model: Path):
    prompt_tokens = len(Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(PROMPT).ids)
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 7}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 7,
                             "total_tokens": prompt_tokens + 7}
    default = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT}).json()
    assert default["usage"]["completion_tokens"] == 16  # --max-tokens-default


def test_stop_sequences_end_generation_and_are_not_returned(client):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    reference = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = reference[4:7]
    expected = reference[: reference.find(stop)]
    whole = client.post("/v1/completions", json={**body, "stop": [stop, "never-appears"]}).json()
    assert whole["choices"][0] == {"index": 0, "text": expected, "finish_reason": "stop", "logprobs": None}
    assert whole["usage"]["completion_tokens"] < 30
    chunks = sse(client, "/v1/completions", {**body, "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_requests_all_complete_and_are_batched(client, agent):
    tokens_before = metric(client, "mlxpool_generation_tokens_total")
    steps_before = metric(client, "mlxpool_decode_steps_total")
    results: list[dict] = []

    def ask(i: int) -> None:
        with httpx.Client(base_url=agent.url, timeout=60) as own:
            results.append(own.post("/v1/completions", json={
                "model": "tiny", "prompt": f"{PROMPT} {i}", "max_tokens": 32, "temperature": 0.7}).json())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    for r in results:  # sampling may pick EOS early ("stop"); otherwise the budget ends it
        used, finish = r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"]
        assert (finish == "length" and used == 32) or (finish == "stop" and used <= 32), r
    tokens = metric(client, "mlxpool_generation_tokens_total") - tokens_before
    steps = metric(client, "mlxpool_decode_steps_total") - steps_before
    assert tokens == sum(r["usage"]["completion_tokens"] for r in results)
    assert steps < tokens / 2  # several sequences per decode step on average


def test_unknown_model_is_404(client):
    r = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": CHAT})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"


def test_malformed_bodies_are_400_naming_the_field(client):
    r = client.post("/v1/completions", content=b'{"model": "tiny", "prompt": ',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 5000})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_metrics_use_prometheus_and_vllm_names(client):
    text = client.get("/metrics").text
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "mlxpool_requests_running",
                 "mlxpool_generation_tokens_total", "mlxpool_http_requests_total"]:
        assert re.search(rf"^{re.escape(name)}[{{ ]", text, re.MULTILINE), name


def test_client_disconnect_mid_stream_frees_the_slot(client, agent):
    cancelled_before = metric(client, "mlxpool_requests_finished_total", 'model_name="tiny",reason="cancelled"')
    tokens_before = metric(client, "mlxpool_generation_tokens_total")
    with httpx.Client(base_url=agent.url, timeout=60) as own:
        with own.stream("POST", "/v1/completions", json={
                "model": "tiny", "prompt": PROMPT, "max_tokens": 1900, "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert metric(client, "vllm:num_requests_running") == 1
    # Closing the connection cancels the request in the engine.
    wait_until(lambda: metric(client, "vllm:num_requests_running") == 0)
    wait_until(lambda: metric(client, "mlxpool_requests_finished_total",
                              'model_name="tiny",reason="cancelled"') == cancelled_before + 1)
    generated = metric(client, "mlxpool_generation_tokens_total") - tokens_before
    assert generated < 1900
    time.sleep(0.2)
    assert metric(client, "mlxpool_generation_tokens_total") - tokens_before == generated


def test_client_disconnect_before_a_whole_response_cancels_it(client, agent):
    cancelled_before = metric(client, "mlxpool_requests_finished_total", 'model_name="tiny",reason="cancelled"')
    with httpx.Client(base_url=agent.url, timeout=httpx.Timeout(60, read=0.3)) as own:
        with pytest.raises(httpx.ReadTimeout):
            own.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 1900,
                                              "temperature": 0})
    wait_until(lambda: metric(client, "mlxpool_requests_finished_total",
                              'model_name="tiny",reason="cancelled"') == cancelled_before + 1)
    assert metric(client, "vllm:num_requests_running") == 0
