"""Placement: label selectors, node eligibility (readiness, models, sources, room) and
the choice of replicas (pure)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from mlxpool.agentapi import CacheEntry, CachePhase, ModelPhase, ModelState, ModelTier, NodeReport
from mlxpool.nodes import Hardware
from mlxpool.operator.logic.endpoints import ProbeResult
from mlxpool.operator.logic.placement import (
    AgentView,
    Candidate,
    NodeView,
    choose,
    endpoints_of,
    exclusion_reason,
    place,
    selector_matches,
)
from mlxpool.operator.logic.sources import LoadSource, resolve
from mlxpool.operator.logic.specs import LabelSelector, PoolSpec

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
GIB = 1 << 30
UP = ProbeResult(True)


def view(name: str, *, labels: dict | None = None, ready: bool = True, age: float | None = 1.0,
         models: tuple[str, ...] = ("tiny",), free: int | None = 0, max_models: int = 4) -> NodeView:
    return NodeView(
        name=name, endpoint=f"http://127.0.0.1/{name}", labels=labels or {"role": "inference"}, ready=ready,
        heartbeat=None if age is None else NOW - timedelta(seconds=age), free_memory_bytes=free,
        models=frozenset(models), max_models=max_models,
    )


def agent(models: dict[str, str] | None = None, cache: dict[str, str] | None = None, free: int | None = 8 * GIB,
          max_models: int = 4) -> AgentView:
    """An agent's view with phases named by their values (`{"tiny": "loading"}`)."""
    return AgentView(models={m: ModelPhase(p) for m, p in (models or {}).items()},
                     cache={k: CachePhase(p) for k, p in (cache or {}).items()},
                     free_memory_bytes=free, max_models=max_models)


def cand(name: str, *, probe: ProbeResult = UP, agent_view: AgentView | None = None, failures: dict | None = None,
         reserved_slots: int = 0, reserved_bytes: int = 0, **kw) -> Candidate:
    return Candidate(view=view(name, **kw), agent=agent_view, agent_error=None if agent_view else "HTTP 403: no token",
                     probe=probe, failures=failures or {}, reserved_slots=reserved_slots, reserved_bytes=reserved_bytes)


def pool(**spec) -> PoolSpec:
    return PoolSpec.model_validate({"models": [{"name": "tiny"}], **spec})


FROM_PATH = {"tiny": LoadSource(origin="spec.models[].source", path="/models/tiny")}
FROM_CACHE = {"tiny": LoadSource(origin="ModelCache ns/tiny", cache_key="ns.tiny.abc")}


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    (None, {}, True),
    ({}, {"a": "1"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({"matchLabels": {"a": "1"}}, {}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"b": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": "1"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "1"}, False),
    ({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]}, {"a": "1"}, False),
])
def test_label_selector_semantics(selector, labels, expected):
    parsed = None if selector is None else LabelSelector.model_validate(selector)
    assert selector_matches(parsed, labels) is expected


@pytest.mark.parametrize(("candidate", "sources", "reason"), [
    (cand("a"), {}, None),
    (cand("a", labels={"role": "batch"}), {}, "does not match the pool's nodeSelector"),
    (cand("a", ready=False), {}, "not ready"),
    (cand("a", age=None), {}, "has no heartbeat"),
    (cand("a", age=31), {}, "heartbeat is stale (31s old)"),
    (cand("a", models=("other",)), {}, "serves none of the pool's models and can load none: "
                                       "tiny: no source (set spec.models[].source or create a ModelCache for it)"),
    (cand("a", models=("other", "tiny")), {}, None),
    # The agent's report wins over the heartbeat's model list, and loading counts as serving.
    (cand("a", agent_view=agent({"tiny": "loading"})), {}, None),
    (cand("a", models=(), agent_view=agent()), FROM_PATH, None),
    (cand("a", models=()), FROM_PATH, "serves none of the pool's models and can load none: tiny: the agent's "
                                      "operations API is unavailable (HTTP 403: no token)"),
    (cand("a", models=(), agent_view=agent()), FROM_CACHE,
     "serves none of the pool's models and can load none: tiny: ModelCache ns/tiny is not staged here"),
    (cand("a", models=(), agent_view=agent(cache={"ns.tiny.abc": "Downloading"})), FROM_CACHE,
     "serves none of the pool's models and can load none: tiny: ModelCache ns/tiny is not staged here "
     "(phase Downloading)"),
    (cand("a", models=(), agent_view=agent(cache={"ns.tiny.abc": "Warm"})), FROM_CACHE, None),
    (cand("a", models=(), agent_view=agent(), failures={"tiny": "out of memory"}), FROM_PATH,
     "serves none of the pool's models and can load none: tiny failed to load here: out of memory"),
    (cand("a", models=(), agent_view=agent({"x": "ready", "y": "ready"}, max_models=2)), FROM_PATH,
     "no room: 1 more model(s) on a node holding 2 of 2"),
    (cand("a", models=(), agent_view=agent({"x": "ready"}, max_models=2), reserved_slots=1), FROM_PATH,
     "no room: 1 more model(s) on a node holding 2 of 2"),
    (cand("a", models=(), agent_view=agent(free=3 * GIB)), FROM_PATH, "no room: needs 4.0 GiB, 3.0 GiB free"),
    (cand("a", models=(), agent_view=agent(free=5 * GIB), reserved_bytes=2 * GIB), FROM_PATH,
     "no room: needs 4.0 GiB, 3.0 GiB free"),
    (cand("a", models=(), agent_view=agent(free=5 * GIB)), FROM_PATH, None),
])
def test_exclusion_reasons(candidate, sources, reason):
    spec = pool(nodeSelector={"matchLabels": {"role": "inference"}})
    assert exclusion_reason(candidate, spec, sources, {"tiny": 4 * GIB}, NOW, stale_after=30) == reason


