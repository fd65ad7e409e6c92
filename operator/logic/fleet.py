"""What the operator knows about every node right now, shared by all pools: memory only.

One `Fleet` per operator process holds the InferenceNode views (from the watch), the
latest probe and agent report per node (from the node monitors), and the claims: which
models each pool wants on which node. From the claims it derives what other pools have
reserved on a node (so two pools do not both fill the same free memory) and which
models to unload (one the operator loaded, that no pool claims any more). Listeners
hear which node changed and how (`health` or `agent`), so pools reconcile at once
instead of at their next tick.

Rebuilt after a restart from the pools' statuses (`seed`) before any pool acts, and
from the agents' reports; nothing here is written anywhere. What an unload decision
lost to a restart would leave behind (a model this operator loaded that no pool wants
any more) is found again from the reports: agents say who loaded each model, and a
model of ours that no pool has claimed for a grace period is an orphan to unload
(`orphans_due`). Only once every pool is seeded: before that, an unclaimed model may
just belong to a pool not read yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from mlxpool.agentapi import CacheEntry, CachePhase, ModelPhase, ModelState, NodeReport
from mlxpool.operator.logic.endpoints import NOT_PROBED, ProbeResult
from mlxpool.operator.logic.placement import IN_TRANSIT, AgentView, Candidate, NodeView

PoolKey = tuple[str, str]
Listener = Callable[[str, str], None]
HEALTH, AGENT = "health", "agent"
_STAGING = frozenset({CachePhase.PENDING.value, CachePhase.DOWNLOADING.value, CachePhase.VERIFYING.value})
_LIVE = frozenset({ModelPhase.LOADING.value, ModelPhase.WARMING.value, ModelPhase.READY.value})


@dataclass
class Observation:
    """The latest word on one node from its monitor (and from calls made to its agent)."""

    probe: ProbeResult = NOT_PROBED
    agent: AgentView | None = None
    agent_error: str | None = "not asked yet"


@dataclass
class Claim:
    nodes: dict[str, frozenset[str]] = field(default_factory=dict)
    """Node name -> the pool's models wanted there."""
    probe_interval: float | None = None


