"""The operator end to end: a real `mlxpool operator` process against the real API
server, reconciling pools over InferenceNodes registered with the agent identity.
The agents are `HealthServer`s (see conftest.py)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
import pytest

from mlxpool.dev.controlplane import ControlPlane
from mlxpool.dev.processes import Process
from mlxpool.resources import LABEL_POOL, ROUTES_DATA_KEY
from mlxpool.routing import RoutingTable

pytestmark = pytest.mark.integration
T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float, what: str, proc: Process | None = None,
               interval: float = 0.1) -> T:
    """Poll `check` until it returns a truthy value, which is returned; on timeout fail
    naming `what`, the last value or error, and the operator's log tail."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except (AssertionError, KeyError, IndexError, ValueError, RuntimeError) as exc:  # kubectl failures too
            last = exc
        if time.monotonic() > deadline:
            tail = f"\noperator log:\n{proc.log_tail(40)}" if proc is not None else ""
            raise AssertionError(f"{what}: not within {timeout}s (last: {last!r}){tail}")
        time.sleep(interval)


def create_pool(cp: ControlPlane, namespace: str, nodes, replicas: int) -> None:
    """Pool `tiny` over this test's nodes only."""
    body = {"apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": "tiny", "namespace": namespace},
            "spec": {"models": [{"name": "tiny"}], "replicas": replicas,
                     "nodeSelector": {"matchLabels": {nodes.label: namespace}}}}
    cp.kubectl("create", "-f", "-", input=json.dumps(body))


def get_pool(cp: ControlPlane, namespace: str, name: str = "tiny") -> dict:
    return json.loads(cp.kubectl("get", "inferencepool", name, "-n", namespace, "-o", "json").stdout)


def get_routes(cp: ControlPlane, namespace: str, pool: str = "tiny") -> tuple[dict, RoutingTable]:
    cm = json.loads(cp.kubectl("get", "configmap", f"{pool}-routes", "-n", namespace, "-o", "json").stdout)
    return cm, RoutingTable.from_json(cm["data"][ROUTES_DATA_KEY])


def routed(cp: ControlPlane, namespace: str) -> list[str]:
    return [e.node for e in get_routes(cp, namespace)[1].endpoints_for("tiny")]


def api_requests(metrics_url: str) -> float:
    """The operator's own API requests so far, from its /metrics."""
    text = httpx.get(f"{metrics_url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mlxpool_operator_api_requests_total{"))


def conditions(pool: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in pool.get("status", {}).get("conditions", [])}


