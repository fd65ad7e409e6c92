"""Which InferenceNodes a pool uses: pure decisions, no I/O.

A node is eligible for a pool when it matches the pool's label selector, says it is
ready, has a fresh heartbeat, and either serves (or is loading) one of the pool's
models or can load them: a source resolves for the model, the agent's operations API
answers, a ModelCache copy is staged there when the model comes from one, the model
did not just fail to load there, and a node the pool does not hold yet has a free
model slot and enough free unified memory for the models it would load (the agent's
`free_memory_bytes`, less what other pools' pending loads already reserved). A slot is
an engine: a parked model (`tier: parked`, weights in memory, no engine; the agent
parks rather than unloads with `multi_model.park`) takes none, only memory, which
free memory already shows.

Of the eligible nodes a pool takes at most `spec.replicas`: healthy ones first, then
the ones it already has (no churn when free memory moves between heartbeats), then
those with more of its models already loaded (less to load), then more free memory,
then fewer models held or reserved (spreading models whose size nobody knows yet),
then the name. The first eligible, healthy node past those is the pool's `next`: where
one more replica (a scale-up, or the replacement of a failed node) would go, which the
operator announces to that node's agent so the model's files are in its page cache
before the load (`assignments.prefetch_plan`). Probe results, agent reports and size
estimates come in as values.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from typing import Any

from pydantic import ValidationError

from mlxpool.agentapi import CacheEntry, CachePhase, ModelPhase, ModelState, ModelTier, NodeReport, SchedulingPolicy
from mlxpool.nodes import NodeSpec, NodeStatus, WeightsResidency
from mlxpool.operator.logic.conditions import READY
from mlxpool.operator.logic.endpoints import NOT_PROBED, PlacedEndpoint, ProbeResult
from mlxpool.operator.logic.sources import LoadSource
from mlxpool.operator.logic.specs import LabelSelector, PoolSpec
from mlxpool.operator.logic.weights import model_capacities

READY_CACHE_PHASES = frozenset({CachePhase.CACHED, CachePhase.WARM, CachePhase.PINNED})
IN_TRANSIT = frozenset({ModelPhase.LOADING, ModelPhase.WARMING})
GIB = 1 << 30
NOT_SELECTED = "does not match the pool's nodeSelector"


@dataclass(frozen=True)
class NodeView:
    """What the InferenceNode object says about one node."""

    name: str
    endpoint: str
    labels: Mapping[str, str]
    ready: bool
    heartbeat: datetime | None
    free_memory_bytes: int | None
    models: frozenset[str]
    model_bytes: Mapping[str, int] = field(default_factory=dict)
    max_models: int = 1
    condition: tuple[str, str] | None = None
    """(status, reason) of the Ready condition the operator last wrote, if any."""
    chip: str = ""
    decode_rates: Mapping[str, float] = field(default_factory=dict)
    """Model -> decode tokens/s the agent's engine measured (models not measured are absent)."""
    generation: int = 0
    """metadata.generation: the agent rewrites the spec when it registers again."""
    condition_generation: int | None = None
    """observedGeneration of that Ready condition (kstatus reads it)."""
    parked: frozenset[str] = frozenset()
    """Models held parked (weights in memory, no engine): they take no model slot."""
    residency: tuple[tuple[str, str | None, WeightsResidency], ...] = ()
    """(model, path, where its weights are) for each loaded model whose status says so; read
    by the ModelCache status, not by placement (not in `routing_key`)."""

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> NodeView:
        """Parse an InferenceNode object; ValueError names what is wrong with it."""
        meta = body.get("metadata") or {}
        raw_status = dict(body.get("status") or {})
        try:
            spec = NodeSpec.model_validate(dict(body.get("spec") or {}))
            status = NodeStatus.model_validate(raw_status)
        except ValidationError as exc:
            raise ValueError(f"InferenceNode {meta.get('name')!r} is malformed: {exc}") from exc
        ready = next((c for c in raw_status.get("conditions") or [] if c.get("type") == READY), None)
        return cls(
            name=meta["name"],
            endpoint=spec.endpoint.rstrip("/"),
            labels=dict(meta.get("labels") or {}),
            ready=status.ready,
            heartbeat=status.heartbeat_time,
            free_memory_bytes=status.free_memory_bytes,
            models=frozenset(m.name for m in status.models),
            model_bytes={m.name: m.memory_bytes for m in status.models if m.memory_bytes},
            max_models=spec.max_models,
            condition=(ready.get("status"), ready.get("reason")) if ready else None,
            chip=spec.hardware.chip,
            decode_rates={m.name: m.decode_tokens_per_second for m in status.models if m.decode_tokens_per_second},
            generation=int(meta.get("generation") or 0),
            condition_generation=ready.get("observedGeneration") if ready else None,
            parked=frozenset(m.name for m in status.models if m.tier == ModelTier.PARKED.value),
            residency=tuple((m.name, m.path, m.weights) for m in status.models if m.weights is not None),
        )

    def routing_key(self) -> tuple[object, ...]:
        """Everything placement reads except the heartbeat and free memory, which change on
        every beat: two views with the same key place identically (short of staleness)."""
        return (self.endpoint, tuple(sorted(self.labels.items())), self.ready, self.models, self.max_models,
                self.condition, self.chip, tuple(sorted(self.decode_rates.items())),
                tuple(sorted(self.model_bytes.items())), tuple(sorted(self.parked)))


