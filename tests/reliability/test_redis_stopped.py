"""Redis (the agents' shared prompt-KV tier) hung and then stopped under load, real
processes: a real redis-server of this test's own, two real agents sharing through it.

What users see: nothing. Every request is served (0 failed): the agents serve without
sharing. Hung (SIGSTOP), each Redis call would wait its timeout; the breaker opens after
a few failures and from then on no request waits on Redis. Stopped and started again on
its port, the agents find it by themselves (a probe each breaker period) and publish again.
Each phase ends on an event read from the agents' metrics (the breaker open, a failed
probe counted as a trip, publishing again), not after a sleep.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from mlxpool.dev import components
from mlxpool.dev.processes import LOOPBACK, Process, free_port, wait_for
from mlxpool.dev.scraping import metric_total

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SYSTEM = ("You are the assistant of a fleet of small computers. Answer in one short sentence, "
          "name the node that answered, never invent numbers, and keep a friendly tone. ") * 2
TIMEOUT_S, OPEN_S = 0.5, 1.0


def start_redis(port: int, workdir: Path) -> Process:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (make test installs it with apt)"
    proc = Process.start("redis", [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "",
                                   "--appendonly", "no", "--dir", str(workdir)], workdir / "redis.log")
    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        wait_for(client.ping, 20, "redis-server", proc)
    finally:
        client.close()
    return proc


def breaker_open(agent: Process) -> bool:
    return metric_total(agent.base_url, "mlxpool_shared_kv_breaker_open") == 1


def breaker_trips(agent: Process) -> float:
    """Times the breaker opened, or stayed open after a failed probe."""
    return metric_total(agent.base_url, "mlxpool_shared_kv_breaker_trips_total")


def failed_probe(agents: list[Process], timeout: float, what: str) -> None:
    """Until every agent's breaker has probed Redis once more and the probe failed."""
    before = [breaker_trips(a) for a in agents]
    for a, tripped in zip(agents, before, strict=True):
        wait_for(lambda a=a, tripped=tripped: breaker_trips(a) > tripped, timeout, what)


def test_redis_hung_then_stopped_under_load(tiny_model, tmp_path: Path):
    port = free_port()
    work = tmp_path / "redis"
    work.mkdir()
    config = tmp_path / "runtime.yaml"
    config.write_text(f"distributed_cache: {{redis_url: 'redis://{LOOPBACK}:{port}/0', block_tokens: 16, "
                      f"min_tokens: 32, timeout_seconds: {TIMEOUT_S}, breaker_failures: 3, "
                      f"breaker_open_seconds: {OPEN_S}}}\n")
    logs = tmp_path / "logs"
    server = start_redis(port, work)
    agents: list[Process] = []
    outcomes: list[tuple[float, float, int | str]] = []  # (start, seconds, status)
    stop = threading.Event()

    def load(agent: Process, offset: int) -> None:
        with httpx.Client(timeout=20) as client:
            for i in range(3000):  # bounded in count, and stopped by the test
                if stop.is_set():
                    return
                start = time.monotonic()
                try:
                    status: int | str = client.post(agent.base_url + "/v1/completions", json={
                        "model": "tiny", "prompt": f"Question {offset + i}. " + SYSTEM, "max_tokens": 2,
                        "temperature": 0}).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                outcomes.append((start, time.monotonic() - start, status))

    threads: list[threading.Thread] = []
    try:
        with ThreadPoolExecutor(2) as pool:  # side by side: each start waits for its agent's ready line
            agents = list(pool.map(lambda i: components.start_agent(
                tiny_model, logs, name=f"agent-{i}", extra=["--config", str(config), "--no-warmup"]), range(2)))
        threads = [threading.Thread(target=load, args=(a, 10_000 * i)) for i, a in enumerate(agents)]
        for t in threads:
            t.start()
        for a in agents:
            wait_for(lambda a=a: metric_total(a.base_url, "mlxpool_shared_kv_published_total") >= 1, 30,
                     "sharing through Redis before the fault")

        # Hung: connections accepted, nothing answered. The breaker opens; then nobody waits.
        os.kill(server.pid, signal.SIGSTOP)
        hung = time.monotonic()
        for a in agents:
            wait_for(lambda a=a: breaker_open(a), 20, "the breaker to open on a hung Redis")
        opened_s = time.monotonic() - hung
        # Traffic through at least one failed probe of each agent (a probe's request may wait the timeout).
        trips_open = sum(breaker_trips(a) for a in agents)
        failed_probe(agents, 20, "a probe of the hung Redis")
        probes = sum(breaker_trips(a) for a in agents) - trips_open
        while_open = [o for o in outcomes if o[0] > hung + opened_s + 0.1]

        # Stopped, then started again on its port: the agents reconnect by themselves.
        os.kill(server.pid, signal.SIGKILL)
        os.kill(server.pid, signal.SIGCONT)
        server.popen.wait(10)
        published = [metric_total(a.base_url, "mlxpool_shared_kv_published_total") for a in agents]
        failed_probe(agents, 20, "a probe of the stopped Redis (connection refused)")
        server = start_redis(port, work)
        back = time.monotonic()
        for a, before in zip(agents, published, strict=True):
            wait_for(lambda a=a, before=before: not breaker_open(a)
                     and metric_total(a.base_url, "mlxpool_shared_kv_published_total") > before,
                     20, "publishing again after Redis came back")
        reconnect_s = time.monotonic() - back
        trips = sum(metric_total(a.base_url, "mlxpool_shared_kv_breaker_trips_total") for a in agents)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda a: a.stop(10), agents))
        if server.alive():
            os.kill(server.pid, signal.SIGCONT)
        server.stop(5)
    failed = [o for o in outcomes if o[2] != 200]
    assert outcomes and not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
    assert while_open, "no request ran while the breaker was open"
    worst_open = max(o[1] for o in while_open)
    baseline = sorted(o[1] for o in outcomes if o[0] < hung)
    # With the breaker open a request never waits the Redis timeout (a probe's request may, once per probe:
    # counted by the trips; +2 for the probes begun before the count was read, one per agent).
    slow = [o for o in while_open if o[1] > TIMEOUT_S + baseline[len(baseline) // 2]]
    assert len(slow) <= probes + 2, f"requests waited on a hung Redis: {slow} ({probes} failed probes)"
    print(f"Redis hung then stopped: {len(outcomes)} requests, 0 failed; breaker open {opened_s:.2f}s after the hang; "
          f"{len(while_open)} requests while open, worst {worst_open:.2f}s ({len(slow)} waited a probe's timeout; "
          f"median before the fault {baseline[len(baseline) // 2]:.2f}s); reconnected {reconnect_s:.2f}s after "
          f"Redis was back; trips {trips:.0f}")
