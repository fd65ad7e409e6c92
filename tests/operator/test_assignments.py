"""The agent calls a pool plans for its chosen nodes (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

from mlxpool.agentapi import CachePhase, ModelPhase, StageRequest
from mlxpool.operator.logic.assignments import LoadAction, StageAction, plan, prefetch_plan, progress
from mlxpool.operator.logic.endpoints import ProbeResult
from mlxpool.operator.logic.placement import AgentView, Candidate, NodeView
from mlxpool.operator.logic.sources import LoadSource

FILE = LoadSource(origin="spec.models[].source", path="/m/x")
REMOTE = LoadSource(origin="spec.models[].source", cache_key="src-1", stage=StageRequest(source="hf://o/x"))
CACHED = LoadSource(origin="ModelCache ns/x", cache_key="ns.x.1")


def cand(models: dict[str, str] | None = None, cache: dict[str, str] | None = None, healthy: bool = True,
         failures: dict | None = None, report: bool = True) -> Candidate:
    """A chosen node; its agent's phases named by their values (`{"x": "loading"}`)."""
    node = NodeView(name="n", endpoint="http://n", labels={}, ready=True, heartbeat=datetime.now(UTC),
                    free_memory_bytes=None, models=frozenset())
    agent = AgentView(models={m: ModelPhase(p) for m, p in (models or {}).items()},
                      cache={k: CachePhase(p) for k, p in (cache or {}).items()})
    return Candidate(view=node, agent=agent if report else None,
                     probe=ProbeResult(healthy, "" if healthy else "down"), failures=failures or {})


def test_a_path_source_is_loaded():
    (action,) = plan([cand()], ["x"], {"x": FILE})
    assert isinstance(action, LoadAction) and action.request.path == "/m/x" and action.url == "http://n"


def test_nothing_is_asked_of_a_node_that_holds_the_model_in_any_phase():
    for phase in ("loading", "warming", "ready", "unloading"):
        assert plan([cand({"x": phase})], ["x"], {"x": FILE}) == []


def test_nothing_is_asked_without_a_report_or_a_healthy_probe():
    assert plan([cand(report=False)], ["x"], {"x": FILE}) == []
    assert plan([cand(healthy=False)], ["x"], {"x": FILE}) == []


def test_a_remote_source_is_staged_first_then_loaded_from_its_copy():
    (stage,) = plan([cand()], ["x"], {"x": REMOTE})
    assert isinstance(stage, StageAction) and stage.key == "src-1"
    assert plan([cand(cache={"src-1": "Downloading"})], ["x"], {"x": REMOTE}) == []
    (load,) = plan([cand(cache={"src-1": "Cached"})], ["x"], {"x": REMOTE})
    assert isinstance(load, LoadAction) and load.request.cache_key == "src-1"


def test_a_model_cache_copy_is_never_staged_by_a_pool():
    assert plan([cand()], ["x"], {"x": CACHED}) == []
    (load,) = plan([cand(cache={"ns.x.1": "Pinned"})], ["x"], {"x": CACHED})
    assert load.request.cache_key == "ns.x.1"


def test_a_failed_model_is_retried_once_the_operator_forgot_the_failure():
    assert plan([cand({"x": "failed"}, failures={"x": "boom"})], ["x"], {"x": FILE}) == []
    (retry,) = plan([cand({"x": "failed"})], ["x"], {"x": FILE})
    assert isinstance(retry, LoadAction)


def test_progress_lists_loads_stagings_and_failures():
    chosen = [cand({"x": "loading", "y": "ready"}, cache={"src-1": "Verifying"}, failures={"w": "no memory"})]
    sources = {"x": FILE, "y": FILE, "z": REMOTE, "w": FILE}
    loading, failed = progress(chosen, ["w", "x", "y", "z"], sources)
    assert loading == ["x on n", "z on n (staging)"]
    assert failed == ["w on n: no memory"]


# ---- the pool's scheduling policy ----


