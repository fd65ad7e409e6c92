"""ModelCache reconciliation: stage a model's copy on the selected nodes through their
agents, report per-node progress, and remove the copies when the cache goes.

A pass: the selected nodes are the ready, fresh InferenceNodes matching
`spec.nodeSelector`. For each, `GET /v1/node/cache/{key}`; a node that lacks the copy,
or has not seen this generation of the spec (warm/pin changed), gets
`PUT /v1/node/cache/{key}` (idempotent on the agent). Nodes that left the selection
and copies under an old key (the source, revision or digests changed) are deleted.
The status is written only when it changed; the entries also go to the fleet, so pools
waiting for the copy load the model at once.

Cleanup (`cleanup`, from the finalizer) deletes the copy on every node that holds it
and skips a node whose InferenceNode is gone or whose heartbeat is stale past the
operator's bound: an agent gone for good never blocks a deletion. A copy a loaded
model still uses is refused by the agent (409) and retried: deletion waits for the
pools that use it, like a PVC in use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from mlxpool.agentapi import CacheEntry, CachePhase, StageRequest
from mlxpool.operator.io import metrics
from mlxpool.operator.io.agentclient import AgentError
from mlxpool.operator.logic.cache_statuses import cache_status, cache_weights, finished_phases, node_entry
from mlxpool.operator.logic.fleet import Fleet
from mlxpool.operator.logic.placement import NodeView, node_unusable, selector_matches
from mlxpool.operator.logic.sources import cache_key
from mlxpool.operator.logic.specs import CacheSpec
from mlxpool.operator.logic.statuses import status_patch
from mlxpool.operator.reconcilers.pools import Events

log = logging.getLogger(__name__)


class Kube(Protocol):
    async def patch_cache_status(self, namespace: str, name: str, status: Mapping) -> dict: ...


class CacheAgents(Protocol):
    async def stage(self, url: str, key: str, request: StageRequest) -> CacheEntry: ...
    async def cache_entry(self, url: str, key: str) -> CacheEntry | None: ...
    async def delete_cache(self, url: str, key: str) -> bool: ...


@dataclass
class CacheState:
    status: dict = field(default_factory=dict)
    staged: dict[str, int] = field(default_factory=dict)
    """Node -> the generation last sent to it with PUT (memory; the status stands in after a restart)."""

    @classmethod
    def from_status(cls, status: Mapping | None) -> CacheState:
        status = dict(status or {})
        generation = int(status.get("observedGeneration") or 0)
        return cls(status=status, staged={n["node"]: generation for n in status.get("nodes") or []
                                          if n.get("phase") != CachePhase.PENDING})


@dataclass(frozen=True)
class CacheResult:
    status: dict
    done: bool
    """Every selected node holds the copy in a finished phase (the daemon may slow down)."""
    interest: frozenset[str] = frozenset()
    """Nodes matching the selector, usable or not: a change on one may change the cache."""


class CacheReconciler:
    def __init__(self, kube: Kube, agents: CacheAgents, fleet: Fleet, stale_after: float,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._kube = kube
        self._agents = agents
        self._fleet = fleet
        self._stale_after = stale_after
        self._clock = clock

    def _usable(self, view: NodeView, now: datetime) -> bool:
        return node_unusable(view, now, self._stale_after) is None

    async def reconcile(self, body: Mapping, state: CacheState, events: Events) -> CacheResult:
        meta = body["metadata"]
        namespace, name, generation = meta["namespace"], meta["name"], int(meta.get("generation") or 0)
        spec = CacheSpec.from_body(body)
        key = cache_key(namespace, name, spec)
        now = self._clock()
        targets = sorted((v for v in self._fleet.observed.views.values()
                          if selector_matches(spec.node_selector, v.labels) and self._usable(v, now)),
                         key=lambda v: v.name)
        target_names = {v.name for v in targets}
        previous = {n["node"]: n for n in state.status.get("nodes") or []}

        old_key = state.status.get("cacheKey")
        stale_copies = [(node, key) for node in previous if node not in target_names]
        if old_key and old_key != key:
            stale_copies += [(node, old_key) for node in previous]
            state.staged.clear()
        entries = await asyncio.gather(*(self._stage_on(v, spec, key, generation, previous.get(v.name), state, events)
                                         for v in targets))
        await asyncio.gather(*(self._remove(node, k, events, now) for node, k in stale_copies))

        desired = cache_status(spec=spec, key=key, generation=generation, nodes=entries, previous=state.status,
                               now=now)
        patch = status_patch(desired, state.status)
        if patch is not None:
            state.status = await self._kube.patch_cache_status(namespace, name, patch)
        metrics.CACHE_RECONCILES.labels("status" if patch else "unchanged").inc()
        finished = finished_phases(spec)
        interest = frozenset(v.name for v in self._fleet.observed.views.values()
                             if selector_matches(spec.node_selector, v.labels))
        return CacheResult(state.status, all(e["phase"] in finished for e in entries), interest | previous.keys())

    async def _stage_on(self, view: NodeView, spec: CacheSpec, key: str, generation: int, previous: Mapping | None,
                        state: CacheState, events: Events) -> dict:
        node = view.name
        if not self._fleet.observed.of(node).probe.healthy:
            kept = dict(previous) if previous else node_entry(node, None)
            kept["message"] = "the agent does not answer its health probe"
            return kept
        try:
            entry = await self._agents.cache_entry(view.endpoint, key)
            if entry is None or state.staged.get(node) != generation:
                entry = await self._agents.stage(view.endpoint, key, spec.stage_request())
                if state.staged.get(node) is None:
                    events.info("Staging", f"staging {spec.source} on {node}")
                state.staged[node] = generation
        except AgentError as exc:
            kept = dict(previous) if previous else node_entry(node, None)
            kept["message"] = f"agent: {exc}"[:1024]
            if previous is None or previous.get("message") != kept["message"]:
                events.warn("StagingError", f"{node}: {exc}")
            return kept
        self._fleet.observed.note_cache(node, entry)
        item = node_entry(node, entry, weights=cache_weights(key, entry.path, view.residency))
        if previous is not None and previous.get("phase") != item["phase"]:
            if entry.phase is CachePhase.FAILED:
                events.warn("StagingFailed", f"{node}: {entry.message or 'failed'}")
            elif entry.phase in finished_phases(spec):
                loaded = f", loaded in {entry.load_time_seconds:.2f}s" if entry.load_time_seconds else ""
                events.info("Staged", f"{node}: {entry.phase.value}{loaded}")
        return item

    async def _remove(self, node: str, key: str, events: Events, now: datetime) -> bool:
        """Delete `key` on `node`; True when done or skipped for good (node gone or stale)."""
        view = self._fleet.observed.views.get(node)
        if view is None or not self._usable(view, now):
            log.info("not deleting cache copy node=%s key=%s: node gone or stale", node, key)
            return True
        try:
            await self._agents.delete_cache(view.endpoint, key)
        except AgentError as exc:
            events.warn("CacheRemovalPending", f"cannot remove {key} from {node} yet: {exc}")
            return False
        self._fleet.observed.note_cache_gone(node, key)
        events.info("Removed", f"removed {key} from {node}")
        return True

    async def cleanup(self, body: Mapping, events: Events) -> list[str]:
        """Delete the copies of a ModelCache being deleted; returns the nodes still to do.
        The status keeps listing only those, so a retry asks no agent twice."""
        meta = body["metadata"]
        status = body.get("status") or {}
        key = status.get("cacheKey") or cache_key(meta["namespace"], meta["name"], CacheSpec.from_body(body))
        listed = {n["node"]: n for n in status.get("nodes") or []}
        nodes = set(listed) | {name for name, obs in self._fleet.observed.nodes.items()
                               if obs.agent and key in obs.agent.cache}
        now = self._clock()
        order = sorted(nodes)
        done = await asyncio.gather(*(self._remove(node, key, events, now) for node in order))
        pending = [node for node, ok in zip(order, done, strict=True) if not ok]
        if set(pending) != set(listed):
            remaining = [listed.get(n) or {"node": n, "phase": CachePhase.CACHED.value} for n in pending]
            await self._kube.patch_cache_status(meta["namespace"], meta["name"], {"nodes": remaining})
        return pending
