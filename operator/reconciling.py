"""One reconcile pass of one InferencePool: observe, decide, write what changed.

Observe: the InferenceNodes (handed in from kopf's index) and a probe of every
eligible node. Decide: placement, routing table, status (the pure modules). Write:
the ConfigMap only when the routes changed, the status only when a field changed;
an unchanged pool costs no API request at all after the first pass. Also reports
placement changes and endpoint failures/recoveries as Kubernetes Events.

Kopf-agnostic: `handlers` wires this to kopf; tests drive it with fakes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from mlxpool.operator import metrics
from mlxpool.operator.endpoints import PlacedEndpoint, ProbeResult, placed_endpoints
from mlxpool.operator.placement import NodeView, choose, eligible_nodes, exclusion_reason
from mlxpool.operator.specs import PoolSpec
from mlxpool.operator.statuses import pool_status, status_patch
from mlxpool.operator.tables import next_table, route_models
from mlxpool.routing import RoutingTable

log = logging.getLogger(__name__)


class Kube(Protocol):
    async def read_routes(self, namespace: str, pool: str) -> RoutingTable | None: ...
    async def write_routes(self, pool: Mapping, table: RoutingTable, exists: bool) -> None: ...
    async def patch_pool_status(self, namespace: str, name: str, status: Mapping) -> dict: ...


class Prober(Protocol):
    async def probe_all(self, endpoints: Mapping[str, str]) -> dict[str, ProbeResult]: ...


class Events(Protocol):
    """Kubernetes Events about the pool being reconciled."""

    def info(self, reason: str, message: str) -> None: ...
    def warn(self, reason: str, message: str) -> None: ...


@dataclass
class PoolState:
    """What the operator remembers about one pool between passes (memory only).

    Rebuilt from the pool's status after a restart, so a restarted operator neither
    rewrites an unchanged pool nor repeats its events.
    """

    status: dict = field(default_factory=dict)
    """The status last written, or observed at start."""

    table: RoutingTable | None = None
    table_known: bool = False
    """Whether `table` is what the ConfigMap holds (read once, then tracked by our writes)."""

    @classmethod
    def from_status(cls, status: Mapping | None) -> PoolState:
        return cls(status=dict(status or {}))

    def forget_table(self) -> None:
        """The ConfigMap is gone (deleted behind our back): write it again next pass."""
        self.table, self.table_known = None, True


@dataclass(frozen=True)
class PassResult:
    endpoints: list[PlacedEndpoint]
    table: RoutingTable
    wrote_routes: bool
    wrote_status: bool

    @property
    def outcome(self) -> str:
        wrote = [w for w, done in (("routes", self.wrote_routes), ("status", self.wrote_status)) if done]
        return "+".join(wrote) or "unchanged"


class PoolReconciler:
    def __init__(
        self,
        kube: Kube,
        prober: Prober,
        stale_after: float,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self._kube = kube
        self._prober = prober
        self._stale_after = stale_after
        self._clock = clock

    async def reconcile(self, body: Mapping, nodes: Iterable[NodeView], state: PoolState, events: Events) -> PassResult:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        spec = PoolSpec.from_body(body)
        nodes = list(nodes)
        now = self._clock()

        eligible = eligible_nodes(nodes, spec, now, self._stale_after)
        probes = await self._prober.probe_all({n.name: n.endpoint for n in eligible})
        before = {e["node"]: e for e in state.status.get("endpoints") or []}
        chosen = choose(eligible, spec.replicas, spec.model_names, current=before.keys(),
                        healthy={k: p.healthy for k, p in probes.items()})
        endpoints = placed_endpoints(chosen, spec.model_names, probes)

        if not state.table_known:
            state.table = await self._kube.read_routes(namespace, name)
            state.table_known = True
        table = next_table(
            pool=name, namespace=namespace, strategy=spec.routing.strategy,
            models=route_models(spec.model_names, endpoints), previous=state.table,
            revision_floor=int(state.status.get("routingRevision") or 0), now=now,
        )
        wrote_routes = table is not state.table
        if wrote_routes:
            await self._kube.write_routes(body, table, exists=state.table is not None)
            state.table = table
            log.info("routing table written namespace=%s pool=%s revision=%d endpoints=%s", namespace, name,
                     table.revision, ",".join(e.node for e in endpoints if e.healthy) or "-")

        desired = pool_status(name=name, generation=int(meta.get("generation") or 0), spec=spec,
                              endpoints=endpoints, routing_revision=table.revision, previous=state.status, now=now)
        patch = status_patch(desired, state.status)
        if patch is not None:
            state.status = await self._kube.patch_pool_status(namespace, name, patch)

        _report(events, before, endpoints, {n.name: n for n in nodes}, spec, now, self._stale_after)
        result = PassResult(endpoints, table, wrote_routes, patch is not None)
        metrics.RECONCILES.labels(result.outcome).inc()
        metrics.READY_ENDPOINTS.labels(namespace, name).set(sum(e.healthy for e in endpoints))
        metrics.ROUTING_REVISION.labels(namespace, name).set(table.revision)
        return result


def _report(
    events: Events,
    before: Mapping[str, Mapping],
    endpoints: list[PlacedEndpoint],
    nodes: Mapping[str, NodeView],
    spec: PoolSpec,
    now: datetime,
    stale_after: float,
) -> None:
    """Events for placement changes and endpoint health transitions."""
    placed = {e.node for e in endpoints}
    added, removed = sorted(placed - before.keys()), sorted(before.keys() - placed)
    if added or removed:
        why = []
        for node in removed:
            view = nodes.get(node)
            reason = "node deleted" if view is None else exclusion_reason(view, spec, now, stale_after) or "replaced"
            why.append(f"{node} ({reason})")
        parts = [f"added {', '.join(added)}" if added else "", f"removed {', '.join(why)}" if why else ""]
        events.info("PlacementChanged", f"endpoints now: {', '.join(sorted(placed)) or 'none'}; "
                                        + "; ".join(p for p in parts if p))
    for ep in endpoints:
        was = before.get(ep.node, {}).get("healthy")
        if not ep.healthy and was is not False:
            events.warn("EndpointUnhealthy", f"{ep.node} ({ep.url}): {ep.probe.message}")
        elif ep.healthy and was is False:
            events.info("EndpointRecovered", f"{ep.node} ({ep.url}) passes its health probe again")