@dataclass(frozen=True)
class AgentView:
    """What a node's agent last said through its operations API (`GET /v1/node`)."""

    models: Mapping[str, ModelPhase] = field(default_factory=dict)
    """Model name -> its phase."""
    messages: Mapping[str, str] = field(default_factory=dict)
    model_bytes: Mapping[str, int] = field(default_factory=dict)
    cache: Mapping[str, CachePhase] = field(default_factory=dict)
    """Cache key -> its phase."""
    free_memory_bytes: int | None = None
    max_models: int = 1
    owners: Mapping[str, str] = field(default_factory=dict)
    """Model name -> who loaded it, for models loaded with an owner."""
    scheduling: Mapping[str, SchedulingPolicy] = field(default_factory=dict)
    """Model name -> the pool scheduling policy the agent applies to it."""
    parked: frozenset[str] = frozenset()
    """Models the agent holds parked (no engine slot taken)."""

    @classmethod
    def from_report(cls, report: NodeReport) -> AgentView:
        view = cls(free_memory_bytes=report.free_memory_bytes, max_models=report.max_models,
                   scheduling=dict(report.scheduling))
        for state in report.models:
            view = view.with_model(state)
        for entry in report.cache:
            view = view.with_cache(entry)
        return view

    def with_model(self, state: ModelState) -> AgentView:
        """This view after the agent answered a load/unload call with `state`."""
        messages = {k: v for k, v in self.messages.items() if k != state.name}
        if state.message:
            messages[state.name] = state.message
        sizes = dict(self.model_bytes)
        if state.memory_bytes:
            sizes[state.name] = state.memory_bytes
        owners = {k: v for k, v in self.owners.items() if k != state.name}
        if state.owner:
            owners[state.name] = state.owner
        parked = self.parked - {state.name} | ({state.name} if state.tier is ModelTier.PARKED else set())
        return replace(self, models={**self.models, state.name: state.phase}, messages=messages,
                       model_bytes=sizes, owners=owners, parked=frozenset(parked))

    def without_model(self, name: str) -> AgentView:
        return replace(self, models={k: v for k, v in self.models.items() if k != name},
                       owners={k: v for k, v in self.owners.items() if k != name}, parked=self.parked - {name})

    def with_policy(self, model: str, policy: SchedulingPolicy) -> AgentView:
        """This view after the agent answered a scheduling call with `policy`."""
        return replace(self, scheduling={**self.scheduling, model: policy})

    def with_cache(self, entry: CacheEntry) -> AgentView:
        return replace(self, cache={**self.cache, entry.key: entry.phase})

    def in_phase(self, phases: Collection[ModelPhase]) -> frozenset[str]:
        return frozenset(m for m, p in self.models.items() if p in phases)

    # Read by every pool's placement of every node: computed once per view (views are
    # immutable; a cached_property lives in the instance dict, outside eq and hash).
    @cached_property
    def ready(self) -> frozenset[str]:
        """Models answering requests now."""
        return self.in_phase({ModelPhase.READY})

    @cached_property
    def loading(self) -> frozenset[str]:
        """Models on their way in (`IN_TRANSIT`)."""
        return self.in_phase(IN_TRANSIT)

    @cached_property
    def slots_used(self) -> int:
        """Engine slots taken: every model but the failed and the parked ones."""
        return sum(p is not ModelPhase.FAILED and m not in self.parked for m, p in self.models.items())