class Fleet:
    def __init__(self, retry_after: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 owner: str | None = None) -> None:
        self.views: dict[str, NodeView] = {}
        self.observations: dict[str, Observation] = {}
        self.claims: dict[PoolKey, Claim] = {}
        self.managed: set[tuple[str, str]] = set()
        """(node, model) pairs the operator loaded: the only models it ever unloads."""
        self._failures: dict[tuple[str, str], tuple[str, float]] = {}
        self._noted_at: dict[str, float] = {}
        self._deferred: set[tuple[str, str]] = set()
        """When the operator last learned a node's state from its own call (clock time)."""
        self._retry_after = retry_after
        self._clock = clock
        self._listeners: list[Listener] = []
        self.owner = owner
        """Who this operator is on the agents (`LoadModelRequest.owner`); None: no orphan cleanup."""
        self.seeded = False
        """Every pool's claims are known (set once the startup listing succeeded)."""
        self._unclaimed_since: dict[tuple[str, str], float] = {}

    # -- nodes ---------------------------------------------------------------------------
    def set_view(self, view: NodeView) -> bool:
        """Record a node's object; True when placement could see a difference."""
        old = self.views.get(view.name)
        self.views[view.name] = view
        return old is None or old.routing_key() != view.routing_key()

    def drop_view(self, name: str) -> None:
        self.views.pop(name, None)
        self.observations.pop(name, None)
        self._noted_at.pop(name, None)
        self._deferred = {p for p in self._deferred if p[0] != name}
        self._unclaimed_since = {p: t for p, t in self._unclaimed_since.items() if p[0] != name}
        self._failures = {k: v for k, v in self._failures.items() if k[0] != name}

    def observation(self, node: str) -> Observation:
        return self.observations.setdefault(node, Observation())

    # -- what monitors and agent calls observe -------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def notify(self, node: str, what: str) -> None:
        """Tell the listeners that `node` changed in a way the fleet cannot see itself."""
        self._changed(node, what)

    def _changed(self, node: str, what: str) -> None:
        for listener in self._listeners:
            listener(node, what)

    def observe_probe(self, node: str, result: ProbeResult) -> bool:
        obs = self.observation(node)
        if obs.probe == result:
            return False
        obs.probe = result
        self._changed(node, HEALTH)
        return True

    def now(self) -> float:
        return self._clock()

    def observe_report(self, node: str, report: NodeReport | None, error: str | None = None,
                       asked_at: float | None = None) -> bool:
        """A `GET /v1/node` (or why there is none); True if it changed anything. A report
        asked for before the operator's last call to that agent is older than what the
        call's answer taught us: it is dropped (the monitor asks again at its next tick
        while a load or staging is under way)."""
        if asked_at is not None and asked_at < self._noted_at.get(node, float("-inf")):
            return False
        return self._set_agent(node, AgentView.from_report(report) if report is not None else None, error)

    def note_model(self, node: str, state: ModelState) -> None:
        """An agent answered a load call with `state`."""
        self._noted_at[node] = self._clock()
        agent = self.observation(node).agent
        if agent is not None:
            self._set_agent(node, agent.with_model(state), None)

    def note_unloaded(self, node: str, model: str) -> None:
        self._noted_at[node] = self._clock()
        agent = self.observation(node).agent
        if agent is not None:
            self._set_agent(node, agent.without_model(model), None)

    def note_cache(self, node: str, entry: CacheEntry) -> None:
        self._noted_at[node] = self._clock()
        agent = self.observation(node).agent
        if agent is not None:
            self._set_agent(node, agent.with_cache(entry), None)

    def note_cache_gone(self, node: str, key: str) -> None:
        self._noted_at[node] = self._clock()
        agent = self.observation(node).agent
        if agent is not None and key in agent.cache:
            self._set_agent(node, replace(agent, cache={k: v for k, v in agent.cache.items() if k != key}), None)

    def note_failure(self, node: str, model: str, message: str) -> None:
        """A load of `model` on `node` failed: keep pools away from that pair for a while."""
        self._failures[node, model] = (message, self._clock())
        self._changed(node, AGENT)

    def _set_agent(self, node: str, agent: AgentView | None, error: str | None) -> bool:
        obs = self.observation(node)
        if agent is not None:
            before = obs.agent.models if obs.agent is not None else {}
            for model, phase in agent.models.items():
                if phase == ModelPhase.FAILED.value and before.get(model) != ModelPhase.FAILED.value:
                    self._failures[node, model] = (agent.messages.get(model, "failed"), self._clock())
            # What the agent says we loaded is ours to unload, even if we restarted since.
            self.managed.update((node, m) for m, o in agent.owners.items()
                                if o == self.owner and self.owner is not None and agent.models.get(m) in _LIVE)
        if (obs.agent, obs.agent_error) == (agent, error):
            return False
        placement_relevant = _digest(obs.agent) != _digest(agent) or (obs.agent is None) != (agent is None)
        obs.agent, obs.agent_error = agent, error
        if placement_relevant:
            self._changed(node, AGENT)
        return True

    def failures(self, node: str) -> dict[str, str]:
        now = self._clock()
        return {m: msg for (n, m), (msg, at) in self._failures.items()
                if n == node and now - at < self._retry_after}

    def in_transit(self, node: str) -> bool:
        """Something on the node is on its way (a load or a staging): report often."""
        agent = self.observation(node).agent
        return agent is not None and (any(p in IN_TRANSIT or p == ModelPhase.UNLOADING.value
                                          for p in agent.models.values())
                                      or any(p in _STAGING for p in agent.cache.values()))

    # -- claims --------------------------------------------------------------------------
    def seed(self, pool: PoolKey, nodes: Mapping[str, Iterable[str]], managed: Iterable[tuple[str, str]] = (),
             probe_interval: float | None = None) -> None:
        """What a pool held before a restart (from its status), before any pool acts."""
        self.claims[pool] = Claim({n: frozenset(ms) for n, ms in nodes.items()}, probe_interval)
        self.managed.update(managed)

    def claim(self, pool: PoolKey, nodes: Mapping[str, Collection[str]],
              probe_interval: float | None = None) -> list[tuple[str, str]]:
        """Set what `pool` wants where; returns the (node, model) pairs to unload now:
        ones the pool gave up, that the operator loaded, and that no other pool claims."""
        before = self.claims.get(pool, Claim()).nodes
        after = {n: frozenset(ms) for n, ms in nodes.items() if ms}
        self.claims[pool] = Claim(after, probe_interval)
        released = {(n, m) for n, ms in before.items() for m in ms if m not in after.get(n, ())}
        return self._unloadable(released)

    def release(self, pool: PoolKey) -> list[tuple[str, str]]:
        """The pool is gone: forget its claims; returns the pairs to unload."""
        claim = self.claims.pop(pool, None)
        if claim is None:
            return []
        return self._unloadable({(n, m) for n, ms in claim.nodes.items() for m in ms})

    def _unloadable(self, released: set[tuple[str, str]]) -> list[tuple[str, str]]:
        claimed = {(n, m) for c in self.claims.values() for n, ms in c.nodes.items() for m in ms}
        due = sorted(p for p in released if p in self.managed and p not in claimed)
        self.managed.difference_update(due)
        return due

    def defer_unload(self, node: str, model: str) -> None:
        """An unload decided while the node did not answer: its monitor does it later."""
        self._deferred.add((node, model))

    def deferred_unloads(self, node: str) -> list[str]:
        """Deferred unloads for `node` that no pool has claimed again since."""
        claimed = {m for c in self.claims.values() for m in c.nodes.get(node, ())}
        for model in [m for n, m in self._deferred if n == node and m in claimed]:
            self._deferred.discard((node, model))
        return sorted(m for n, m in self._deferred if n == node)

    def orphans_due(self, node: str, grace: float) -> list[str]:
        """Models of ours, ready on `node`, that no pool has claimed for `grace` seconds:
        to unload now (they leave `managed`). Deferred unloads are left to their own path."""
        agent = self.observation(node).agent
        if not self.seeded or self.owner is None or agent is None:
            return []
        claimed = {m for c in self.claims.values() for m in c.nodes.get(node, ())}
        unclaimed = {m for m, o in agent.owners.items()
                     if o == self.owner and agent.models.get(m) == ModelPhase.READY.value
                     and m not in claimed and (node, m) not in self._deferred}
        now = self._clock()
        for pair in [p for p in self._unclaimed_since if p[0] == node and p[1] not in unclaimed]:
            del self._unclaimed_since[pair]
        due = []
        for model in sorted(unclaimed):
            since = self._unclaimed_since.setdefault((node, model), now)
            if now - since >= grace:
                due.append(model)
                del self._unclaimed_since[node, model]
                self.managed.discard((node, model))
        return due

    def forget_deferred(self, node: str, model: str) -> None:
        self._deferred.discard((node, model))

    def mark_managed(self, node: str, model: str) -> None:
        self.managed.add((node, model))

    def managed_on(self, node: str) -> set[str]:
        return {m for n, m in self.managed if n == node}

    def claimed(self, node: str) -> bool:
        return any(node in c.nodes for c in self.claims.values())

    def probe_interval(self, node: str, default: float) -> float:
        """The shortest interval of the pools claiming the node, else `default`."""
        intervals = [c.probe_interval for c in self.claims.values() if node in c.nodes and c.probe_interval]
        return min(intervals, default=default)

    # -- what one pool's placement sees ------------------------------------------------------
    def candidates(self, pool: PoolKey, sizes: Mapping[str, int | None]) -> list[Candidate]:
        """Every known node as `pool` sees it: other pools' pending loads are reserved."""
        others: dict[str, set[str]] = {}
        for key, claim in self.claims.items():
            if key != pool:
                for node, models in claim.nodes.items():
                    others.setdefault(node, set()).update(models)
        result = []
        for name, view in self.views.items():
            obs = self.observation(name)
            held = set(obs.agent.models) if obs.agent is not None else set(view.models)
            ready = {m for m, p in obs.agent.models.items() if p == ModelPhase.READY.value} \
                if obs.agent is not None else set(view.models)
            pending = others.get(name, set()) - ready
            result.append(Candidate(
                view=view, agent=obs.agent, agent_error=obs.agent_error, probe=obs.probe,
                failures=self.failures(name),
                reserved_slots=len(pending - held),
                reserved_bytes=sum(sizes.get(m) or 0 for m in pending),
            ))
        return result

    def model_sizes(self) -> dict[str, int]:
        """The largest size any node reports per model: the estimate for loading it elsewhere."""
        sizes: dict[str, int] = {}
        for name, view in self.views.items():
            agent = self.observation(name).agent
            for model, size in (*view.model_bytes.items(), *(agent.model_bytes.items() if agent else ())):
                sizes[model] = max(sizes.get(model, 0), size)
        return sizes


def _digest(agent: AgentView | None) -> tuple | None:
    """What placement reads from a report (free memory moves on every load: left out)."""
    if agent is None:
        return None
    return (tuple(sorted(agent.models.items())), tuple(sorted(agent.cache.items())), agent.max_models)