def test_the_pools_policy_goes_to_every_chosen_node_that_does_not_report_it():
    from dataclasses import replace

    from mlxpool.agentapi import SchedulingPolicy, TierPolicy
    from mlxpool.operator.logic.assignments import PolicyAction, policy_plan
    from mlxpool.priorities import Priority

    policy = SchedulingPolicy(default_priority=Priority.HIGH, tiers=[TierPolicy(priority=Priority.LOW, preempt=False)])
    fresh = cand()
    (action,) = policy_plan([fresh], ["x"], policy)
    assert action == PolicyAction("n", "http://n", "x", policy)
    assert fresh.agent is not None
    applied = replace(fresh, agent=fresh.agent.with_policy("x", policy))
    assert policy_plan([applied], ["x"], policy) == []  # unchanged: no call
    changed = policy.model_copy(update={"default_priority": Priority.LOW})
    assert [a.policy for a in policy_plan([applied], ["x"], changed)] == [changed]
    assert policy_plan([fresh], ["x"], None) == []  # the pool sets none: the agents' own
    assert policy_plan([cand(report=False), cand(healthy=False)], ["x"], policy) == []


def test_the_spec_becomes_the_wire_policy():
    from mlxpool.operator.logic.specs import PoolSpec

    spec = PoolSpec.model_validate({"models": [{"name": "x"}], "scheduling": {
        "defaultPriority": "high", "tiers": [{"priority": "critical", "ttftTargetMs": 300, "preempt": True,
                                               "maxQueueDepth": 4, "deadlineSeconds": 2, "sheddable": False}]}})
    assert spec.scheduling is not None
    policy = spec.scheduling.policy()
    assert policy.default_priority == "high"
    (tier,) = policy.tiers
    assert (tier.ttft_target_ms, tier.preempt, tier.max_queue_depth, tier.deadline_seconds, tier.sheddable) == \
        (300, True, 4, 2, False)
    assert PoolSpec.model_validate({"models": [{"name": "x"}]}).scheduling is None


def test_an_adapter_is_loaded_over_its_base_once_the_base_is_ready_on_the_node():
    from mlxpool.operator.logic.sources import resolve
    from mlxpool.operator.logic.specs import ModelRef

    sources = resolve([ModelRef(name="x", source="file:///m/x"),
                       ModelRef(name="x:a1", source="file:///m/a1", base="x")], {})
    names = ["x", "x:a1"]
    (base,) = plan([cand()], names, sources)  # nothing for the adapter while its base is not there
    assert base.model == "x" and base.request.base is None
    assert progress([cand()], names, sources)[0] == ["x:a1 on n (after its base x)"]
    for phase in ("loading", "warming", "failed"):
        assert [a.model for a in plan([cand({"x": phase})], names, sources)] == ([] if phase != "failed" else ["x"])
    (adapter,) = plan([cand({"x": "ready"})], names, sources)
    assert isinstance(adapter, LoadAction) and adapter.model == "x:a1"
    assert adapter.request.base == "x" and adapter.request.path == "/m/a1"


def test_the_next_node_is_told_to_prefetch_what_is_on_it_and_not_held():
    adapter = LoadSource(origin="spec.models[].source", path="/a/x", base="x")
    sources = {"x": FILE, "c": CACHED, "r": REMOTE, "ad": adapter}
    (only,) = prefetch_plan(cand(), ["x", "c", "r", "ad"], sources)  # c and r not on the node: nothing to read
    assert (only.model, only.request.path, only.url) == ("x", "/m/x", "http://n")
    both = prefetch_plan(cand(cache={"ns.x.1": "Cached", "src-1": "Cached"}), ["x", "c", "r"], sources)
    assert [(a.model, a.request.path or a.request.cache_key) for a in both] == [
        ("x", "/m/x"), ("c", "ns.x.1"), ("r", "src-1")]
    # Held in any phase (parked included), failed there, unhealthy, no report, no next node: none.
    assert prefetch_plan(cand({"x": "ready"}), ["x"], sources) == []
    assert prefetch_plan(cand(failures={"x": "boom"}), ["x"], sources) == []
    assert prefetch_plan(cand(healthy=False), ["x"], sources) == []
    assert prefetch_plan(cand(report=False), ["x"], sources) == []
    assert prefetch_plan(None, ["x"], sources) == []