def event_reasons(cp: ControlPlane, namespace: str) -> list[str]:
    events = json.loads(cp.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    return [e["reason"] for e in events if e["involvedObject"]["kind"] == "InferencePool"]


def test_pool_follows_agent_health_and_node_readiness(controlplane, namespace, nodes, health_servers, run_operator):
    cp = controlplane
    a, b, c, d, e = (health_servers() for _ in range(5))
    nodes.register("a", a.url)
    nodes.register("b", b.url)
    nodes.register("c", c.url, models=("other",))  # serves another model
    nodes.register("d", d.url, labels={nodes.label: "elsewhere"})  # outside the selector
    nodes.register("e", e.url, heartbeat=datetime.now(UTC) - timedelta(minutes=10))  # stale
    create_pool(cp, namespace, nodes, replicas=3)
    operator = run_operator(namespace)
    na, nb = nodes.name("a"), nodes.name("b")

    # Routed to the two eligible nodes; the third replica cannot be placed.
    assert eventually(lambda: routed(cp, namespace) == [na, nb], 20, "routing table with a and b", operator)
    cm, table = get_routes(cp, namespace)
    pool = get_pool(cp, namespace)
    assert cm["metadata"]["labels"][LABEL_POOL] == "tiny"
    (owner,) = cm["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "InferencePool", "tiny", pool["metadata"]["uid"], True)
    status = eventually(lambda: get_pool(cp, namespace).get("status"), 10, "pool status", operator)
    assert status["observedGeneration"] == 1
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    assert status["selector"] == "mlxpool.dev/pool=tiny"
    assert status["routingRevision"] == table.revision
    assert [(ep["node"], ep["url"], ep["healthy"]) for ep in status["endpoints"]] == [(na, a.url, True),
                                                                                      (nb, b.url, True)]
    assert conditions(get_pool(cp, namespace)) == {
        "Ready": ("True", "EndpointsReady"), "Progressing": ("True", "WaitingForNodes"),
        "Degraded": ("True", "InsufficientNodes")}

    # An agent dies: gone from the table within about one probe interval (1 s).
    b.stop()
    started = time.monotonic()
    eventually(lambda: routed(cp, namespace) == [na], 5, "b dropped from the routing table", operator)
    assert time.monotonic() - started < 5
    endpoint_b = eventually(
        lambda: next(ep for ep in get_pool(cp, namespace)["status"]["endpoints"]
                     if ep["node"] == nb and not ep["healthy"]),
        5, "b reported unhealthy in status", operator)
    assert endpoint_b["message"].startswith("cannot connect")
    assert get_routes(cp, namespace)[1].revision > table.revision
    eventually(lambda: "EndpointUnhealthy" in event_reasons(cp, namespace), 10, "EndpointUnhealthy event", operator)

    # It comes back on the same port: routed again.
    b.start()
    eventually(lambda: routed(cp, namespace) == [na, nb], 5, "b routed again", operator)

    # A node whose agent says it is not ready drops out of the table and of the status.
    nodes.set_status("a", ready=False)
    eventually(lambda: routed(cp, namespace) == [nb], 5, "a dropped after it is marked not ready", operator)
    status = eventually(lambda: (s := get_pool(cp, namespace)["status"])["replicas"] == 1 and s, 5,
                        "status with one endpoint", operator)
    assert [ep["node"] for ep in status["endpoints"]] == [nb]
    assert "PlacementChanged" in event_reasons(cp, namespace)


def test_scaling_restart_and_no_needless_writes(controlplane, namespace, nodes, health_servers, run_operator):
    cp = controlplane
    a, b = health_servers(), health_servers()
    nodes.register("a", a.url, free_memory=1 << 30)
    nodes.register("b", b.url, free_memory=2 << 30)
    create_pool(cp, namespace, nodes, replicas=1)
    # Short probe and resync intervals: many probes and passes in the steady state below.
    operator = run_operator(namespace, "--probe-interval", "0.25", "--resync-interval", "0.25")
    metrics_url = re.search(r"operator ready url=(http://[0-9.]+:\d+)", operator.log_text()).group(1)
    na, nb = nodes.name("a"), nodes.name("b")

    # One replica: the node with more free memory.
    eventually(lambda: routed(cp, namespace) == [nb], 20, "routed to b", operator)
    eventually(lambda: get_pool(cp, namespace).get("status", {}).get("observedGeneration") == 1, 5, "status", operator)

    def versions() -> tuple[str, str]:
        return (get_pool(cp, namespace)["metadata"]["resourceVersion"],
                get_routes(cp, namespace)[0]["metadata"]["resourceVersion"])

    # Steady state: many probes and passes, no write to the pool or its ConfigMap.
    before, requests_before = versions(), api_requests(metrics_url)
    time.sleep(2.0)  # 8 probe intervals
    assert versions() == before
    assert api_requests(metrics_url) == requests_before
    assert 'mlxpool_operator_reconciles_total{outcome="unchanged"}' in httpx.get(f"{metrics_url}/metrics").text

    # Scale up through the scale subresource: both nodes, new generation observed.
    cp.kubectl("scale", "inferencepool", "tiny", "-n", namespace, "--replicas=2")
    eventually(lambda: routed(cp, namespace) == [na, nb], 5, "scaled to two", operator)
    eventually(lambda: get_pool(cp, namespace)["status"]["observedGeneration"] == 2, 5, "generation 2", operator)
    scale = json.loads(cp.kubectl("get", "--raw",
                                  f"/apis/mlxpool.dev/v1alpha1/namespaces/{namespace}/inferencepools/tiny/scale").stdout)
    assert scale["status"] == {"replicas": 2, "selector": "mlxpool.dev/pool=tiny"}

    # A restarted operator finds everything in place and writes nothing.
    operator.stop()
    before = versions()
    operator = run_operator(namespace, "--probe-interval", "0.25", "--resync-interval", "0.25")
    time.sleep(2.0)
    assert versions() == before

    # A deleted routing table is written again, with a higher revision.
    revision = get_routes(cp, namespace)[1].revision
    cp.kubectl("delete", "configmap", "tiny-routes", "-n", namespace)
    eventually(lambda: get_routes(cp, namespace)[1].revision == revision + 1, 5, "routing table recreated", operator)

    # Scale to zero: an empty table, and Ready says why.
    cp.kubectl("scale", "inferencepool", "tiny", "-n", namespace, "--replicas=0")
    eventually(lambda: routed(cp, namespace) == [], 5, "scaled to zero", operator)
    eventually(lambda: conditions(get_pool(cp, namespace))["Ready"] == ("False", "ScaledToZero"), 5,
               "Ready=False ScaledToZero", operator)


def test_capacity_weights_from_chip_then_measured_rate(controlplane, namespace, nodes, health_servers, run_operator):
    """Weights in the table: first the bandwidth prior (M2 Ultra 800 GB/s vs M2 100 GB/s),
    then the decode rate the agent reports, once it reports one."""
    cp = controlplane
    a, b = health_servers(), health_servers()
    size = 8 << 30
    nodes.register("a", a.url, chip="Apple M2 Ultra", model_bytes=size)
    nodes.register("b", b.url, chip="Apple M2", model_bytes=size)
    create_pool(cp, namespace, nodes, replicas=2)
    operator = run_operator(namespace)
    na, nb = nodes.name("a"), nodes.name("b")

    def weights() -> dict[str, int]:
        return {e.node: e.weight for e in get_routes(cp, namespace)[1].models.get("tiny", [])}

    assert eventually(lambda: weights() == {na: 10, nb: 1}, 20, "weights from the chips' bandwidth", operator)
    # b measured twice a's prior (800e9 / 8 GiB = 93.1 tok/s): b is now the fastest.
    nodes.set_status("b", models=[{"name": "tiny", "memoryBytes": size, "decodeTokensPerSecond": 186.3}])
    assert eventually(lambda: weights() == {na: 5, nb: 10}, 20, "weights from b's measured rate", operator)
