"""An agent started without a model keeps answering while it loads its first one.

Real agent process, the tiny model, loopback. The first load used to import the engine
(MLX, mlx-lm, transformers) on the agent's event loop: `/health` went unanswered for
1.4-2.9 s (shared 2-core machine), longer than the operator's probe timeout (1 s), so a
pool's first placement churned: the node loading the model failed its probes, the pool
moved to the other node, which then failed its probes while loading, and back (seen as
(loads, unloads) per agent [(1, 1), (2, 1)] for one replica; 4 of 5 first placements
churned in a repeat of that setup before the operator stopped counting timeouts of a
watched agent). The import now runs on a thread (`AgentRuntime._import_engine`).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from mlxpool.dev import components
from mlxpool.operator.config import OperatorConfig

pytestmark = pytest.mark.integration

OPS = "ops-first-load-0a1b2c3d4e5f"


def test_health_answers_during_an_empty_agents_first_load(tiny_model, tmp_path):
    ops = tmp_path / "ops-token"
    ops.write_text(OPS + "\n")
    agent = components.start_agent(None, tmp_path / "logs", ops_token_file=ops, extra=["--no-warmup"])
    headers = {"authorization": f"Bearer {OPS}"}
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get(agent.base_url + "/health")
                latencies.append(time.perf_counter() - started)
                stop.wait(0.02)

    poller = threading.Thread(target=poll)
    try:
        poller.start()
        reply = httpx.post(agent.base_url + "/v1/node/models", headers=headers, timeout=30,
                           json={"name": "tiny", "path": str(tiny_model)})
        assert reply.status_code == 202, reply.text
        deadline = time.monotonic() + 60
        while True:
            report = httpx.get(agent.base_url + "/v1/node", headers=headers, timeout=30).json()
            if [(m["name"], m["phase"]) for m in report["models"]] == [("tiny", "ready")]:
                break
            assert time.monotonic() < deadline, report
            time.sleep(0.05)
    finally:
        stop.set()
        poller.join(30)
        code = agent.stop(10)
    worst = max(latencies)
    print(f"first load of an empty agent: {len(latencies)} /health answers, worst {worst:.3f}s; exit code {code}")
    # The bound is what the operator tolerates, not a speed target: a probe that waits
    # longer than its timeout counts against the node.
    assert worst < OperatorConfig.probe_timeout, f"/health waited {worst:.2f}s during the first load"
    assert code == 0
