"""Real agent processes started with options: API keys, batch concurrency, tier limits.

Each test starts its own agent (`agent_factory`), configured through flags, the
environment or a runtime file, and checks the behaviour over HTTP.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

PROMPT = "Once upon a time"
HOLD = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1900, "temperature": 0, "stream": True}


def gauge(client: httpx.Client, name: str) -> float:
    match = re.search(rf'^{re.escape(name)}{{model_name="tiny"}} (\S+)$', client.get("/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_until(check, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_api_keys_guard_inference_in_a_real_agent(agent_factory, tiny_model: Path, tmp_path: Path):
    keys = tmp_path / "api-keys"
    keys.write_text("first-key\nsecond-key\n")
    agent = agent_factory(tiny_model, ["--api-key-file", str(keys)])
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}
    with httpx.Client(base_url=agent.url, timeout=30) as client:
        refused = client.post("/v1/completions", json=body)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert client.post("/v1/completions", json=body,
                           headers={"authorization": "Bearer third-key"}).status_code == 401
        assert client.get("/v1/models").status_code == 401
        ok = client.post("/v1/completions", json=body, headers={"authorization": "Bearer second-key"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        for path in ("/health", "/ready", "/metrics"):
            assert client.get(path).status_code == 200, path


def test_decode_concurrency_from_the_environment_bounds_the_batch(agent_factory, tiny_model: Path, monkeypatch):
    monkeypatch.setenv("MLXPOOL_SERVING__DECODE_CONCURRENCY", "2")
    agent = agent_factory(tiny_model, ["--prefill-concurrency", "1"])
    peak = {"running": 0.0, "waiting": 0.0}
    done = threading.Event()
    results: list[int] = []

    def ask(i: int) -> None:
        with httpx.Client(base_url=agent.url, timeout=60) as own:
            r = own.post("/v1/completions", json={"model": "tiny", "prompt": f"{PROMPT} {i}", "max_tokens": 200,
                                                  "temperature": 0})
            results.append(r.status_code)

    def watch() -> None:
        with httpx.Client(base_url=agent.url, timeout=10) as probe:
            while not done.is_set():
                peak["running"] = max(peak["running"], gauge(probe, "vllm:num_requests_running"))
                peak["waiting"] = max(peak["waiting"], gauge(probe, "vllm:num_requests_waiting"))
                time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    askers = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in askers:
        t.start()
    for t in askers:
        t.join(60)
    done.set()
    watcher.join(10)
    assert results == [200] * 6
    assert peak["running"] == 2 and peak["waiting"] >= 1
    with httpx.Client(base_url=agent.url, timeout=10) as probe:
        text = probe.get("/metrics").text
    tokens = float(re.search(r'^mlxpool_generation_tokens_total{model_name="tiny"} (\S+)$', text, re.M).group(1))
    steps = float(re.search(r'^mlxpool_decode_steps_total{model_name="tiny"} (\S+)$', text, re.M).group(1))
    assert tokens / steps <= 2  # never more than two sequences per step


def test_tier_limits_and_deadlines_from_the_runtime_file(agent_factory, tiny_model: Path, tmp_path: Path):
    config = tmp_path / "runtime.yaml"
    config.write_text("""
serving: {decode_concurrency: 1, prefill_concurrency: 1}
priority_scheduling:
  tiers:
    low: {max_waiting: 1}
    background: {deadline_seconds: 0.3}
""")
    agent = agent_factory(tiny_model, ["--config", str(config)])
    with httpx.Client(base_url=agent.url, timeout=60) as client, client.stream("POST", "/v1/completions",
                                                                               json=HOLD) as holder:
        lines = holder.iter_lines()  # keep it referenced: a dropped iterator closes the stream
        next(lines)  # the one slot is taken
        queued: dict = {}
        waiter = threading.Thread(target=lambda: queued.setdefault("r", httpx.post(
            f"{agent.url}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3,
                                                 "temperature": 0, "priority": "low"}, timeout=60)))
        waiter.start()
        wait_until(lambda: gauge(client, "vllm:num_requests_waiting") == 1)
        full = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "priority": "low"})
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
        # The tier's deadline (0.3 s) and a header's (0.1 s) cannot be met behind the holder:
        # refused at once with 429 (predicted wait), not left to wait for a 504.
        late = client.post("/v1/chat/completions", json={"model": "tiny", "stream": True,
                                                         "messages": [{"role": "user", "content": "hi"}]},
                           headers={"x-priority": "background"})
        assert late.status_code == 429 and late.json()["error"]["code"] == "deadline_unreachable"
        assert late.json()["error"]["param"] == "deadline_ms" and int(late.headers["retry-after"]) >= 1
        header = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT},
                             headers={"x-deadline-ms": "100"})
        assert header.status_code == 429 and header.json()["error"]["code"] == "deadline_unreachable"
        text = client.get("/metrics").text
        assert 'mlxpool_requests_rejected_total{model_name="tiny",reason="queue_full"} 1.0' in text
        assert 'mlxpool_requests_rejected_total{model_name="tiny",reason="deadline_unreachable"} 2.0' in text
    # The holder went away: the waiting low request runs.
    waiter.join(60)
    assert queued["r"].status_code == 200 and queued["r"].json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("flag", ["--prefill-concurrency", "--decode-concurrency", "--prefill-step-size"])
def test_concurrency_flags_must_be_positive(flag, tiny_model: Path):
    from mlxpool.agent.main import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--model", str(tiny_model), flag, "0"])


def test_a_stream_interval_still_streams_every_chunk(agent_factory, tiny_model: Path):
    agent = agent_factory(tiny_model, ["--stream-interval-ms", "1000"])  # longer than any request here
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    with httpx.Client(base_url=agent.url, timeout=30) as client:
        whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            payloads = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
