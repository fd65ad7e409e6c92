"""The pool status the operator computes, and the patches it sends (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mlxpool.operator.logic.endpoints import PlacedEndpoint, ProbeResult
from mlxpool.operator.logic.specs import PoolSpec
from mlxpool.operator.logic.statuses import endpoint_entries, pool_status, status_patch

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(seconds=30)
SPEC = PoolSpec.model_validate({"models": [{"name": "tiny"}], "replicas": 2})


HEALTHY = ProbeResult(True)


def ep(node: str, probe: ProbeResult = HEALTHY) -> PlacedEndpoint:
    return PlacedEndpoint(node=node, url=f"http://{node}", models=("tiny",), probe=probe)


def status(endpoints, previous=None, now=T0, generation=1, revision=1) -> dict:
    return pool_status(name="tiny", generation=generation, spec=SPEC, endpoints=endpoints,
                       routing_revision=revision, previous=previous or {}, now=now)


def test_full_status_shape():
    result = status([ep("a"), ep("b", ProbeResult(False, "cannot connect"))])
    assert result["observedGeneration"] == 1
    assert (result["replicas"], result["readyReplicas"]) == (2, 1)
    assert result["selector"] == "mlxpool.dev/pool=tiny"
    assert result["routingRevision"] == 1
    assert result["endpoints"] == [
        {"node": "a", "url": "http://a", "models": ["tiny"], "healthy": True, "lastProbeTime": "2026-01-01T12:00:00Z"},
        {"node": "b", "url": "http://b", "models": ["tiny"], "healthy": False, "message": "cannot connect",
         "lastProbeTime": "2026-01-01T12:00:00Z"},
    ]
    assert [c["type"] for c in result["conditions"]] == ["Ready", "Progressing", "Degraded"]


def test_unchanged_pool_gives_no_patch():
    first = status([ep("a"), ep("b")])
    again = status([ep("a"), ep("b")], previous=first, now=T1)
    assert again == first
    assert status_patch(again, first) is None


def test_last_probe_time_moves_only_when_the_entry_changes():
    first = endpoint_entries([ep("a"), ep("b")], [], T0)
    later = endpoint_entries([ep("a"), ep("b", ProbeResult(False, "down"))], first, T1)
    assert later[0]["lastProbeTime"] == "2026-01-01T12:00:00Z"
    assert later[1]["lastProbeTime"] == "2026-01-01T12:00:30Z"


def test_patch_holds_only_changed_fields():
    first = status([ep("a"), ep("b")])
    degraded = status([ep("a"), ep("b", ProbeResult(False, "down"))], previous=first, now=T1, revision=2)
    patch = status_patch(degraded, first)
    assert set(patch) == {"readyReplicas", "readySummary", "routingRevision", "endpoints", "conditions"}


def test_new_generation_is_observed():
    first = status([ep("a"), ep("b")])
    patch = status_patch(status([ep("a"), ep("b")], previous=first, generation=2), first)
    assert patch["observedGeneration"] == 2
    assert all(c["observedGeneration"] == 2 for c in patch["conditions"])


def test_patch_against_an_empty_status_writes_everything():
    desired = status([ep("a")])
    assert status_patch(desired, None) == desired


def test_pending_and_managed_models_are_listed_and_count_against_readiness():
    loading = PlacedEndpoint(node="b", url="http://b", models=(), probe=ProbeResult(True), pending=("tiny",),
                             managed=("tiny",))
    result = status([ep("a"), loading])
    assert (result["replicas"], result["readyReplicas"], result["readySummary"]) == (2, 1, "1/2")
    assert result["endpoints"][1] == {"node": "b", "url": "http://b", "models": [], "pending": ["tiny"],
                                      "managedModels": ["tiny"], "healthy": True,
                                      "lastProbeTime": "2026-01-01T12:00:00Z"}