def test_a_node_the_pool_holds_is_not_checked_for_room_again():
    full = cand("a", models=(), agent_view=agent({"x": "ready"}, free=0, max_models=1))
    assert exclusion_reason(full, pool(), FROM_PATH, {}, NOW, 30, held=False).startswith("no room")
    assert exclusion_reason(full, pool(), FROM_PATH, {}, NOW, 30, held=True) is None


def test_place_chooses_and_explains_the_rest():
    candidates = [cand("c"), cand("a", ready=False), cand("b"), cand("d", age=100), cand("e", labels={"x": "y"})]
    placed = place(candidates, pool(replicas=5, nodeSelector={"matchLabels": {"role": "inference"}}), {}, {}, (),
                   NOW, 30)
    assert [c.name for c in placed.chosen] == ["b", "c"]
    assert placed.excluded == {"a": "not ready", "d": "heartbeat is stale (100s old)",
                               "e": "does not match the pool's nodeSelector"}
    assert placed.considered == {"a", "b", "c", "d", "e"}


def names(chosen: list[Candidate]) -> list[str]:
    return [c.name for c in chosen]


def test_choose_takes_at_most_replicas_preferring_free_memory_then_name():
    nodes = [cand("a", free=1), cand("b", free=5), cand("c", free=5), cand("d", free=9)]
    assert names(choose(nodes, 2, ["tiny"], current=())) == ["b", "d"]
    assert names(choose(nodes, 3, ["tiny"], current=())) == ["b", "c", "d"]
    assert names(choose(nodes, 0, ["tiny"], current=())) == []
    assert names(choose(nodes, 10, ["tiny"], current=())) == ["a", "b", "c", "d"]


def test_choose_counts_other_pools_reservations_against_free_memory():
    nodes = [cand("a", free=9, reserved_bytes=8), cand("b", free=5)]
    assert names(choose(nodes, 1, ["tiny"], current=())) == ["b"]


def test_choose_sticks_to_current_healthy_nodes():
    nodes = [cand("a", free=1), cand("b", free=9)]
    assert names(choose(nodes, 1, ["tiny"], current={"a"})) == ["a"]


def test_choose_replaces_an_unhealthy_node_with_a_healthy_spare():
    nodes = [cand("a", free=9, probe=ProbeResult(False, "down")), cand("b", free=1)]
    assert names(choose(nodes, 1, ["tiny"], current={"a"})) == ["b"]


def test_choose_keeps_an_unhealthy_node_when_no_healthy_one_can_take_its_slot():
    nodes = [cand("a"), cand("b", probe=ProbeResult(False, "down"))]
    assert names(choose(nodes, 2, ["tiny"], current={"a", "b"})) == ["a", "b"]


def test_choose_prefers_nodes_serving_more_of_the_pools_models():
    nodes = [cand("a", models=("x",), free=9), cand("b", models=("x", "y"), free=1)]
    assert names(choose(nodes, 1, ["x", "y"], current=())) == ["b"]


