"""The InferencePool status the operator wants, and the patch that gets there: pure.

Everything here is deterministic in its inputs and keeps timestamps of things that
did not change (condition transition times, an endpoint's lastProbeTime), so a pool
whose endpoints, health and spec are unchanged yields an empty patch: no write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from mlxpool.operator.logic.conditions import PoolHealth, pool_conditions, rfc3339
from mlxpool.operator.logic.endpoints import PlacedEndpoint
from mlxpool.operator.logic.specs import PoolSpec, pool_selector

_ENDPOINT_IDENTITY = ("url", "models", "healthy", "message", "pending")


def endpoint_entries(endpoints: Sequence[PlacedEndpoint], previous: Sequence[Mapping[str, Any]],
                     now: datetime) -> list[dict[str, Any]]:
    """`status.endpoints`: lastProbeTime is the time of the probe that produced the
    entry's current values, kept as long as they do not change."""
    before = {e.get("node"): e for e in previous}
    entries = []
    for ep in endpoints:
        entry: dict[str, Any] = {"node": ep.node, "url": ep.url, "models": list(ep.models), "healthy": ep.healthy}
        if ep.pending:
            entry["pending"] = list(ep.pending)
        if ep.managed:
            entry["managedModels"] = list(ep.managed)
        if ep.probe.message:
            entry["message"] = ep.probe.message[:1024]
        old = before.get(ep.node)
        unchanged = old is not None and all(old.get(k) == entry.get(k) for k in _ENDPOINT_IDENTITY)
        kept = old.get("lastProbeTime") if old is not None and unchanged else None
        entry["lastProbeTime"] = kept or rfc3339(now)
        entries.append(entry)
    return entries


def pool_health(spec: PoolSpec, endpoints: Sequence[PlacedEndpoint], *, loading: Sequence[str] = (),
                failed: Sequence[str] = (), waiting_for: str = "") -> PoolHealth:
    served = {m for e in endpoints if e.healthy for m in e.models}
    return PoolHealth(
        desired=spec.replicas,
        placed=len(endpoints),
        ready=sum(e.ready for e in endpoints),
        models_without_endpoints=tuple(m for m in spec.model_names if m not in served),
        unhealthy=sum(not e.healthy for e in endpoints),
        loading=tuple(loading),
        failed=tuple(failed),
        waiting_for=waiting_for if len(endpoints) < spec.replicas else "",
    )


def pool_status(
    *,
    name: str,
    generation: int,
    spec: PoolSpec,
    endpoints: Sequence[PlacedEndpoint],
    routing_revision: int,
    previous: Mapping[str, Any],
    now: datetime,
    health: PoolHealth | None = None,
) -> dict[str, Any]:
    """The complete status the operator owns for a pool."""
    health = health or pool_health(spec, endpoints)
    return {
        "observedGeneration": generation,
        "replicas": health.placed,
        "readyReplicas": health.ready,
        "readySummary": f"{health.ready}/{health.desired}",
        "selector": pool_selector(name),
        "routingRevision": routing_revision,
        "endpoints": endpoint_entries(endpoints, previous.get("endpoints") or [], now),
        "conditions": pool_conditions(health, generation, previous.get("conditions") or [], now),
    }


def status_patch(desired: Mapping[str, Any], current: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The top-level status fields that differ (a JSON merge patch of `status`), or None.

    Lists are compared and sent whole: a merge patch replaces lists anyway.
    """
    current = current or {}
    changed = {k: v for k, v in desired.items() if current.get(k) != v}
    return changed or None
