"""One reconcile pass of one InferencePool: observe, decide, act, write what changed.

Observe: the fleet (node objects, probes and agent reports, other pools' claims) and
the namespace's ModelCaches. Decide: placement, the agent calls that move the chosen
nodes toward serving every pool model, the routing table, the status (pure modules).
Act: load/stage calls to the chosen agents, unloads of models no pool needs any more,
and a prefetch of the pool's models on the node one more replica would go to (once per
pool, node and model: a scale-up or a failover then loads from the page cache).
Write: the ConfigMap only when the routes changed, the status only when a field
changed; an unchanged pool costs no API request and no agent call at all. Also posts
Kubernetes Events for placements, loads, failures and recoveries.

Kopf-agnostic: `handlers` wires this to kopf; tests drive it with fakes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from mlxpool.agentapi import (
    CacheEntry,
    LoadModelRequest,
    ModelState,
    PrefetchRequest,
    PrefetchState,
    SchedulingPolicy,
    StageRequest,
)
from mlxpool.operator.config import OperatorConfig
from mlxpool.operator.io import metrics
from mlxpool.operator.io.agentclient import AgentError
from mlxpool.operator.logic.assignments import (
    LoadAction,
    PolicyAction,
    PrefetchAction,
    StageAction,
    plan,
    policy_plan,
    prefetch_plan,
    progress,
)
from mlxpool.operator.logic.claims import PoolKey
from mlxpool.operator.logic.endpoints import NOT_PROBED, PlacedEndpoint, ProbeResult
from mlxpool.operator.logic.fleet import Fleet
from mlxpool.operator.logic.placement import NOT_SELECTED, Candidate, Placement, endpoints_of, place
from mlxpool.operator.logic.sources import CacheRef, LoadSource, resolve
from mlxpool.operator.logic.specs import PoolSpec
from mlxpool.operator.logic.statuses import pool_health, pool_status, status_patch
from mlxpool.operator.logic.tables import next_table, route_models
from mlxpool.routing import RoutingTable

log = logging.getLogger(__name__)


class Kube(Protocol):
    async def read_routes(self, namespace: str, pool: str) -> RoutingTable | None: ...
    async def write_routes(self, pool: Mapping, table: RoutingTable, exists: bool, *,
                           create_only: bool = False) -> None: ...
    async def patch_pool_status(self, namespace: str, name: str, status: Mapping) -> dict: ...


class Agents(Protocol):
    async def load(self, url: str, request: LoadModelRequest) -> ModelState: ...
    async def unload(self, url: str, model: str) -> ModelState: ...
    async def stage(self, url: str, key: str, request: StageRequest) -> CacheEntry: ...
    async def put_scheduling(self, url: str, model: str, policy: SchedulingPolicy) -> SchedulingPolicy: ...
    async def prefetch(self, url: str, request: PrefetchRequest) -> PrefetchState: ...


class Events(Protocol):
    """Kubernetes Events about the object being reconciled."""

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

    table_assumed: bool = False
    """`table` (None) was not read but assumed: the pool never had a table (no routing
    revision in its status), so its first pass creates one without a GET first (500 GETs,
    each answered 404, and one round trip in every new pool's first pass at 1,000 nodes).
    A create that fails makes the next pass read it after all (`table_read`): an older
    table may be there (a pool deleted and made again under its name before the garbage
    collector came), whose revision the new one must go past."""
    table_read: bool = False
    """The ConfigMap is to be read, never assumed (an assumed create failed)."""

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
    calls: int = 0
    """Agent calls made (loads, stages, unloads)."""
    interest: frozenset[str] = frozenset()
    """Nodes matching the pool's selector: a change on one of them may change the pool."""
    settled: bool = True
    """Fully placed, nothing loading or pending: the pool can wait for events."""
    prefetches: int = 0
    """Models announced to the pool's next node (`POST /v1/node/prefetch`)."""

    @property
    def outcome(self) -> str:
        wrote = [w for w, done in (("routes", self.wrote_routes), ("status", self.wrote_status)) if done]
        return "+".join(wrote) or "unchanged"


def seed_fleet(fleet: Fleet, pool: PoolKey, body: Mapping, probe_interval: float | None = None) -> None:
    """What a pool held before the operator (re)started, from its status."""
    try:
        models = PoolSpec.from_body(body).model_names
    except ValueError:
        models = ()
    endpoints = (body.get("status") or {}).get("endpoints") or []
    fleet.claims.seed(
        pool, {e["node"]: set(models) | set(e.get("models") or []) for e in endpoints if e.get("node")},
        managed={(e["node"], m) for e in endpoints if e.get("node") for m in e.get("managedModels") or []},
        probe_interval=probe_interval)


def pool_probe_interval(body: Mapping[str, Any], config: OperatorConfig) -> float:
    """Seconds between probes of the pool's nodes: the operator's `--probe-interval`, else
    the pool's `spec.healthCheck.intervalSeconds` (1 for a spec that does not parse)."""
    if config.probe_interval is not None:
        return config.probe_interval
    try:
        return float(PoolSpec.from_body(body).health_check.interval_seconds)
    except ValidationError:
        return 1.0


class PoolReconciler:
    def __init__(
        self,
        kube: Kube,
        agents: Agents,
        fleet: Fleet,
        stale_after: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._kube = kube
        self._agents = agents
        self._fleet = fleet
        self._stale_after = stale_after
        self._clock = clock
        self._announced: dict[PoolKey, frozenset[tuple[str, str]]] = {}
        """Per pool, the (node, model) prefetches made, so each is announced once."""

    async def reconcile(self, body: Mapping, caches: Mapping[str, CacheRef], state: PoolState, events: Events,
                        probe_interval: float | None = None) -> PassResult:
        """One pass; `caches` are the namespace's ModelCaches by model name."""
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        key: PoolKey = (namespace, name)
        spec = PoolSpec.from_body(body)
        now = self._clock()

        sources = resolve(spec.models, caches)
        sizes: dict[str, int | None] = {**self._fleet.observed.model_sizes(),
                                        **{m: c.bytes for m, c in caches.items() if c.bytes}}
        before = {e["node"]: e for e in state.status.get("endpoints") or []}
        placement = self._place(key, spec, sources, sizes, before, now)
        chosen_names = [c.name for c in placement.chosen]
        unloads = self._fleet.claims.claim(key, dict.fromkeys(chosen_names, spec.model_names), probe_interval)
        actions: list[LoadAction | StageAction | PolicyAction] = [*plan(placement.chosen, spec.model_names, sources)]
        actions += policy_plan(placement.chosen, spec.model_names,
                               spec.scheduling.policy() if spec.scheduling is not None else None)
        announce = [a for a in prefetch_plan(placement.next, spec.model_names, sources)
                    if (a.node, a.model) not in self._announced.get(key, frozenset())]
        calls, prefetched = await asyncio.gather(self._act(actions, events), self._prefetch(key, announce))
        calls += await self.unload(unloads, events)

        # Placement again from what the calls just taught the fleet (loading, staging, failed).
        fresh = {c.name: c for c in _assume_known_health(self._fleet.candidates(key, sizes, only=chosen_names),
                                                         before)}
        chosen = [fresh[n] for n in chosen_names if n in fresh]
        managed = {n: self._fleet.claims.managed_on(n) for n in chosen_names}
        endpoints = endpoints_of(chosen, spec.model_names, managed, sizes)
        loading, failed = progress(chosen, spec.model_names, sources)

        if not state.table_known:
            state.table_assumed = not state.table_read and not state.status.get("routingRevision")
            state.table = None if state.table_assumed else await self._kube.read_routes(namespace, name)
            state.table_known = True
        table = next_table(
            pool=name, namespace=namespace, strategy=spec.routing.strategy,
            selectable_strategies=spec.routing.selectable_strategies,
            models=route_models(spec.model_names, endpoints), previous=state.table,
            revision_floor=int(state.status.get("routingRevision") or 0), now=now,
        )
        wrote_routes = table is not state.table
        if wrote_routes:
            try:
                await self._kube.write_routes(body, table, exists=state.table is not None,
                                              create_only=state.table_assumed)
            except Exception:
                if state.table_assumed:  # there may be an older table after all: read it next pass
                    state.table_known, state.table_assumed, state.table_read = False, False, True
                raise
            state.table, state.table_assumed = table, False
            log.info("routing table written namespace=%s pool=%s revision=%d routed=%s", namespace, name,
                     table.revision, ",".join(sorted({r.node for routes in table.models.values() for r in routes}))
                     or "-")

        health = pool_health(spec, endpoints, loading=loading, failed=failed, waiting_for=_waiting_for(placement))
        desired = pool_status(name=name, generation=int(meta.get("generation") or 0), spec=spec, endpoints=endpoints,
                              routing_revision=table.revision, previous=state.status, now=now, health=health)
        patch = status_patch(desired, state.status)
        if patch is not None:
            state.status = await self._kube.patch_pool_status(namespace, name, patch)

        _report(events, before, endpoints, placement)
        interest = frozenset(n for n in placement.considered if placement.excluded.get(n) != NOT_SELECTED)
        settled = len(endpoints) >= spec.replicas and all(e.ready for e in endpoints)
        result = PassResult(endpoints, table, wrote_routes, patch is not None, calls, interest, settled, prefetched)
        metrics.RECONCILES.labels(result.outcome).inc()
        metrics.READY_ENDPOINTS.labels(namespace, name).set(sum(e.healthy for e in endpoints))
        metrics.ROUTING_REVISION.labels(namespace, name).set(table.revision)
        return result

    def _place(self, key: PoolKey, spec: PoolSpec, sources: Mapping[str, LoadSource | None],
               sizes: Mapping[str, int | None], before: Mapping[str, Mapping], now: datetime) -> Placement:
        """Placement over the pool's own nodes when they suffice, else over the whole fleet.

        The ranking puts healthy nodes the pool holds before any other, so when at least
        `replicas` of its nodes are eligible and healthy, no other node can be chosen: the
        fleet need not be looked at (a pass costs O(its nodes), not O(fleet), and its
        interest is its own nodes: other nodes' changes do not wake it)."""
        if before:
            own = _assume_known_health(self._fleet.candidates(key, sizes, only=before.keys()), before)
            placement = place(own, spec, sources, sizes, before.keys(), now, self._stale_after)
            if len(placement.chosen) >= spec.replicas and all(c.probe.healthy for c in placement.chosen):
                return placement
        candidates = _assume_known_health(self._fleet.candidates(key, sizes), before)
        return place(candidates, spec, sources, sizes, before.keys(), now, self._stale_after)

    async def _prefetch(self, key: PoolKey, actions: Sequence[PrefetchAction]) -> int:
        """Announce the pool's models to its next node; each (node, model) once, answered or not
        (an agent without the route, or one that failed the read, is not asked again)."""
        if not actions:
            return 0
        self._announced[key] = self._announced.get(key, frozenset()) | {(a.node, a.model) for a in actions}

        async def one(action: PrefetchAction) -> None:
            try:
                await self._agents.prefetch(action.url, action.request)
                log.info("prefetch announced node=%s model=%s pool=%s/%s", action.node, action.model, *key)
            except AgentError as exc:
                log.info("prefetch not taken node=%s model=%s error=%s", action.node, action.model, exc)

        await asyncio.gather(*(one(a) for a in actions))
        return len(actions)

    def forget(self, key: PoolKey) -> None:
        """The pool is gone: its announcements go too."""
        self._announced.pop(key, None)

    async def _act(self, actions: Sequence[LoadAction | StageAction | PolicyAction], events: Events) -> int:
        await asyncio.gather(*(self._do(a, events) if not isinstance(a, PolicyAction) else self._apply_policy(a, events)
                               for a in actions))
        return len(actions)

    async def _apply_policy(self, action: PolicyAction, events: Events) -> None:
        try:
            applied = await self._agents.put_scheduling(action.url, action.model, action.policy)
        except AgentError as exc:
            events.warn("SchedulingFailed", f"cannot apply the scheduling policy of {action.model} on "
                                            f"{action.node}: {exc}")
            log.warning("agent call failed node=%s model=%s action=scheduling error=%s",
                        action.node, action.model, exc)
            return
        self._fleet.observed.note_policy(action.node, action.model, applied)
        log.info("scheduling policy applied node=%s model=%s", action.node, action.model)

    async def _do(self, action: LoadAction | StageAction, events: Events) -> None:
        observed, claims = self._fleet.observed, self._fleet.claims
        try:
            if isinstance(action, StageAction):
                entry = await self._agents.stage(action.url, action.key, action.request)
                observed.note_cache(action.node, entry)
                events.info("StagingModel", f"staging {action.model} on {action.node} from {action.request.source}")
            else:
                claims.mark_managed(action.node, action.model)  # before the call: its answer may get lost
                state = await self._agents.load(action.url, action.request)
                observed.note_model(action.node, state)
                events.info("LoadingModel", f"loading {action.model} on {action.node}")
        except AgentError as exc:
            if isinstance(action, LoadAction) and exc.status:  # refused: nothing was loaded
                claims.unmark_managed(action.node, action.model)
            verb = "stage" if isinstance(action, StageAction) else "load"
            observed.note_failure(action.node, action.model, exc.message)
            events.warn(f"{verb.capitalize()}Failed", f"cannot {verb} {action.model} on {action.node}: {exc}")
            log.warning("agent call failed node=%s model=%s action=%s error=%s", action.node, action.model, verb, exc)

    async def unload(self, pairs: Sequence[tuple[str, str]], events: Events) -> int:
        """Unload models no pool needs. A node that is gone is skipped; one that does not
        answer gets the unload from its monitor once it answers again."""
        calls = []
        for node, model in pairs:
            view = self._fleet.observed.views.get(node)
            if view is None:
                continue  # the node is gone, and its models with it
            if not self._fleet.observed.of(node).probe.healthy:
                log.info("unload deferred node=%s model=%s: the agent does not answer", node, model)
                self._fleet.claims.defer_unload(node, model)
                continue
            calls.append(self._unload_one(node, view.endpoint, model, events))
        await asyncio.gather(*calls)
        return len(calls)

    async def _unload_one(self, node: str, url: str, model: str, events: Events) -> None:
        try:
            state = await self._agents.unload(url, model)
            self._fleet.observed.note_model(node, state)
            events.info("UnloadingModel", f"unloading {model} from {node}: no pool needs it there")
        except AgentError as exc:
            if exc.status == 404:
                self._fleet.observed.note_unloaded(node, model)
                return
            events.warn("UnloadFailed", f"cannot unload {model} from {node}: {exc}")


def _assume_known_health(candidates: list[Candidate], before: Mapping[str, Mapping]) -> list[Candidate]:
    """A node not probed yet (the operator just started) keeps the health the pool's status
    last recorded, so a restart rewrites nothing; the first probe settles it."""
    return [replace(c, probe=ProbeResult(True)) if c.probe == NOT_PROBED and before.get(c.name, {}).get("healthy")
            else c for c in candidates]


def _waiting_for(placement: Placement) -> str:
    """The reasons nodes that match the selector cannot be used, most common first."""
    counts: dict[str, int] = {}
    for reason in placement.excluded.values():
        if reason != NOT_SELECTED:
            counts[reason] = counts.get(reason, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    return "; ".join(f"{n} node(s): {r}" for r, n in ranked)


def _removal_reason(node: str, placement: Placement) -> str:
    if node in placement.excluded:
        return placement.excluded[node]
    if node in placement.unhealthy:
        return f"fails its health probe: {placement.unhealthy[node]}"
    return "replaced" if node in placement.considered else "node deleted"


def _report(events: Events, before: Mapping[str, Mapping], endpoints: list[PlacedEndpoint],
            placement: Placement) -> None:
    """Events for placement changes and endpoint health transitions."""
    placed = {e.node for e in endpoints}
    added, removed = sorted(placed - before.keys()), sorted(before.keys() - placed)
    if added or removed:
        why = [f"{node} ({_removal_reason(node, placement)})" for node in removed]
        parts = [f"added {', '.join(added)}" if added else "", f"removed {', '.join(why)}" if why else ""]
        events.info("PlacementChanged", f"endpoints now: {', '.join(sorted(placed)) or 'none'}; "
                                        + "; ".join(p for p in parts if p))
    for ep in endpoints:
        was = before.get(ep.node, {}).get("healthy")
        if not ep.healthy and was is not False:
            events.warn("EndpointUnhealthy", f"{ep.node} ({ep.url}): {ep.probe.message}")
        elif ep.healthy and was is False:
            events.info("EndpointRecovered", f"{ep.node} ({ep.url}) passes its health probe again")
        was_pending = set(before.get(ep.node, {}).get("pending") or [])
        if was_pending and (done := sorted(was_pending & set(ep.models))):
            events.info("ModelReady", f"{', '.join(done)} ready on {ep.node}")