def test_choose_prefers_a_node_already_loading_the_model_over_an_empty_one():
    nodes = [cand("a", models=(), agent_view=agent(free=9 * GIB)),
             cand("b", models=(), agent_view=agent({"tiny": "loading"}, free=1 * GIB))]
    assert names(choose(nodes, 1, ["tiny"], current=())) == ["b"]


def test_scale_down_keeps_the_preferred_nodes():
    nodes = [cand("a", free=1), cand("b", free=2), cand("c", free=3)]
    assert names(choose(nodes, 1, ["tiny"], current={"a", "b", "c"})) == ["c"]


def test_endpoints_list_served_pending_and_managed_models():
    chosen = [cand("b", models=(), agent_view=agent({"x": "ready", "y": "loading"})), cand("a", models=("x", "y"))]
    endpoints = endpoints_of(chosen, ["x", "y"], managed={"b": {"x"}})
    assert [(e.node, e.models, e.pending, e.managed, e.ready) for e in endpoints] == [
        ("a", ("x", "y"), (), (), True), ("b", ("x",), ("y",), ("x",), False)]


def test_node_view_parses_an_inference_node_object():
    body = {
        "metadata": {"name": "mac-1", "labels": {"role": "inference"}},
        "spec": {"endpoint": "http://10.0.0.5:8101/", "maxModels": 3, "hardware": {
            "chip": "Apple M2 Ultra", "memoryBytes": 1 << 30, "cpuCores": 24, "accelerator": "metal",
            "platform": "darwin-arm64"}},
        "status": {"ready": True, "models": [{"name": "tiny", "memoryBytes": 10},
                                             {"name": "big", "decodeTokensPerSecond": 31.5}],
                   "heartbeatTime": "2026-01-01T12:00:00Z", "freeMemoryBytes": 42,
                   "conditions": [{"type": "Ready", "status": "False", "reason": "HeartbeatStale"}]},
    }
    parsed = NodeView.from_body(body)
    assert parsed.endpoint == "http://10.0.0.5:8101"
    assert parsed.models == {"tiny", "big"} and parsed.ready and parsed.free_memory_bytes == 42
    assert parsed.chip == "Apple M2 Ultra" and parsed.decode_rates == {"big": 31.5}
    assert parsed.heartbeat == NOW and parsed.max_models == 3 and parsed.model_bytes == {"tiny": 10}
    assert parsed.condition == ("False", "HeartbeatStale")


def test_node_view_without_status_is_not_ready():
    body = {"metadata": {"name": "mac-1"}, "spec": {"endpoint": "http://x", "hardware": {
        "chip": "c", "memoryBytes": 1, "cpuCores": 1, "accelerator": "cpu", "platform": "p"}}}
    parsed = NodeView.from_body(body)
    assert not parsed.ready and parsed.heartbeat is None and parsed.models == frozenset()


def test_malformed_node_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="'broken'"):
        NodeView.from_body({"metadata": {"name": "broken"}, "spec": {"endpoint": "http://x"}})


def test_routing_key_ignores_heartbeats_and_free_memory():
    a = view("a", age=1, free=1)
    b = view("a", age=5, free=2)
    assert a.routing_key() == b.routing_key()
    assert a.routing_key() != view("a", ready=False).routing_key()


def test_agent_view_from_a_report_and_from_call_answers():
    report = NodeReport(
        name="n", endpoint="http://n", max_models=2, free_memory_bytes=7, agent_version="x",
        hardware=Hardware(chip="c", memory_bytes=1, cpu_cores=1, accelerator="cpu", platform="p"),
        models=[ModelState(name="a", phase=ModelPhase.READY, memory_bytes=5),
                ModelState(name="b", phase=ModelPhase.FAILED, message="no memory")],
        cache=[CacheEntry(key="k", source="hf://o/r", phase=CachePhase.CACHED)])
    seen = AgentView.from_report(report)
    assert seen.models == {"a": ModelPhase.READY, "b": ModelPhase.FAILED} and seen.messages == {"b": "no memory"}
    assert seen.cache == {"k": CachePhase.CACHED} and seen.model_bytes == {"a": 5} and seen.max_models == 2
    after = seen.with_model(ModelState(name="b", phase=ModelPhase.LOADING)).without_model("a")
    assert after.models == {"b": ModelPhase.LOADING} and after.messages == {}