@dataclass(frozen=True)
class Candidate:
    """A node as one placement decision sees it: object, agent report, probe, reservations."""

    view: NodeView
    agent: AgentView | None = None
    agent_error: str | None = None
    probe: ProbeResult = NOT_PROBED
    failures: Mapping[str, str] = field(default_factory=dict)
    """Models that failed to load here recently (model -> message), remembered by the operator."""
    reserved_slots: int = 0
    reserved_bytes: int = 0
    """Model slots and bytes other pools' not-yet-loaded models will take here."""

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def served(self) -> frozenset[str]:
        """Models answering requests now (the agent's word if it answers, else the heartbeat's)."""
        if self.agent is None:
            return self.view.models
        return self.agent.ready

    @property
    def in_transit(self) -> frozenset[str]:
        return frozenset() if self.agent is None else self.agent.loading

    @property
    def free_memory_bytes(self) -> int | None:
        if self.agent is not None and self.agent.free_memory_bytes is not None:
            return self.agent.free_memory_bytes
        return self.view.free_memory_bytes

    @property
    def model_slots_used(self) -> int:
        """Engine slots taken: models loading or active (a parked one holds none), plus reservations."""
        held = len(self.view.models - self.view.parked) if self.agent is None else self.agent.slots_used
        return held + self.reserved_slots

    @property
    def max_models(self) -> int:
        return self.agent.max_models if self.agent is not None else self.view.max_models

    def failure(self, model: str) -> str | None:
        """Why `model` failed to load here recently; the operator forgets it after a while,
        which makes the node eligible again (a retry)."""
        return self.failures.get(model)


@dataclass(frozen=True)
class Placement:
    chosen: list[Candidate]
    excluded: dict[str, str]
    """Why each node that is not eligible is not (node name -> reason)."""
    considered: frozenset[str] = frozenset()
    """Every node placement looked at."""
    unhealthy: dict[str, str] = field(default_factory=dict)
    """Eligible nodes failing their probe (name -> probe message)."""
    next: Candidate | None = None
    """The eligible, healthy node ranked right after the chosen ones: where one more replica
    would go (None: no such node among those looked at)."""


