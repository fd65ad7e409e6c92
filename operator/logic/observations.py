"""What the operator has observed of every node, shared by all pools: memory only.

One `Observations` per operator process (inside the `fleet`) holds the InferenceNode
views (from the watch; a view's heartbeat is the later of the status's `heartbeatTime`
and the node Lease's last renewal, from the lease watch), the latest probe result and agent report per node (from the
node monitors), what the answers to the operator's own calls taught it (`note_*`), and
the loads it saw fail, kept for `retry_after` seconds so that pools stay away from that
node and model before trying again. Listeners hear which node changed and how
(`HEALTH` or `AGENT`), so pools reconcile at once instead of at their next tick; agent
listeners get every agent view taken, changed or not (the claims learn from them which
models are the operator's).

What is here says what *is* on the nodes. What the operator wants and owns there (the
pools' claims, the models it loaded, the unloads it still owes) is `claims`; the two
meet only in the `fleet`. Nothing here is written anywhere: after a restart the watch,
the probes and the agents' reports fill it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from mlxpool.agentapi import CacheEntry, CachePhase, ModelPhase, ModelState, NodeReport, SchedulingPolicy
from mlxpool.operator.logic.endpoints import NOT_PROBED, ProbeResult
from mlxpool.operator.logic.placement import IN_TRANSIT, AgentView, NodeView


class NodeChange(StrEnum):
    """How a node changed, as listeners hear it."""

    HEALTH = "health"
    """Its probe result, or its heartbeat's freshness."""
    AGENT = "agent"
    """What its agent holds, as placement reads it (or a load that failed there)."""


HEALTH, AGENT = NodeChange.HEALTH, NodeChange.AGENT
Listener = Callable[[str, NodeChange], None]
AgentListener = Callable[[str, AgentView], None]
_BUSY = IN_TRANSIT | {ModelPhase.UNLOADING}
_STAGING = frozenset({CachePhase.PENDING, CachePhase.DOWNLOADING, CachePhase.VERIFYING})


@dataclass
class Observation:
    """The latest word on one node from its monitor (and from calls made to its agent)."""

    probe: ProbeResult = NOT_PROBED
    agent: AgentView | None = None
    agent_error: str | None = "not asked yet"


