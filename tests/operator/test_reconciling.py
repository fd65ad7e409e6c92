"""One reconcile pass: what it writes, when it writes nothing, which events it posts.

Faked: the Kubernetes API (an in-memory ConfigMap and status that count requests),
the prober (a dict of results) and the event sink (a list). The pure modules behind
the reconciler are the real ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone

import pytest

from mlxpool.operator.endpoints import ProbeResult
from mlxpool.operator.placement import NodeView
from mlxpool.operator.reconciling import PoolReconciler, PoolState
from mlxpool.routing import RoutingTable

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


class FakeKube:
    def __init__(self, table: RoutingTable | None = None) -> None:
        self.table = table
        self.status: dict = {}
        self.requests: list[str] = []

    async def read_routes(self, namespace: str, pool: str) -> RoutingTable | None:
        self.requests.append("get configmap")
        return self.table

    async def write_routes(self, pool: Mapping, table: RoutingTable, exists: bool) -> None:
        self.requests.append("patch configmap" if exists else "create configmap")
        self.table = table

    async def patch_pool_status(self, namespace: str, name: str, status: Mapping) -> dict:
        self.requests.append("patch status")
        self.status = {**self.status, **status}
        return dict(self.status)


class FakeProber:
    def __init__(self) -> None:
        self.down: dict[str, str] = {}

    async def probe_all(self, endpoints: Mapping[str, str]) -> dict[str, ProbeResult]:
        return {k: ProbeResult(False, self.down[url]) if url in self.down else ProbeResult(True)
                for k, url in endpoints.items()}


class FakeEvents:
    def __init__(self) -> None:
        self.posted: list[tuple[str, str, str]] = []

    def info(self, reason: str, message: str) -> None:
        self.posted.append(("Normal", reason, message))

    def warn(self, reason: str, message: str) -> None:
        self.posted.append(("Warning", reason, message))

    def reasons(self) -> list[str]:
        return [r for _, r, _ in self.posted]


def node(name: str, ready: bool = True) -> NodeView:
    return NodeView(name=name, endpoint=f"http://{name}:8101", labels={}, ready=ready,
                    heartbeat=NOW - timedelta(seconds=1), free_memory_bytes=0, models=frozenset({"tiny"}))


def pool(replicas: int = 2, generation: int = 1) -> dict:
    return {"metadata": {"name": "tiny", "namespace": "ns", "uid": "u-1", "generation": generation},
            "spec": {"models": [{"name": "tiny"}], "replicas": replicas}}


@pytest.fixture
def world():
    kube, prober, events = FakeKube(), FakeProber(), FakeEvents()
    reconciler = PoolReconciler(kube, prober, stale_after=30, clock=lambda: NOW)
    return kube, prober, events, reconciler


async def test_first_pass_writes_table_and_status_then_nothing(world):
    kube, prober, events, reconciler = world
    state = PoolState()
    first = await reconciler.reconcile(pool(), [node("a"), node("b")], state, events)
    assert kube.requests == ["get configmap", "create configmap", "patch status"]
    assert [e.node for e in kube.table.endpoints_for("tiny")] == ["a", "b"]
    assert kube.status["readyReplicas"] == 2 and kube.status["routingRevision"] == 1
    assert first.outcome == "routes+status"
    assert events.reasons() == ["PlacementChanged"]

    kube.requests.clear()
    again = await reconciler.reconcile(pool(), [node("a"), node("b")], state, events)
    assert kube.requests == [] and again.outcome == "unchanged"
    assert events.reasons() == ["PlacementChanged"]


async def test_a_failing_probe_drops_the_endpoint_and_warns(world):
    kube, prober, events, reconciler = world
    state = PoolState()
    await reconciler.reconcile(pool(), [node("a"), node("b")], state, events)
    kube.requests.clear()

    prober.down["http://b:8101"] = "cannot connect"
    await reconciler.reconcile(pool(), [node("a"), node("b")], state, events)
    assert kube.requests == ["patch configmap", "patch status"]
    assert [e.node for e in kube.table.models["tiny"]] == ["a"] and kube.table.revision == 2
    b = next(e for e in kube.status["endpoints"] if e["node"] == "b")
    assert b["healthy"] is False and b["message"] == "cannot connect"
    assert events.posted[-1] == ("Warning", "EndpointUnhealthy", "b (http://b:8101): cannot connect")

    # The same failure again: nothing to write, no second warning.
    kube.requests.clear()
    await reconciler.reconcile(pool(), [node("a"), node("b")], state, events)
    assert kube.requests == [] and events.reasons().count("EndpointUnhealthy") == 1

    del prober.down["http://b:8101"]
    await reconciler.reconcile(pool(), [node("a"), node("b")], state, events)
    assert kube.table.revision == 3 and events.reasons()[-1] == "EndpointRecovered"


async def test_a_node_that_is_not_ready_drops_out_with_its_reason(world):
    kube, prober, events, reconciler = world
    state = PoolState()
    await reconciler.reconcile(pool(), [node("a"), node("b")], state, events)
    await reconciler.reconcile(pool(), [node("a"), node("b", ready=False)], state, events)
    assert [e["node"] for e in kube.status["endpoints"]] == ["a"]
    assert kube.status["replicas"] == 1
    assert events.posted[-1] == ("Normal", "PlacementChanged", "endpoints now: a; removed b (not ready)")


async def test_scaling_observes_the_new_generation(world):
    kube, prober, events, reconciler = world
    state = PoolState()
    await reconciler.reconcile(pool(replicas=1), [node("a"), node("b")], state, events)
    assert kube.status["replicas"] == 1
    await reconciler.reconcile(pool(replicas=2, generation=2), [node("a"), node("b")], state, events)
    assert kube.status["replicas"] == 2 and kube.status["observedGeneration"] == 2


async def test_a_restarted_operator_rewrites_nothing_and_repeats_no_event(world):
    kube, prober, events, reconciler = world
    await reconciler.reconcile(pool(), [node("a"), node("b")], PoolState(), events)
    kube.requests.clear()
    events.posted.clear()

    restarted = PoolState.from_status(kube.status)  # what the daemon starts from
    await reconciler.reconcile(pool(), [node("a"), node("b")], restarted, events)
    assert kube.requests == ["get configmap"]
    assert events.posted == []


async def test_a_lost_configmap_is_created_again_with_a_higher_revision(world):
    kube, prober, events, reconciler = world
    state = PoolState()
    await reconciler.reconcile(pool(), [node("a")], state, events)
    state.forget_table()
    kube.requests.clear()
    await reconciler.reconcile(pool(), [node("a")], state, events)
    assert kube.requests == ["create configmap", "patch status"]
    assert kube.table.revision == 2 and kube.status["routingRevision"] == 2
