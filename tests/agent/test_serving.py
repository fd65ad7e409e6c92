"""A real agent process serving the tiny model over HTTP: the OpenAI API end to end.

All tests here share one agent (module fixture `agent`, started with
`--max-tokens-default 16`); none of them stops it.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from tokenizers import Tokenizer

PROMPT = "Once upon a time"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, world!"}]
SYSTEM = ("You are the assistant of a fleet of small computers. Answer briefly, name the node that "
          "served the request, and never reveal the routing table the operator wrote.")


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
    # The second ask of a short prompt reuses all of it but its last token (engine.prefixcache).
    usage = whole["usage"]
    assert chunks[-1]["usage"] == {**usage, "prompt_tokens_details": {"cached_tokens": usage["prompt_tokens"] - 1}}


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
    prompt = f"{PROMPT} in a land"  # asked nowhere else: nothing of it is cached
    prompt_tokens = len(Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(prompt).ids)
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 7,
                                                "temperature": 0}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 7,
                             "total_tokens": prompt_tokens + 7, "prompt_tokens_details": {"cached_tokens": 0}}
    default = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "temperature": 0}).json()
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
    together = threading.Barrier(8)

    def ask(i: int) -> None:
        with httpx.Client(base_url=agent.url, timeout=60) as own:
            own.get("/health")  # connected: the barrier then releases the eight requests at once
            together.wait(30)
            results.append(own.post("/v1/completions", json={
                "model": "tiny", "prompt": f"{PROMPT} {i}", "max_tokens": 64, "temperature": 0.7}).json())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    for r in results:  # sampling may pick EOS early ("stop"); otherwise the budget ends it
        used, finish = r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"]
        assert (finish == "length" and used == 64) or (finish == "stop" and used <= 64), r
    tokens = metric(client, "mlxpool_generation_tokens_total") - tokens_before
    steps = metric(client, "mlxpool_decode_steps_total") - steps_before
    assert tokens == sum(r["usage"]["completion_tokens"] for r in results)
    assert steps < tokens / 2  # several sequences per decode step on average


def test_signals_report_load_while_busy_and_measured_rates_after(client, agent):
    seen: list[dict] = []

    def ask(i: int) -> None:
        with httpx.Client(base_url=agent.url, timeout=60) as own:
            own.post("/v1/completions", json={"model": "tiny", "prompt": f"{PROMPT} signals {i}", "max_tokens": 48,
                                              "temperature": 0})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        seen.append(client.get("/v1/signals").json()["models"]["tiny"])
        time.sleep(0.01)
    for t in threads:
        t.join(60)
    assert max(s["running"] + sum(s["waiting"].values()) for s in seen) >= 1
    rest = client.get("/v1/signals").json()
    assert rest["draining"] is False and rest["version"] == 1
    tiny = rest["models"]["tiny"]
    assert tiny["running"] == 0 and tiny["waiting"] == {} and tiny["queued_prompt_tokens"] == 0
    assert tiny["slots"] >= 1
    assert tiny["prefill_tokens_per_second"] > 0
    assert 0 < tiny["decode_step_seconds"] < 5
    assert tiny["decode_tokens_per_second"] > 0
    assert len(client.get("/v1/signals").content) < 1024  # compact: polled many times a second


def test_unknown_model_is_404(client):
    r = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": CHAT})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"


@pytest.mark.parametrize(("path", "body", "param", "needle"), [
    ("/v1/completions", b'{"model": "tiny", "prompt": ', None, "not valid JSON"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, "max_tokens", "integer"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -3}, "max_tokens", "greater than"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**9}, "max_tokens", "less than"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 5000}, "max_tokens", "context of 2048"),
    ("/v1/completions", {"model": "tiny", "prompt": "hello " * 2100}, "prompt", "context is 2048"),
    ("/v1/completions", {"model": "tiny", "prompt": {"text": "x"}}, "prompt", "valid"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "warm"}, "temperature", "number"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hello"}, "messages", "list"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "x"}]}, "messages.0.role", "required"),
    ("/v1/chat/completions", {"model": 7, "messages": CHAT}, "model", "string"),
])
def test_bad_input_is_a_400_naming_the_problem_and_the_agent_keeps_serving(client, path, body, param, needle):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert needle in error["message"], error
    ok = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
    assert ok.status_code == 200


def test_logprobs_for_completions_and_chat(client):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    logprobs = whole["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 5
    assert all(lp <= 0 for lp in logprobs["token_logprobs"])
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    # Greedy: each chosen token is the most likely one.
    for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert max(top.values()) == pytest.approx(lp, abs=1e-4) and token in top
    chunks = sse(client, "/v1/completions", body)
    assert [c["choices"][0]["logprobs"]["tokens"][0] for c in chunks] == logprobs["tokens"]
    chat = client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 4,
                                                      "temperature": 0, "logprobs": True, "top_logprobs": 3}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(entry["top_logprobs"]) == 3 for entry in content)
    assert all(entry["bytes"] == list(entry["token"].encode()) for entry in content)
    plain = client.post("/v1/completions", json={**body, "logprobs": None}).json()
    assert plain["choices"][0]["logprobs"] is None


def test_a_seed_repeats_a_sampled_completion(client):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 1.0, "seed": 1234}
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    streamed = "".join(c["choices"][0]["text"] for c in sse(client, "/v1/completions", body))
    other = client.post("/v1/completions", json={**body, "seed": 4321}).json()["choices"][0]["text"]
    assert streamed == first
    assert other != first


def test_logit_bias_forces_a_token(client, tiny_model: Path):
    token_id = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).token_to_id("lo")
    assert token_id is not None
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0.8,
            "logit_bias": {str(token_id): 100}, "presence_penalty": 0.5}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "lololo"
    r = client.post("/v1/completions", json={**body, "logit_bias": {"99999": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


def test_the_prefix_cache_skips_a_shared_system_prompt(client):
    cached_before = metric(client, "mlxpool_prompt_tokens_cached_total")
    hits_before = metric(client, "mlxpool_prompt_cache_hits_total")

    def ask(question: str) -> dict:
        return client.post("/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}).json()

    first = ask("Which node answered?")
    second = ask("And which model?")
    # The first may reuse what earlier chats share with it (the template's opening); the second
    # reuses the whole system prompt, which is far longer.
    first_cached = first["usage"]["prompt_tokens_details"]["cached_tokens"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first_cached + 30  # the system prompt was not computed again
    assert cached < second["usage"]["prompt_tokens"]
    assert metric(client, "mlxpool_prompt_tokens_cached_total") - cached_before == first_cached + cached
    assert metric(client, "mlxpool_prompt_cache_hits_total") - hits_before == 1 + (first_cached > 0)
    assert 0 < metric(client, "mlxpool_prompt_cache_bytes") <= metric(client, "mlxpool_prompt_cache_max_bytes")
    assert 0 < metric(client, "mlxpool_prompt_cache_hit_rate") <= 1


def test_priority_header_and_body_are_accepted_and_counted(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2},
                    headers={"x-priority": "high"})
    assert r.status_code == 200
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2,
                                             "priority": "background", "deadline_ms": 60000})
    assert r.status_code == 200
    for tier in ("high", "background"):
        assert metric(client, "mlxpool_requests_total",
                      f'model_name="tiny",outcome="length",priority="{tier}"') >= 1
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT}, headers={"x-priority": "vip"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-priority"


def test_metrics_use_prometheus_and_vllm_names(client):
    client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3})
    text = client.get("/metrics").text
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
                 "vllm:lora_requests_info",
                 "mlxpool_requests_running", "mlxpool_requests_waiting_by_priority",
                 "mlxpool_generation_tokens_total", "mlxpool_prompt_tokens_total", "mlxpool_http_requests_total",
                 "mlxpool_time_to_first_token_seconds_bucket", "mlxpool_inter_token_latency_seconds_bucket",
                 "mlxpool_e2e_request_latency_seconds_bucket", "mlxpool_prompt_cache_bytes",
                 "mlxpool_prompt_cache_hit_rate", "mlxpool_kv_cache_bytes", "mlxpool_model_memory_bytes"]:
        assert re.search(rf"^{re.escape(name)}[{{ ]", text, re.MULTILINE), name
    assert metric(client, "mlxpool_model_memory_bytes") > 0
    assert metric(client, "mlxpool_time_to_first_token_seconds_count", 'model_name="tiny",priority="normal"') >= 1


def test_client_disconnect_mid_stream_frees_the_slot(client, agent):
    cancelled_before = metric(client, "mlxpool_requests_finished_total", 'model_name="tiny",reason="cancelled"')
    tokens_before = metric(client, "mlxpool_generation_tokens_total")
    with httpx.Client(base_url=agent.url, timeout=60) as own, own.stream("POST", "/v1/completions", json={
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
    with (httpx.Client(base_url=agent.url, timeout=httpx.Timeout(60, read=0.3)) as own,
          pytest.raises(httpx.ReadTimeout)):
        own.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 1900, "temperature": 0})
    wait_until(lambda: metric(client, "mlxpool_requests_finished_total",
                              'model_name="tiny",reason="cancelled"') == cancelled_before + 1)
    assert metric(client, "vllm:num_requests_running") == 0


def test_a_slow_reader_does_not_stall_other_streams(client, agent):
    """A client that stops reading fills its socket; everyone else keeps streaming at speed."""
    url = urlsplit(agent.url)
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 1900, "temperature": 0, "stream": True,
                       "logprobs": 5})  # fat chunks: the slow client's buffers fill fast
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    slow.connect((url.hostname, url.port))
    try:
        slow.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        assert slow.recv(64).startswith(b"HTTP/1.1 200")  # the slow stream is running; now stop reading
        wait_until(lambda: metric(client, "vllm:num_requests_running") == 1)
        time.sleep(1.0)  # long enough for its buffers to fill
        started = time.monotonic()
        for _ in range(3):
            chunks = sse(client, "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 32,
                                                     "temperature": 0})
            assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert time.monotonic() - started < 20
        assert client.get("/health").status_code == 200
    finally:
        slow.close()
    wait_until(lambda: metric(client, "vllm:num_requests_running") == 0, timeout=30)
