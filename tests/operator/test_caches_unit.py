"""ModelCache specs, keys, status and one reconcile pass (pure parts, and the reconciler
with a faked API and faked agents; the fleet is the real one)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from mlxpool.agentapi import CacheEntry, CachePhase, StageRequest
from mlxpool.nodes import WeightsResidency
from mlxpool.operator.logic.cache_statuses import cache_status, cache_weights, node_entry
from mlxpool.operator.logic.conditions import node_readiness
from mlxpool.operator.logic.endpoints import ProbeResult
from mlxpool.operator.logic.fleet import Fleet
from mlxpool.operator.logic.placement import NodeView
from mlxpool.operator.logic.sources import cache_key
from mlxpool.operator.logic.specs import CacheSpec
from mlxpool.operator.reconcilers.caches import CacheReconciler, CacheState

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
SHA = "ab" * 32


def spec(**kw) -> CacheSpec:
    return CacheSpec.model_validate({"source": "hf://org/model", **kw})


def test_the_agent_gets_bare_sha256_hex_and_the_flags():
    request = spec(digests={"b": f"sha256:{SHA}", "a": SHA}, warm=True, revision="main").stage_request()
    assert request == StageRequest(source="hf://org/model", revision="main", digests={"a": SHA, "b": SHA}, warm=True)


def test_the_key_follows_the_bytes_not_warm_or_pin():
    base = cache_key("ns", "c", spec())
    assert base.startswith("ns.c.") and len(base) == len("ns.c.") + 12
    assert cache_key("ns", "c", spec(warm=True, pin=True)) == base
    assert cache_key("ns", "c", spec(digests={"a": SHA})) != base
    assert cache_key("ns", "c", spec(digests={"a": f"sha256:{SHA}"})) == cache_key("ns", "c", spec(digests={"a": SHA}))
    assert cache_key("ns", "c", spec(revision="v2")) != base
    long = cache_key("n" * 63, "c" * 253, spec())
    assert len(long) <= 253 and long.startswith("mc-")


def test_node_entries_mirror_the_agent():
    entry = CacheEntry(key="k", source="s", phase=CachePhase.DOWNLOADING, progress=0.426, bytes_total=900,
                       bytes_done=383)
    assert node_entry("n", entry) == {"node": "n", "phase": "Downloading", "progress": 43, "bytes": 900}
    assert node_entry("n", None) == {"node": "n", "phase": "Pending"}
    warm = CacheEntry(key="k", source="s", phase=CachePhase.WARM, progress=1, bytes_done=5, load_time_seconds=0.12345,
                      message="pinning refused: RLIMIT_MEMLOCK")
    assert node_entry("n", warm) == {"node": "n", "phase": "Warm", "progress": 100, "bytes": 5,
                                     "loadTimeSeconds": 0.123, "message": "pinning refused: RLIMIT_MEMLOCK"}


@pytest.mark.parametrize(("warm", "phases", "ready", "progressing", "degraded"), [
    (False, [], ("False", "NoNodes"), ("False", "Complete"), ("False", "NoFailures")),
    (False, ["Cached", "Warm"], ("True", "Staged"), ("False", "Complete"), ("False", "NoFailures")),
    (True, ["Cached", "Warm"], ("False", "Staging"), ("True", "Staging"), ("False", "NoFailures")),
    (False, ["Downloading", "Failed"], ("False", "Staging"), ("True", "Staging"), ("True", "StagingFailed")),
])
def test_cache_conditions(warm, phases, ready, progressing, degraded):
    nodes = [{"node": f"n{i}", "phase": p} for i, p in enumerate(phases)]
    status = cache_status(spec=spec(warm=warm), key="k", generation=2, nodes=nodes, previous={}, now=NOW)
    got = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert got == {"Ready": ready, "Progressing": progressing, "Degraded": degraded}
    assert status["cacheKey"] == "k" and status["observedGeneration"] == 2


@pytest.mark.parametrize(("age", "ready", "probe", "expected"), [
    (1, True, True, (True, "AgentReady")),
    (None, True, True, (False, "NoHeartbeat")),
    (31, True, True, (False, "HeartbeatStale")),
    (1, False, True, (False, "AgentNotReady")),
    (1, True, False, (False, "HealthProbeFailed")),
])
def test_node_readiness(age, ready, probe, expected):
    status, reason, message = node_readiness(agent_ready=ready, heartbeat_age=age, stale_after=30,
                                             probe_healthy=probe, probe_message="cannot connect" if not probe else "")
    assert (status, reason) == expected and message


class FakeKube:
    def __init__(self) -> None:
        self.patches: list[dict] = []

    async def patch_cache_status(self, namespace: str, name: str, status: Mapping) -> dict:
        self.patches.append(dict(status))
        return dict(status)


class FakeAgents:
    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], CacheEntry] = {}
        self.calls: list[tuple[str, str, str]] = []

    async def cache_entry(self, url: str, key: str) -> CacheEntry | None:
        self.calls.append(("get", url, key))
        return self.entries.get((url, key))

    async def stage(self, url: str, key: str, request: StageRequest) -> CacheEntry:
        self.calls.append(("put", url, key))
        self.entries[url, key] = CacheEntry(key=key, source=request.source, phase=CachePhase.CACHED)
        return self.entries[url, key]

    async def delete_cache(self, url: str, key: str) -> bool:
        self.calls.append(("delete", url, key))
        return self.entries.pop((url, key), None) is not None


class Events:
    def __init__(self) -> None:
        self.posted: list[str] = []

    def info(self, reason: str, message: str) -> None:
        self.posted.append(reason)

    warn = info


def node(name: str, age: float = 1) -> NodeView:
    return NodeView(name=name, endpoint=f"http://{name}", labels={"zone": "a"}, ready=True,
                    heartbeat=NOW - timedelta(seconds=age), free_memory_bytes=None, models=frozenset())


def body(generation: int = 1, status: dict | None = None) -> dict:
    return {"metadata": {"name": "c", "namespace": "ns", "generation": generation},
            "spec": {"source": "hf://org/model"}, "status": status or {}}


@pytest.fixture
def parts():
    fleet, kube, agents = Fleet(), FakeKube(), FakeAgents()
    for n in ("a", "b"):
        fleet.observed.set_view(node(n))
        fleet.observed.observe_probe(n, ProbeResult(True))
    return fleet, kube, agents, CacheReconciler(kube, agents, fleet, stale_after=30, clock=lambda: NOW)


async def test_staged_once_then_only_watched_also_after_a_restart(parts):
    _, kube, agents, reconciler = parts
    state = CacheState()
    result = await reconciler.reconcile(body(), state, Events())
    assert [c[0] for c in agents.calls] == ["get", "put", "get", "put"] and result.done
    assert result.status["readySummary"] == "2/2"
    agents.calls.clear()
    await reconciler.reconcile(body(), state, Events())
    assert [c[0] for c in agents.calls] == ["get", "get"] and len(kube.patches) == 1

    agents.calls.clear()
    restarted = CacheState.from_status(result.status)
    await reconciler.reconcile(body(), restarted, Events())
    assert [c[0] for c in agents.calls] == ["get", "get"]

    agents.calls.clear()  # a spec change (say, warm) is sent again
    await reconciler.reconcile(body(generation=2), restarted, Events())
    assert [c[0] for c in agents.calls] == ["get", "put", "get", "put"]


async def test_cleanup_skips_gone_and_stale_nodes_and_keeps_the_rest_pending(parts):
    fleet, _, agents, reconciler = parts
    state = CacheState()
    await reconciler.reconcile(body(), state, Events())
    fleet.observed.set_view(node("a", age=300))  # stale: gone for good
    fleet.observed.set_view(node("c"))           # listed nowhere: not asked
    agents.calls.clear()
    assert await reconciler.cleanup(body(status=state.status), Events()) == []
    assert agents.calls == [("delete", "http://b", state.status["cacheKey"])]


async def test_new_bytes_get_a_new_key_and_the_old_copies_go(parts):
    _, _, agents, reconciler = parts
    state = CacheState()
    await reconciler.reconcile(body(), state, Events())
    old_key = state.status["cacheKey"]
    agents.calls.clear()
    changed = body(generation=2)
    changed["spec"]["source"] = "hf://org/model@v2"
    await reconciler.reconcile(changed, state, Events())
    new_key = state.status["cacheKey"]
    assert new_key != old_key
    assert sorted(c for c in agents.calls if c[0] != "get") == [
        ("delete", "http://a", old_key), ("delete", "http://b", old_key),
        ("put", "http://a", new_key), ("put", "http://b", new_key)]


def test_a_nodes_entry_sums_the_residency_of_the_models_loaded_from_the_copy():
    def where(total: int, resident: int, pinned: int = 0) -> WeightsResidency:
        return WeightsResidency(total_bytes=total, resident_bytes=resident, pinned_bytes=pinned, mapped_bytes=0)

    loaded = [("tiny", "/var/cache/mlxpool/ns.c.abc", where(400, 300, 100)),
              ("tiny-2", "/private/var/cache/mlxpool/ns.c.abc", where(400, 400)),  # symlinks resolved: the key matches
              ("other", "/models/other", where(900, 900)),
              ("nopath", None, where(1, 1))]
    weights = cache_weights("ns.c.abc", "/var/cache/mlxpool/ns.c.abc", loaded)
    assert weights == {"models": ["tiny", "tiny-2"], "totalBytes": 800, "residentBytes": 700, "pinnedBytes": 100,
                       "mappedBytes": 0}
    assert cache_weights("ns.c.abc", "/var/cache/mlxpool/ns.c.abc", loaded[2:]) is None
    entry = CacheEntry(key="k", source="s", phase=CachePhase.CACHED, progress=1, bytes_done=5)
    assert node_entry("n", entry, weights=weights)["weights"] == weights
    assert "weights" not in node_entry("n", entry, weights=None) and "weights" not in node_entry("n", None)
    nodes = [node_entry("a", entry, weights=weights), node_entry("b", entry)]
    assert cache_status(spec=spec(), key="k", generation=1, nodes=nodes, previous={}, now=NOW)["resident"] == \
        "0.0 GiB"
    assert "resident" not in cache_status(spec=spec(), key="k", generation=1, nodes=nodes[1:], previous={}, now=NOW)


async def test_the_status_follows_the_inference_nodes_residency(parts):
    fleet, _, agents, reconciler = parts
    state = CacheState()
    await reconciler.reconcile(body(), state, Events())
    key = state.status["cacheKey"]
    assert all("weights" not in n for n in state.status["nodes"])
    agents.entries["http://a", key].path = f"/cache/{key}"
    where = WeightsResidency(total_bytes=2 << 30, resident_bytes=1 << 30, pinned_bytes=1 << 29, mapped_bytes=0)
    fleet.observed.set_view(replace(node("a"), residency=(("model", f"/cache/{key}", where),)))
    await reconciler.reconcile(body(), state, Events())
    by_node = {n["node"]: n for n in state.status["nodes"]}
    assert by_node["a"]["weights"] == {"models": ["model"], "totalBytes": 2 << 30, "residentBytes": 1 << 30,
                                       "pinnedBytes": 1 << 29, "mappedBytes": 0}
    assert "weights" not in by_node["b"] and state.status["resident"] == "1.0 GiB"


def test_a_node_view_reads_residency_from_the_status():
    status = {"ready": True, "models": [
        {"name": "m", "path": "/cache/k", "weights": {"totalBytes": 10, "residentBytes": 9, "pinnedBytes": 0,
                                                        "mappedBytes": 0}},
        {"name": "unmeasured", "path": "/x"}]}
    view = NodeView.from_body({"metadata": {"name": "n"}, "status": status, "spec": {
        "endpoint": "http://n", "hardware": {"chip": "c", "memoryBytes": 1, "cpuCores": 1, "accelerator": "cpu",
                                             "platform": "linux-x86_64"}}})
    assert view.residency == (("m", "/cache/k", WeightsResidency(total_bytes=10, resident_bytes=9, pinned_bytes=0,
                                                                 mapped_bytes=0)),)
    assert view.routing_key() == replace(view, residency=()).routing_key()  # placement does not see it
