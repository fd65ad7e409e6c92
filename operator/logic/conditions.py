"""Pool conditions (Ready, Progressing, Degraded) in the metav1.Condition shape: pure.

Like apimachinery's `meta.SetStatusCondition`, `lastTransitionTime` moves only when
a condition's status changes; reason, message and observedGeneration follow the
latest computation. Equal inputs give equal output, so an unchanged pool produces
no status write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"


def rfc3339(moment: datetime) -> str:
    """Kubernetes' time format: UTC, whole seconds, `Z` suffix."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class PoolHealth:
    """The counts the conditions are computed from."""

    desired: int
    placed: int
    ready: int
    """Placed endpoints that are healthy and serve every pool model."""
    models_without_endpoints: tuple[str, ...] = ()
    unhealthy: int = 0
    loading: tuple[str, ...] = ()
    """`model on node` for every load in progress."""
    failed: tuple[str, ...] = ()
    """`model on node: message` for loads that failed on a placed node."""
    waiting_for: str = ""
    """Why more nodes cannot be placed (a summary of the exclusion reasons), if fewer are."""


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    *,
    type: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """`conditions` with `type` set; its transition time kept if the status is unchanged."""
    status_text = "True" if status else "False"
    previous = next((c for c in conditions if c.get("type") == type), None)
    since = previous["lastTransitionTime"] if previous and previous.get("status") == status_text else rfc3339(now)
    updated = {
        "type": type,
        "status": status_text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }
    if previous is None:
        return [dict(c) for c in conditions] + [updated]
    return [updated if c.get("type") == type else dict(c) for c in conditions]


def pool_conditions(health: PoolHealth, generation: int, previous: Sequence[Mapping[str, Any]],
                    now: datetime) -> list[dict[str, Any]]:
    """Ready, Progressing and Degraded for a pool, in that order."""
    result: list[dict[str, Any]] = [dict(c) for c in previous]
    for type_, status, reason, message in _evaluate(health):
        result = set_condition(result, type=type_, status=status, reason=reason, message=message,
                               generation=generation, now=now)
    order = {READY: 0, PROGRESSING: 1, DEGRADED: 2}
    return sorted(result, key=lambda c: order.get(c["type"], len(order)))


def _evaluate(h: PoolHealth) -> Iterable[tuple[str, bool, str, str]]:
    if h.desired == 0:
        yield READY, False, "ScaledToZero", "spec.replicas is 0"
    elif h.models_without_endpoints:
        yield READY, False, "NoHealthyEndpoints", \
            f"no healthy endpoint for model(s): {', '.join(h.models_without_endpoints)}"
    else:
        yield READY, True, "EndpointsReady", f"{h.ready}/{h.desired} endpoints serve every model"

    if h.placed < h.desired:
        yield PROGRESSING, True, "WaitingForNodes", (
            f"{h.placed} of {h.desired} replicas placed; waiting for more ready nodes that match "
            "the nodeSelector and serve or can load the pool's models"
            + (f" ({h.waiting_for})" if h.waiting_for else ""))
    elif h.loading:
        yield PROGRESSING, True, "LoadingModels", f"loading {_some(h.loading)}"
    else:
        yield PROGRESSING, False, "PlacementComplete", f"{h.placed} of {h.desired} replicas placed"

    if h.placed < h.desired:
        yield DEGRADED, True, "InsufficientNodes", f"only {h.placed} of {h.desired} replicas could be placed"
    elif h.unhealthy:
        yield DEGRADED, True, "EndpointsUnhealthy", f"{h.unhealthy} of {h.placed} endpoints fail their health probe"
    elif h.failed:
        yield DEGRADED, True, "LoadFailed", f"failed to load {_some(h.failed)}"
    else:
        yield DEGRADED, False, "AllEndpointsHealthy", f"{h.placed - h.unhealthy} of {h.placed} endpoints healthy"


def _some(items: Sequence[str], shown: int = 5) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


def node_readiness(*, agent_ready: bool, heartbeat_age: float | None, stale_after: float, probe_healthy: bool,
                   probe_message: str) -> tuple[bool, str, str]:
    """The Ready condition the operator writes on an InferenceNode: (status, reason, message).

    Messages carry no changing numbers, so an unchanged verdict never causes a write.
    The probe adds what the object cannot show: an agent that stopped answering.
    """
    if heartbeat_age is None:
        return False, "NoHeartbeat", "the agent has not sent a heartbeat"
    if heartbeat_age > stale_after:
        return False, "HeartbeatStale", f"no heartbeat for more than {stale_after:g}s; no pool routes here"
    if not agent_ready:
        return False, "AgentNotReady", "the agent reports it is not ready"
    if not probe_healthy:
        return False, "HealthProbeFailed", probe_message or "the agent fails its health probe"
    return True, "AgentReady", "the agent is ready, beats and answers its health probe"