class Observations:
    def __init__(self, retry_after: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.views: dict[str, NodeView] = {}
        self.nodes: dict[str, Observation] = {}
        self._renewals: dict[str, datetime] = {}
        """Node -> its Lease's last renewal (kept for nodes whose object is not seen yet)."""
        self._status_beats: dict[str, datetime | None] = {}
        """Node -> the heartbeat its InferenceNode's status says."""
        self._failures: dict[str, dict[str, tuple[str, float]]] = {}
        """Node -> model -> (message, clock time) of the last failed load seen there."""
        self._sizes: dict[str, int] | None = None
        """`model_sizes`, kept until a node's or an agent's model sizes change (read by every pool pass)."""
        self._noted_at: dict[str, float] = {}
        """When the operator last learned a node's state from its own call (clock time)."""
        self._retry_after = retry_after
        self._clock = clock
        self._listeners: list[Listener] = []
        self._agent_listeners: list[AgentListener] = []

    def now(self) -> float:
        return self._clock()

    # -- node objects ----------------------------------------------------------------------
    def set_view(self, view: NodeView) -> bool:
        """Record a node's object; True when placement could see a difference."""
        old = self.views.get(view.name)
        if old is None or old.model_bytes != view.model_bytes:
            self._sizes = None
        self._status_beats[view.name] = view.heartbeat
        self.views[view.name] = replace(view, heartbeat=_later(view.heartbeat, self._renewals.get(view.name)))
        return old is None or old.routing_key() != view.routing_key()

    def renew(self, name: str, renewed: datetime | None) -> None:
        """The node's Lease was renewed at `renewed` (None: the Lease is gone). Staleness is
        read at every monitor tick, so nobody is told here."""
        if renewed is None:
            self._renewals.pop(name, None)
        else:
            self._renewals[name] = renewed
        if (view := self.views.get(name)) is not None:
            self.views[name] = replace(view, heartbeat=_later(self._status_beats.get(name), renewed))

    def drop_view(self, name: str) -> None:
        """The node is gone (or unreadable): forget everything seen there."""
        self.views.pop(name, None)
        self.nodes.pop(name, None)
        self._status_beats.pop(name, None)
        self._noted_at.pop(name, None)
        self._failures.pop(name, None)
        self._sizes = None

    def of(self, node: str) -> Observation:
        return self.nodes.setdefault(node, Observation())

    # -- who hears about changes -----------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def subscribe_agents(self, listener: AgentListener) -> None:
        """`listener(node, view)` for every agent view taken (a report or a call's answer)."""
        self._agent_listeners.append(listener)

    def notify(self, node: str, what: NodeChange) -> None:
        """Tell the listeners that `node` changed in a way the observations cannot see themselves."""
        self._changed(node, what)

    def _changed(self, node: str, what: NodeChange) -> None:
        for listener in self._listeners:
            listener(node, what)

    # -- what monitors and agent calls observe ---------------------------------------------
    def observe_probe(self, node: str, result: ProbeResult) -> bool:
        obs = self.of(node)
        if obs.probe == result:
            return False
        obs.probe = result
        self._changed(node, HEALTH)
        return True

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
        """An agent answered a load or unload call with `state`."""
        self._noted_at[node] = self._clock()
        agent = self.of(node).agent
        if agent is not None:
            self._set_agent(node, agent.with_model(state), None)

    def note_policy(self, node: str, model: str, policy: SchedulingPolicy) -> None:
        """An agent answered a scheduling call: it applies `policy` to `model` now."""
        self._noted_at[node] = self._clock()
        agent = self.of(node).agent
        if agent is not None:
            self._set_agent(node, agent.with_policy(model, policy), None)

    def note_unloaded(self, node: str, model: str) -> None:
        self._noted_at[node] = self._clock()
        agent = self.of(node).agent
        if agent is not None:
            self._set_agent(node, agent.without_model(model), None)

    def note_cache(self, node: str, entry: CacheEntry) -> None:
        self._noted_at[node] = self._clock()
        agent = self.of(node).agent
        if agent is not None:
            self._set_agent(node, agent.with_cache(entry), None)

    def note_cache_gone(self, node: str, key: str) -> None:
        self._noted_at[node] = self._clock()
        agent = self.of(node).agent
        if agent is not None and key in agent.cache:
            self._set_agent(node, replace(agent, cache={k: v for k, v in agent.cache.items() if k != key}), None)

    def note_failure(self, node: str, model: str, message: str) -> None:
        """A load of `model` on `node` failed: keep pools away from that pair for a while."""
        self._failures.setdefault(node, {})[model] = (message, self._clock())
        self._changed(node, AGENT)

    def _set_agent(self, node: str, agent: AgentView | None, error: str | None) -> bool:
        obs = self.of(node)
        if agent is not None:
            before = obs.agent.models if obs.agent is not None else {}
            for model, phase in agent.models.items():
                if phase is ModelPhase.FAILED and before.get(model) is not ModelPhase.FAILED:
                    self._failures.setdefault(node, {})[model] = (agent.messages.get(model, "failed"), self._clock())
            for listener in self._agent_listeners:
                listener(node, agent)
        if (obs.agent, obs.agent_error) == (agent, error):
            return False
        placement_relevant = _digest(obs.agent) != _digest(agent) or (obs.agent is None) != (agent is None)
        if (obs.agent.model_bytes if obs.agent else None) != (agent.model_bytes if agent else None):
            self._sizes = None  # a report whose free memory moved (nearly every one) keeps the sizes
        obs.agent, obs.agent_error = agent, error
        if placement_relevant:
            self._changed(node, AGENT)
        return True

    # -- what the observations tell ----------------------------------------------------------
    def failures(self, node: str) -> dict[str, str]:
        """Models that failed to load on `node` in the last `retry_after` seconds -> why."""
        entries = self._failures.get(node)
        if not entries:  # nearly always: asked for every node by every pool's placement
            return {}
        now = self._clock()
        return {m: msg for m, (msg, at) in entries.items() if now - at < self._retry_after}

    def in_transit(self, node: str) -> bool:
        """Something on the node is on its way (a load, an unload or a staging): report often."""
        agent = self.of(node).agent
        return agent is not None and (any(p in _BUSY for p in agent.models.values())
                                      or any(p in _STAGING for p in agent.cache.values()))

    def model_sizes(self) -> dict[str, int]:
        """The largest size any node reports per model: the estimate for loading it elsewhere
        (a copy: callers may add to it)."""
        if self._sizes is None:
            sizes: dict[str, int] = {}
            for name, view in self.views.items():
                agent = self.of(name).agent
                for model, size in (*view.model_bytes.items(), *(agent.model_bytes.items() if agent else ())):
                    sizes[model] = max(sizes.get(model, 0), size)
            self._sizes = sizes
        return dict(self._sizes)


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return max(a, b)


_Digest = tuple[tuple[tuple[str, ModelPhase], ...], tuple[tuple[str, CachePhase], ...], int, tuple[str, ...]]


def _digest(agent: AgentView | None) -> _Digest | None:
    """What placement reads from a report (free memory moves on every load: left out)."""
    if agent is None:
        return None
    return (tuple(sorted(agent.models.items())), tuple(sorted(agent.cache.items())), agent.max_models,
            tuple(sorted(agent.parked)))
