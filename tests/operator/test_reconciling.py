"""One pool reconcile pass: what it writes, what it asks agents, when it does nothing.

Faked: the Kubernetes API (an in-memory ConfigMap and status that count requests),
the agents (a recorder answering load/stage/unload calls), the event sink (a list).
The fleet, placement and every pure module behind the reconciler are the real ones;
probe results and agent reports are fed to the fleet as the node monitors would.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from mlxpool.agentapi import (
    CacheEntry,
    CachePhase,
    LoadModelRequest,
    ModelPhase,
    ModelState,
    NodeReport,
    PrefetchPhase,
    PrefetchRequest,
    PrefetchState,
    StageRequest,
)
from mlxpool.nodes import Hardware
from mlxpool.operator.io.agentclient import AgentError
from mlxpool.operator.logic.endpoints import ProbeResult
from mlxpool.operator.logic.fleet import Fleet
from mlxpool.operator.logic.placement import NodeView
from mlxpool.operator.logic.sources import CacheRef, source_key
from mlxpool.operator.reconcilers.pools import PoolReconciler, PoolState, seed_fleet
from mlxpool.routing import RoutingTable

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
HW = Hardware(chip="c", memory_bytes=1, cpu_cores=1, accelerator="cpu", platform="p")


class FakeKube:
    def __init__(self, table: RoutingTable | None = None) -> None:
        self.table = table
        self.status: dict = {}
        self.requests: list[str] = []

    async def read_routes(self, namespace: str, pool: str) -> RoutingTable | None:
        self.requests.append("get configmap")
        return self.table

    async def write_routes(self, pool: Mapping, table: RoutingTable, exists: bool, *,
                           create_only: bool = False) -> None:
        self.requests.append("patch configmap" if exists else "create configmap")
        if create_only and self.table is not None and self.table.pool == table.pool:  # one table held
            raise ApiException(status=409, reason="Conflict")
        self.table = table

    async def patch_pool_status(self, namespace: str, name: str, status: Mapping) -> dict:
        self.requests.append("patch status")
        self.status = {**self.status, **status}
        return dict(self.status)


class FakeAgents:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.prefetched: list[tuple[str, str | None]] = []
        self.refuse: dict[str, AgentError] = {}

    async def load(self, url: str, request: LoadModelRequest) -> ModelState:
        self.calls.append(("load", url, request.name, request.path or request.cache_key))
        if url in self.refuse:
            raise self.refuse[url]
        return ModelState(name=request.name, phase=ModelPhase.LOADING)

    async def unload(self, url: str, model: str) -> ModelState:
        self.calls.append(("unload", url, model))
        return ModelState(name=model, phase=ModelPhase.UNLOADING)

    async def stage(self, url: str, key: str, request: StageRequest) -> CacheEntry:
        self.calls.append(("stage", url, key, request.source))
        return CacheEntry(key=key, source=request.source, phase=CachePhase.DOWNLOADING)

    async def prefetch(self, url: str, request: PrefetchRequest) -> PrefetchState:
        self.prefetched.append((url, request.path or request.cache_key))
        if url in self.refuse:
            raise self.refuse[url]
        return PrefetchState(path=request.path or "", phase=PrefetchPhase.PREFETCHING)


class FakeEvents:
    def __init__(self) -> None:
        self.posted: list[tuple[str, str, str]] = []

    def info(self, reason: str, message: str) -> None:
        self.posted.append(("Normal", reason, message))

    def warn(self, reason: str, message: str) -> None:
        self.posted.append(("Warning", reason, message))

    def reasons(self) -> list[str]:
        return [r for _, r, _ in self.posted]


def node(name: str, ready: bool = True, models: tuple[str, ...] = ("tiny",), labels: dict | None = None) -> NodeView:
    return NodeView(name=name, endpoint=f"http://{name}:8101", labels=labels or {}, ready=ready,
                    heartbeat=NOW - timedelta(seconds=1), free_memory_bytes=0, models=frozenset(models), max_models=4)


def report(name: str, models: dict[str, str] | None = None, cache: dict[str, str] | None = None,
           free: int = 8 << 30) -> NodeReport:
    return NodeReport(name=name, endpoint=f"http://{name}:8101", hardware=HW, max_models=4,
                      free_memory_bytes=free, agent_version="t",
                      models=[ModelState(name=m, phase=ModelPhase(p)) for m, p in (models or {}).items()],
                      cache=[CacheEntry(key=k, source="hf://x", phase=CachePhase(p)) for k, p in (cache or {}).items()])


def pool(replicas: int = 2, generation: int = 1, name: str = "tiny", models: list | None = None) -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "uid": "u-1", "generation": generation},
            "spec": {"models": models or [{"name": "tiny"}], "replicas": replicas}}


class World:
    def __init__(self) -> None:
        self.kube, self.agents, self.events = FakeKube(), FakeAgents(), FakeEvents()
        self.fleet = Fleet(retry_after=30, clock=lambda: 0.0)
        self.reconciler = PoolReconciler(self.kube, self.agents, self.fleet, stale_after=30, clock=lambda: NOW)

    def add(self, *views: NodeView, reports: bool = False) -> None:
        for v in views:
            self.fleet.observed.set_view(v)
            self.fleet.observed.observe_probe(v.name, ProbeResult(True))
            if reports:
                self.fleet.observed.observe_report(v.name, report(v.name))

    async def run(self, body: dict, state: PoolState, caches: Mapping[str, CacheRef] | None = None):
        return await self.reconciler.reconcile(body, caches or {}, state, self.events)

    def routed(self, model: str = "tiny") -> list[str]:
        return [e.node for e in self.kube.table.endpoints_for(model)]


@pytest.fixture
def world() -> World:
    return World()


async def test_first_pass_writes_table_and_status_then_nothing(world):
    world.add(node("a"), node("b"))
    state = PoolState()
    first = await world.run(pool(), state)
    assert world.kube.requests == ["create configmap", "patch status"]  # a new pool: no table to read
    assert world.routed() == ["a", "b"]
    assert world.kube.status["readyReplicas"] == 2 and world.kube.status["routingRevision"] == 1
    assert world.kube.status["readySummary"] == "2/2"
    assert first.outcome == "routes+status" and first.settled and first.interest == {"a", "b"}
    assert world.events.reasons() == ["PlacementChanged"]

    world.kube.requests.clear()
    again = await world.run(pool(), state)
    assert world.kube.requests == [] and again.outcome == "unchanged" and world.agents.calls == []
    assert world.events.reasons() == ["PlacementChanged"]


async def test_a_failing_probe_drops_the_endpoint_and_warns(world):
    world.add(node("a"), node("b"))
    state = PoolState()
    await world.run(pool(), state)
    world.kube.requests.clear()

    world.fleet.observed.observe_probe("b", ProbeResult(False, "cannot connect"))
    await world.run(pool(), state)
    assert world.kube.requests == ["patch configmap", "patch status"]
    assert world.routed() == ["a"] and world.kube.table.revision == 2
    b = next(e for e in world.kube.status["endpoints"] if e["node"] == "b")
    assert b["healthy"] is False and b["message"] == "cannot connect"
    assert world.events.posted[-1] == ("Warning", "EndpointUnhealthy", "b (http://b:8101): cannot connect")

    world.kube.requests.clear()
    await world.run(pool(), state)
    assert world.kube.requests == [] and world.events.reasons().count("EndpointUnhealthy") == 1

    world.fleet.observed.observe_probe("b", ProbeResult(True))
    await world.run(pool(), state)
    assert world.kube.table.revision == 3 and world.events.reasons()[-1] == "EndpointRecovered"


async def test_a_node_that_is_not_ready_drops_out_with_its_reason(world):
    world.add(node("a"), node("b"))
    state = PoolState()
    await world.run(pool(), state)
    world.fleet.observed.set_view(node("b", ready=False))
    await world.run(pool(), state)
    assert [e["node"] for e in world.kube.status["endpoints"]] == ["a"]
    assert world.kube.status["replicas"] == 1
    assert world.events.posted[-1] == ("Normal", "PlacementChanged", "endpoints now: a; removed b (not ready)")
    progressing = next(c for c in world.kube.status["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "WaitingForNodes" and "1 node(s): not ready" in progressing["message"]


async def test_scaling_observes_the_new_generation(world):
    world.add(node("a"), node("b"))
    state = PoolState()
    await world.run(pool(replicas=1), state)
    assert world.kube.status["replicas"] == 1
    await world.run(pool(replicas=2, generation=2), state)
    assert world.kube.status["replicas"] == 2 and world.kube.status["observedGeneration"] == 2


async def test_a_new_pool_over_an_older_table_reads_it_and_goes_past_its_revision(world):
    """A pool made again under its name before the old ConfigMap was collected: the create
    without a GET fails, the next pass reads the old table and writes a later revision
    (routers ignore an older one)."""
    world.add(node("a"), node("b"))
    world.kube.table = RoutingTable(pool="tiny", namespace="ns", revision=7, models={})
    state = PoolState()
    with pytest.raises(ApiException):
        await world.run(pool(), state)
    await world.run(pool(), state)
    assert world.kube.requests == ["create configmap", "get configmap", "patch configmap", "patch status"]
    assert world.kube.table.revision == 8 and world.routed() == ["a", "b"]


async def test_a_restarted_operator_rewrites_nothing_and_repeats_no_event(world):
    world.add(node("a"), node("b"))
    await world.run(pool(), PoolState())
    world.kube.requests.clear()
    world.events.posted.clear()

    restarted = PoolState.from_status(world.kube.status)  # what the daemon starts from
    await world.run(pool(), restarted)
    assert world.kube.requests == ["get configmap"]
    assert world.events.posted == []


async def test_a_lost_configmap_is_created_again_with_a_higher_revision(world):
    world.add(node("a"))
    state = PoolState()
    await world.run(pool(), state)
    state.forget_table()
    world.kube.requests.clear()
    await world.run(pool(), state)
    assert world.kube.requests == ["create configmap", "patch status"]
    assert world.kube.table.revision == 2 and world.kube.status["routingRevision"] == 2


SOURCED = [{"name": "tiny", "source": "file:///models/tiny"}]


async def test_models_are_loaded_once_and_routed_when_ready(world):
    world.add(node("a", models=()), node("b", models=()), reports=True)
    state = PoolState()
    result = await world.run(pool(models=SOURCED), state)
    assert world.agents.calls == [("load", "http://a:8101", "tiny", "/models/tiny"),
                                  ("load", "http://b:8101", "tiny", "/models/tiny")]
    assert result.calls == 2 and not result.settled
    assert world.routed() == [] and world.kube.status["readyReplicas"] == 0
    conditions = {c["type"]: c for c in world.kube.status["conditions"]}
    assert conditions["Progressing"]["reason"] == "LoadingModels"
    assert world.kube.status["endpoints"][0]["pending"] == ["tiny"]
    assert world.kube.status["endpoints"][0]["managedModels"] == ["tiny"]

    # Loading: a second pass asks for nothing.
    await world.run(pool(models=SOURCED), state)
    assert len(world.agents.calls) == 2

    world.fleet.observed.observe_report("a", report("a", {"tiny": "ready"}))
    world.fleet.observed.observe_report("b", report("b", {"tiny": "ready"}))
    result = await world.run(pool(models=SOURCED), state)
    assert world.routed() == ["a", "b"] and result.settled
    assert world.kube.status["readyReplicas"] == 2 and "pending" not in world.kube.status["endpoints"][0]
    assert world.events.reasons().count("ModelReady") == 2 and world.events.reasons().count("LoadingModel") == 2


async def test_a_restarted_operator_does_not_load_again(world):
    world.add(node("a", models=()), reports=True)
    await world.run(pool(replicas=1, models=SOURCED), PoolState())
    assert len(world.agents.calls) == 1
    status = world.kube.status

    restarted = World()  # a new process: empty memory, the same agents
    restarted.kube.status = status
    restarted.agents = world.agents
    restarted.reconciler._agents = world.agents
    seed_fleet(restarted.fleet, ("ns", "tiny"), {**pool(replicas=1, models=SOURCED), "status": status})
    restarted.add(node("a", models=()))
    await restarted.run(pool(replicas=1, models=SOURCED), PoolState.from_status(status))
    assert len(world.agents.calls) == 1  # no report yet: no call at all
    restarted.fleet.observed.observe_report("a", report("a", {"tiny": "loading"}))
    await restarted.run(pool(replicas=1, models=SOURCED), PoolState.from_status(status))
    assert len(world.agents.calls) == 1  # the agent is already loading it


async def test_a_refused_load_moves_the_replica_to_another_node(world):
    world.add(node("a", models=()), node("b", models=()), reports=True)
    world.agents.refuse["http://a:8101"] = AgentError(507, "not enough free memory")
    state = PoolState()
    await world.run(pool(replicas=1, models=SOURCED), state)
    (failed,) = [e for e in world.events.posted if e[1] == "LoadFailed"]
    assert failed[0] == "Warning" and "not enough free memory" in failed[2]
    await world.run(pool(replicas=1, models=SOURCED), state)
    assert world.agents.calls[-1] == ("load", "http://b:8101", "tiny", "/models/tiny")
    assert [e["node"] for e in world.kube.status["endpoints"]] == ["b"]
    assert ("a", "tiny") not in world.fleet.claims.managed


async def test_a_remote_source_is_staged_then_loaded_from_the_copy(world):
    world.add(node("a", models=()), reports=True)
    models = [{"name": "tiny", "source": "hf://org/tiny"}]
    key = source_key("hf://org/tiny")
    state = PoolState()
    await world.run(pool(replicas=1, models=models), state)
    assert world.agents.calls == [("stage", "http://a:8101", key, "hf://org/tiny")]
    assert "tiny on a (staging)" in next(c for c in world.kube.status["conditions"]
                                         if c["type"] == "Progressing")["message"]
    await world.run(pool(replicas=1, models=models), state)
    assert len(world.agents.calls) == 1
    world.fleet.observed.observe_report("a", report("a", cache={key: "Cached"}))
    await world.run(pool(replicas=1, models=models), state)
    assert world.agents.calls[-1] == ("load", "http://a:8101", "tiny", key)


async def test_a_model_cache_serves_only_where_its_copy_is(world):
    ref = CacheRef("ns", "tiny-cache", "tiny", "ns.tiny-cache.abc")
    world.add(node("a", models=()), node("b", models=()), reports=True)
    world.fleet.observed.observe_report("b", report("b", cache={ref.key: "Warm"}))
    state = PoolState()
    await world.run(pool(replicas=2), state, caches={"tiny": ref})
    assert world.agents.calls == [("load", "http://b:8101", "tiny", ref.key)]
    assert [e["node"] for e in world.kube.status["endpoints"]] == ["b"]
    assert "ModelCache ns/tiny-cache is not staged here" in next(
        c for c in world.kube.status["conditions"] if c["type"] == "Progressing")["message"]


async def test_scaling_down_unloads_what_the_operator_loaded_unless_another_pool_uses_it(world):
    world.add(node("a", models=()), node("b", models=()), reports=True)
    state, other = PoolState(), PoolState()
    await world.run(pool(replicas=2, models=SOURCED), state)
    for n in "ab":
        world.fleet.observed.observe_report(n, report(n, {"tiny": "ready"}))
    await world.run(pool(replicas=2, models=SOURCED), state)
    # A second pool uses the same model on both nodes (it loaded nothing itself).
    await world.run(pool(replicas=2, models=SOURCED, name="other"), other)
    world.agents.calls.clear()

    await world.run(pool(replicas=1, models=SOURCED, generation=2), state)
    assert world.agents.calls == []  # "other" still uses it
    await world.run(pool(replicas=1, models=SOURCED, name="other", generation=2), other)
    (unload,) = world.agents.calls
    assert unload[0] == "unload" and unload[2] == "tiny"
    assert world.events.reasons()[-1] == "PlacementChanged" and "UnloadingModel" in world.events.reasons()


async def test_a_model_removed_from_the_spec_is_unloaded_in_place(world):
    world.add(node("a", models=()), reports=True)
    two = [*SOURCED, {"name": "extra", "source": "file:///models/extra"}]
    state = PoolState()
    await world.run(pool(replicas=1, models=two), state)
    world.fleet.observed.observe_report("a", report("a", {"tiny": "ready", "extra": "ready"}))
    await world.run(pool(replicas=1, models=two), state)
    world.agents.calls.clear()
    await world.run(pool(replicas=1, models=SOURCED, generation=2), state)
    assert world.agents.calls == [("unload", "http://a:8101", "extra")]
    assert world.kube.status["endpoints"][0]["models"] == ["tiny"]


async def test_models_the_agent_was_started_with_are_never_unloaded(world):
    world.add(node("a"), reports=False)  # serves tiny from the start; the operator loaded nothing
    state = PoolState()
    await world.run(pool(replicas=1), state)
    await world.run(pool(replicas=0, generation=2), state)
    assert world.agents.calls == []
    assert world.fleet.claims.release(("ns", "tiny")) == []


async def test_a_restart_before_the_first_probes_keeps_the_recorded_health(world):
    world.add(node("a"), node("b"))
    await world.run(pool(), PoolState())
    status, table = world.kube.status, world.kube.table

    restarted = World()
    restarted.kube.status, restarted.kube.table = status, table
    for n in (node("a"), node("b")):
        restarted.fleet.observed.set_view(n)  # known from the watch, not probed yet
    await restarted.run(pool(), PoolState.from_status(status))
    assert restarted.kube.requests == ["get configmap"] and restarted.routed() == ["a", "b"]

    restarted.fleet.observed.observe_probe("a", ProbeResult(False, "cannot connect"))  # the first probe settles it
    await restarted.run(pool(), PoolState.from_status(status))
    assert restarted.routed() == ["b"]


async def test_an_unload_for_an_agent_that_does_not_answer_is_deferred(world):
    world.add(node("a", models=()), node("b", models=()), reports=True)
    state = PoolState()
    await world.run(pool(replicas=1, models=SOURCED), state)
    (placed,) = [e["node"] for e in world.kube.status["endpoints"]]
    world.agents.calls.clear()
    world.fleet.observed.observe_probe(placed, ProbeResult(False, "cannot connect"))
    await world.run(pool(replicas=1, models=SOURCED), state)
    assert [c[0] for c in world.agents.calls] == ["load"]  # the replacement; no unload to a dead agent
    assert world.fleet.claims.deferred_unloads(placed) == ["tiny"]


async def test_a_pool_whose_own_nodes_suffice_looks_at_no_other_node(world):
    """The ranking puts held healthy nodes first, so the pass skips the fleet: its interest
    is its own nodes (others' changes do not wake it); a failing node brings the fleet back."""
    world.add(node("a"), node("b"), node("c"), node("d"))
    state = PoolState()
    first = await world.run(pool(), state)
    assert first.interest == {"a", "b", "c", "d"} and world.routed() == ["a", "b"]
    again = await world.run(pool(), state)
    assert again.interest == {"a", "b"}

    world.fleet.observed.observe_probe("b", ProbeResult(False, "cannot connect"))
    replaced = await world.run(pool(), state)
    assert replaced.interest == {"a", "b", "c", "d"} and world.routed() == ["a", "c"]


async def test_the_node_a_replica_would_go_to_next_is_told_to_prefetch_once(world):
    body = pool(replicas=2, models=[{"name": "tiny", "source": "file:///models/tiny"}])
    world.add(node("a", models=()), node("b", models=()), node("c", models=()), reports=True)
    world.fleet.observed.observe_report("a", report("a", free=9 << 30))
    world.fleet.observed.observe_report("b", report("b", free=9 << 30))
    world.agents.refuse["http://c:8101"] = AgentError(404, "no such route")  # an older agent: no harm done
    state = PoolState()
    first = await world.run(body, state)
    assert [c[1] for c in world.agents.calls] == ["http://a:8101", "http://b:8101"]  # the two loads
    assert world.agents.prefetched == [("http://c:8101", "/models/tiny")] and first.prefetches == 1
    # Announced already (answered or not): not again, even from a pass over the whole fleet.
    world.fleet.observed.observe_probe("b", ProbeResult(False, "down"))
    again = await world.run(body, state)
    assert world.agents.prefetched == [("http://c:8101", "/models/tiny")] and again.prefetches == 0
