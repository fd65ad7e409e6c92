"""Pool conditions in the metav1.Condition shape (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from mlxpool.operator.logic.conditions import PoolHealth, pool_conditions, rfc3339, set_condition

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def by_type(conditions: list[dict]) -> dict[str, dict]:
    return {c["type"]: c for c in conditions}


def test_rfc3339_is_utc_whole_seconds():
    assert rfc3339(datetime(2026, 1, 1, 13, 0, 0, 999, tzinfo=timezone(timedelta(hours=1)))) == "2026-01-01T12:00:00Z"


def test_set_condition_keeps_the_transition_time_while_status_holds():
    first = set_condition([], type="Ready", status=True, reason="A", message="m1", generation=1, now=T0)
    second = set_condition(first, type="Ready", status=True, reason="B", message="m2", generation=2, now=T1)
    assert second == [{"type": "Ready", "status": "True", "reason": "B", "message": "m2",
                       "lastTransitionTime": rfc3339(T0), "observedGeneration": 2}]


def test_set_condition_moves_the_transition_time_when_status_flips():
    first = set_condition([], type="Ready", status=True, reason="A", message="m", generation=1, now=T0)
    flipped = set_condition(first, type="Ready", status=False, reason="A", message="m", generation=1, now=T1)
    assert flipped[0]["lastTransitionTime"] == rfc3339(T1) and flipped[0]["status"] == "False"


def test_set_condition_leaves_other_conditions_alone():
    other = {"type": "Custom", "status": "True", "reason": "X", "message": "", "lastTransitionTime": "t"}
    result = set_condition([other], type="Ready", status=True, reason="A", message="", generation=1, now=T0)
    assert result[0] == other and result[1]["type"] == "Ready"


@pytest.mark.parametrize(("health", "expected"), [
    (PoolHealth(desired=2, placed=2, ready=2), {
        "Ready": ("True", "EndpointsReady"), "Progressing": ("False", "PlacementComplete"),
        "Degraded": ("False", "AllEndpointsHealthy")}),
    (PoolHealth(desired=2, placed=2, ready=1, unhealthy=1), {
        "Ready": ("True", "EndpointsReady"), "Progressing": ("False", "PlacementComplete"),
        "Degraded": ("True", "EndpointsUnhealthy")}),
    (PoolHealth(desired=2, placed=2, ready=1, loading=("tiny on b",)), {
        "Ready": ("True", "EndpointsReady"), "Progressing": ("True", "LoadingModels"),
        "Degraded": ("False", "AllEndpointsHealthy")}),
    (PoolHealth(desired=2, placed=2, ready=1, failed=("tiny on b: no memory",)), {
        "Ready": ("True", "EndpointsReady"), "Progressing": ("False", "PlacementComplete"),
        "Degraded": ("True", "LoadFailed")}),
    (PoolHealth(desired=3, placed=1, ready=1), {
        "Ready": ("True", "EndpointsReady"), "Progressing": ("True", "WaitingForNodes"),
        "Degraded": ("True", "InsufficientNodes")}),
    (PoolHealth(desired=2, placed=2, ready=0, models_without_endpoints=("tiny",), unhealthy=2), {
        "Ready": ("False", "NoHealthyEndpoints"), "Progressing": ("False", "PlacementComplete"),
        "Degraded": ("True", "EndpointsUnhealthy")}),
    (PoolHealth(desired=0, placed=0, ready=0), {
        "Ready": ("False", "ScaledToZero"), "Progressing": ("False", "PlacementComplete"),
        "Degraded": ("False", "AllEndpointsHealthy")}),
])
def test_pool_conditions(health, expected):
    conditions = pool_conditions(health, generation=3, previous=[], now=T0)
    assert [c["type"] for c in conditions] == ["Ready", "Progressing", "Degraded"]
    assert {t: (c["status"], c["reason"]) for t, c in by_type(conditions).items()} == expected
    assert all(c["observedGeneration"] == 3 and c["message"] for c in conditions)


def test_pool_conditions_are_stable_for_equal_inputs():
    health = PoolHealth(desired=2, placed=2, ready=2)
    first = pool_conditions(health, generation=1, previous=[], now=T0)
    assert pool_conditions(health, generation=1, previous=first, now=T1) == first


def test_no_healthy_endpoint_message_names_the_models():
    conditions = pool_conditions(PoolHealth(2, 2, 0, ("a", "b")), generation=1, previous=[], now=T0)
    assert by_type(conditions)["Ready"]["message"] == "no healthy endpoint for model(s): a, b"