def selector_matches(selector: LabelSelector | None, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics; an absent or empty selector matches everything."""
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in selector.match_labels.items()):
        return False
    for req in selector.match_expressions:
        present = req.key in labels
        match req.operator:
            case "In":
                ok = present and labels[req.key] in req.values
            case "NotIn":
                ok = not present or labels[req.key] not in req.values
            case "Exists":
                ok = present
            case "DoesNotExist":
                ok = not present
        if not ok:
            return False
    return True


def node_unusable(node: NodeView, now: datetime, stale_after: float) -> str | None:
    """Why no pool may use `node` at all (not ready, no or stale heartbeat), or None."""
    if not node.ready:
        return "not ready"
    if node.heartbeat is None:
        return "has no heartbeat"
    age = (now - node.heartbeat).total_seconds()
    if age > stale_after:
        return f"heartbeat is stale ({age:.0f}s old)"
    return None


def loadable(c: Candidate, model: str, source: LoadSource | None) -> str | None:
    """Why `model` cannot be loaded on `c`, or None when it can (room aside)."""
    if source is None:
        return f"{model}: no source (set spec.models[].source or create a ModelCache for it)"
    if (failed := c.failure(model)) is not None:
        return f"{model} failed to load here: {failed}"
    if c.agent is None:
        return f"{model}: the agent's operations API is unavailable ({c.agent_error or 'not asked yet'})"
    if source.cache_key is not None:
        phase = c.agent.cache.get(source.cache_key)
        if source.stage is None and phase not in READY_CACHE_PHASES:
            shown = f" (phase {phase.value})" if phase is not None else ""
            return f"{model}: {source.origin} is not staged here{shown}"
        if phase is CachePhase.FAILED:
            return f"{model}: staging {source.cache_key} failed here"
    return None


def room(c: Candidate, models: Collection[str], sizes: Mapping[str, int | None]) -> str | None:
    """Why `c` has no room for `models` (slots, then memory), or None."""
    used, total = c.model_slots_used, c.max_models
    if used + len(models) > total:
        return f"no room: {len(models)} more model(s) on a node holding {used} of {total}"
    need = sum(sizes.get(m) or 0 for m in models)
    free = c.free_memory_bytes
    if free is not None and need > free - c.reserved_bytes:
        return f"no room: needs {need / GIB:.1f} GiB, {max(free - c.reserved_bytes, 0) / GIB:.1f} GiB free"
    return None


def exclusion_reason(
    c: Candidate, spec: PoolSpec, sources: Mapping[str, LoadSource | None], sizes: Mapping[str, int | None],
    now: datetime, stale_after: float, held: bool = False,
) -> str | None:
    """Why `c` cannot serve the pool, or None when it is eligible. `held`: the pool has it already."""
    if not selector_matches(spec.node_selector, c.view.labels):
        return NOT_SELECTED
    if (why := node_unusable(c.view, now, stale_after)) is not None:
        return why
    wanted = set(spec.model_names)
    if (c.served | c.in_transit) & wanted:
        return None
    if held and c.agent is None:
        return None  # no report yet (a restart) or a passing error: keep it rather than churn
    reasons = {m: loadable(c, m, sources.get(m)) for m in spec.model_names}
    can = [m for m, why in reasons.items() if why is None]
    if not can:
        return "serves none of the pool's models and can load none: " + "; ".join(
            why for why in reasons.values() if why is not None)
    return None if held else room(c, can, sizes)


def place(
    candidates: Iterable[Candidate],
    spec: PoolSpec,
    sources: Mapping[str, LoadSource | None],
    sizes: Mapping[str, int | None],
    current: Collection[str],
    now: datetime,
    stale_after: float,
) -> Placement:
    """The nodes the pool uses now, and why the others cannot be used."""
    eligible, excluded, considered, unhealthy = [], {}, set(), {}
    for c in candidates:
        considered.add(c.name)
        why = exclusion_reason(c, spec, sources, sizes, now, stale_after, held=c.name in current)
        if why is None:
            eligible.append(c)
            if not c.probe.healthy:
                unhealthy[c.name] = c.probe.message
        else:
            excluded[c.name] = why
    order = ranked(eligible, spec.model_names, current)
    chosen = order[: max(spec.replicas, 0)]
    after = next((c for c in order[len(chosen):] if c.probe.healthy), None)
    return Placement(sorted(chosen, key=lambda c: c.name), excluded, frozenset(considered), unhealthy, after)


def ranked(eligible: Sequence[Candidate], model_names: Collection[str], current: Collection[str]) -> list[Candidate]:
    """`eligible`, best first (ranking in the module docstring)."""
    wanted = set(model_names)

    def rank(c: Candidate) -> tuple[bool, bool, int, int, int, str]:
        free = c.free_memory_bytes or 0
        return (not c.probe.healthy, c.name not in current, -len((c.served | c.in_transit) & wanted),
                -(free - c.reserved_bytes), c.model_slots_used, c.name)

    return sorted(eligible, key=rank)


def choose(eligible: Sequence[Candidate], replicas: int, model_names: Collection[str],
           current: Collection[str]) -> list[Candidate]:
    """At most `replicas` of `eligible`, by name (ranking in the module docstring)."""
    return sorted(ranked(eligible, model_names, current)[: max(replicas, 0)], key=lambda c: c.name)


def endpoints_of(chosen: Sequence[Candidate], model_names: Sequence[str],
                 managed: Mapping[str, Collection[str]] | None = None,
                 sizes: Mapping[str, int | None] | None = None) -> list[PlacedEndpoint]:
    """One endpoint per chosen node (by name); `managed`: node -> models the operator loaded;
    `sizes`: model bytes known elsewhere (caches, other nodes), for the capacity prior."""
    managed = managed or {}
    known_sizes = {m: b for m, b in (sizes or {}).items() if b}
    endpoints = []
    for c in sorted(chosen, key=lambda c: c.name):
        served = c.served
        endpoints.append(PlacedEndpoint(
            node=c.name, url=c.view.endpoint, probe=c.probe,
            models=tuple(sorted(m for m in model_names if m in served)),
            pending=tuple(sorted(m for m in model_names if m not in served)),
            managed=tuple(sorted(m for m in model_names if m in managed.get(c.name, ()))),
            capacities=model_capacities(chip=c.view.chip, measured=c.view.decode_rates,
                                        model_bytes={**known_sizes, **c.view.model_bytes}, models=sorted(model_names)),
        ))
    return endpoints