def test_sources_resolve_cache_first_then_the_pool_source():
    spec = pool(models=[{"name": "a", "source": "file:///models/a%20b"}, {"name": "b", "source": "hf://org/b"},
                        {"name": "c"}, {"name": "d", "source": "hf://org/d"}])
    from mlxpool.operator.logic.sources import CacheRef, source_key

    resolved = resolve(spec.models, {"d": CacheRef("ns", "dcache", "d", "ns.dcache.123", pin=True)})
    assert resolved["a"].path == "/models/a b" and resolved["a"].stage is None
    assert resolved["b"].cache_key == source_key("hf://org/b") and resolved["b"].stage.source == "hf://org/b"
    assert resolved["c"] is None
    assert (resolved["d"].cache_key, resolved["d"].stage, resolved["d"].origin) == ("ns.dcache.123", None,
                                                                                    "ModelCache ns/dcache")
    assert resolved["d"].request("d").pin is True


def test_a_held_node_without_a_report_yet_is_kept():
    """Right after a restart the agent's report is not in: a node the pool holds stays."""
    unknown = cand("a", models=())
    assert exclusion_reason(unknown, pool(), FROM_PATH, {}, NOW, 30, held=True) is None
    assert exclusion_reason(unknown, pool(), FROM_PATH, {}, NOW, 30, held=False) is not None


def test_parked_models_take_memory_but_no_model_slot():
    """With `multi_model.park` an agent keeps models parked (no engine): only active ones are slots."""
    report = NodeReport(
        name="n", endpoint="http://n", max_models=2, free_memory_bytes=8 * GIB, agent_version="x",
        hardware=Hardware(chip="c", memory_bytes=1, cpu_cores=1, accelerator="cpu", platform="p"),
        models=[ModelState(name="x", phase=ModelPhase.READY),
                ModelState(name="y", phase=ModelPhase.READY, tier=ModelTier.PARKED),
                ModelState(name="z", phase=ModelPhase.READY, tier=ModelTier.PARKED)])
    seen = AgentView.from_report(report)
    assert seen.parked == {"y", "z"}
    spec = pool()
    sizes = {"tiny": 4 * GIB}
    assert cand("a", models=(), agent_view=seen).model_slots_used == 1
    assert exclusion_reason(cand("a", models=(), agent_view=seen), spec, FROM_PATH, sizes, NOW, 30) is None
    # Woken (y active again, x parked in its place) or x still active and y woken: the count follows.
    both = seen.with_model(ModelState(name="y", phase=ModelPhase.READY))
    assert both.parked == {"z"}
    assert exclusion_reason(cand("a", models=(), agent_view=both), spec, FROM_PATH, sizes, NOW, 30) == (
        "no room: 1 more model(s) on a node holding 2 of 2")
    assert both.without_model("z").parked == frozenset()
    # Memory is still memory: a parked model's bytes are not free.
    tight = replace(seen, free_memory_bytes=3 * GIB)
    assert exclusion_reason(cand("a", models=(), agent_view=tight), spec, FROM_PATH, sizes, NOW, 30) == (
        "no room: needs 4.0 GiB, 3.0 GiB free")


def test_without_a_report_the_heartbeat_s_tiers_count_the_slots():
    body = {
        "metadata": {"name": "mac-1"},
        "spec": {"endpoint": "http://x", "maxModels": 1, "hardware": {
            "chip": "c", "memoryBytes": 1, "cpuCores": 1, "accelerator": "cpu", "platform": "p"}},
        "status": {"ready": True, "models": [{"name": "x", "tier": "parked"}, {"name": "y", "tier": "active"}],
                   "heartbeatTime": "2026-01-01T12:00:00Z"},
    }
    parsed = NodeView.from_body(body)
    assert parsed.parked == {"x"} and parsed.models == {"x", "y"}
    assert Candidate(view=parsed).model_slots_used == 1
    assert parsed.routing_key() != replace(parsed, parked=frozenset()).routing_key()


def test_the_next_node_is_the_best_healthy_one_past_the_chosen():
    nodes = [cand("a", free=1), cand("b", free=9), cand("c", free=5, probe=ProbeResult(False, "down")),
             cand("d", free=3)]
    placed = place(nodes, pool(replicas=1), {}, {}, (), NOW, 30)
    assert names(placed.chosen) == ["b"] and placed.next is not None and placed.next.name == "d"  # c is down
    assert place(nodes, pool(replicas=4), {}, {}, (), NOW, 30).next is None
