"""Disruption, with real processes: agents killed mid-stream, and an agent that accepts
connections but never answers, behind a real router over two agents.

For each: what the user sees, how fast, and that nothing accepted was lost (every
request not yet started on the broken agent succeeds on the other one).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from mlxpool.dev import components
from mlxpool.dev.processes import LOOPBACK, Process
from mlxpool.routing import RouteEndpoint, RoutingTable

pytestmark = pytest.mark.integration

MODEL = "tiny"


def write_routes(path: Path, urls: list[str], revision: int = 1) -> None:
    table = RoutingTable(pool="disruption", namespace="default", revision=revision, models={
        MODEL: [RouteEndpoint(node=f"node-{i}", url=url) for i, url in enumerate(urls)]})
    path.write_text(table.to_json())


@dataclass
class StreamOutcome:
    done: bool = False
    error: str | None = None
    chunks: int = 0
    ended_at: float | None = None
    events: list[str] = field(default_factory=list)


def stream(url: str, outcome: StreamOutcome, started: threading.Event) -> None:
    body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 1500, "stream": True,
            "temperature": 0}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as reply:
            for line in reply.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                outcome.chunks += 1
                started.set()
                if data == "[DONE]":
                    outcome.done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    outcome.error = event["error"]["message"]
                    break
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        outcome.ended_at = time.monotonic()
        started.set()


@pytest.fixture(scope="module")
def two_agents(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process, Path]]:
    """Two agents for the module: the mid-stream kill takes agent-a, the hung-agent test
    needs only agent-b (started once, this saves one pair of agent starts, ~8 s)."""
    logs = tmp_path_factory.mktemp("disruption") / "logs"
    a = components.start_agent(tiny_model, logs, name="agent-a", extra=["--no-warmup"])
    try:
        b = components.start_agent(tiny_model, logs, name="agent-b", extra=["--no-warmup"])
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b, logs
    finally:
        a.stop(5)
        b.stop(5)


def test_agent_killed_mid_stream(two_agents, tmp_path):
    a, b, logs = two_agents
    routes = tmp_path / "routes.json"
    write_routes(routes, [a.url, b.url])
    router = components.start_router(logs, routes_file=routes)
    try:
        outcomes = [StreamOutcome() for _ in range(4)]
        starts = [threading.Event() for _ in outcomes]
        threads = [threading.Thread(target=stream, args=(router.url, o, s))
                   for o, s in zip(outcomes, starts, strict=True)]
        for t in threads:
            t.start()
        for s in starts:
            assert s.wait(30), "a stream never started"
        os.kill(a.pid, signal.SIGKILL)
        killed = time.monotonic()
        for t in threads:
            t.join(30)
        assert all(o.ended_at is not None for o in outcomes), "a stream hung"
        broken = [o for o in outcomes if o.error is not None]
        assert broken, f"no stream was on the killed agent: {outcomes}"
        for o in broken:
            assert "node-0" in o.error and o.ended_at - killed < 2.0, o
        assert all(o.done for o in outcomes if o.error is None)
        # Nothing not yet started is lost: every new request succeeds on the other agent.
        served = [httpx.post(router.url + "/v1/completions", timeout=30,
                             json={"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code
                  for _ in range(10)]
        assert served == [200] * 10
        worst = max(o.ended_at - killed for o in broken)
        print(f"agent SIGKILL: {len(broken)} stream(s) ended with an error event within {worst:.2f}s; "
              f"10/10 later requests served")
    finally:
        router.stop(5)


class HungServer:
    """Accepts connections and reads, never answers (a wedged agent)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.url = f"http://{LOOPBACK}:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_an_agent_that_never_answers(two_agents, tmp_path):
    _, b, logs = two_agents
    hung = HungServer()
    routes = tmp_path / "routes.json"
    write_routes(routes, [hung.url, b.url])
    router = components.start_router(logs, routes_file=routes, name="router-hung",
                                     extra=["--first-byte-timeout", "1"])
    try:
        times, statuses = [], []
        for i in range(10):
            start = time.monotonic()
            reply = httpx.post(router.url + "/v1/completions", timeout=30,
                               json={"model": MODEL, "prompt": f"hi {i}", "max_tokens": 2})
            times.append(time.monotonic() - start)
            statuses.append(reply.status_code)
        assert statuses == [200] * 10, statuses
        assert max(times) < 1.0 + 3.0, times  # the first-byte timeout, then the healthy agent
        # The router's circuit breaker opens after its failures in a row: later requests skip the hung agent.
        assert max(times[-4:]) < 1.0, times
        print(f"hung agent: 10/10 served, worst {max(times):.2f}s (first-byte timeout 1 s), "
              f"last four {max(times[-4:]):.2f}s at worst; times {[round(t, 2) for t in times]}")
    finally:
        router.stop(5)
        hung.close()
