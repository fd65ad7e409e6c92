"""Agent processes under SIGTERM: drain in-flight work, refuse new work, exit 0.

Each test starts its own agent (they end it).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx

LONG = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1900, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}


def test_sigterm_lets_the_in_flight_request_finish_then_exits_zero(agent_factory, tiny_model: Path):
    agent = agent_factory(tiny_model)
    seen: dict = {"payloads": []}

    def read_rest(lines) -> None:
        seen["payloads"] += [line[len("data: "):] for line in lines if line.startswith("data: ")]

    with httpx.Client(base_url=agent.url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=LONG) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")  # the request is in flight
        os.kill(agent.pid, signal.SIGTERM)
        reader = threading.Thread(target=read_rest, args=(lines,))
        reader.start()
        with httpx.Client(base_url=agent.url, timeout=5) as probe:
            deadline = time.monotonic() + 10
            while (ready := probe.get("/ready")).status_code != 503:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert ready.json()["status"] == "draining"
            refused = probe.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            assert probe.get("/health").status_code == 200
        reader.join(60)
    assert agent.popen.wait(30) == 0
    payloads = seen["payloads"]
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["usage"]["completion_tokens"] == 1900
    assert json.loads(payloads[-3])["choices"][0]["finish_reason"] == "length"
    assert "agent stopped" in agent.log_text()


def test_sigterm_when_idle_exits_zero(agent_factory, tiny_model: Path):
    agent = agent_factory(tiny_model)
    os.kill(agent.pid, signal.SIGTERM)
    assert agent.popen.wait(15) == 0


def test_drain_timeout_bounds_the_wait(agent_factory, tiny_model: Path):
    agent = agent_factory(tiny_model, ["--drain-timeout", "0"])
    with httpx.Client(base_url=agent.url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=LONG) as stream:
        lines = stream.iter_lines()
        next(lines)
        os.kill(agent.pid, signal.SIGTERM)
        try:
            payloads = [line for line in lines if line.startswith("data: ")]
        except httpx.HTTPError:  # the server cut the stream
            payloads = []
    assert agent.popen.wait(15) == 0
    assert "data: [DONE]" not in payloads  # not waited for: 1,900 tokens take far longer
    assert "drain timed out" in agent.log_text()


def test_a_health_watch_speaks_until_the_agent_stops(agent_factory, tiny_model: Path):
    agent = agent_factory(tiny_model)
    with httpx.Client(base_url=agent.url, timeout=10) as client:
        bad = client.get("/health/watch", params={"interval": "0"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "interval"
        with client.stream("GET", "/health/watch", params={"interval": "0.2"}) as stream:
            lines = stream.iter_lines()
            assert [json.loads(next(lines)) for _ in range(3)] == [{"status": "alive"}] * 3
            os.kill(agent.pid, signal.SIGTERM)  # the watch ends when the process stops serving
            started = time.monotonic()
            try:
                for _ in lines:
                    assert time.monotonic() - started < 10
            except httpx.RemoteProtocolError:
                pass  # cut mid-stream: what a watcher hears as the agent's end
    assert agent.popen.wait(30) == 0
