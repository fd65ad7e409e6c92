"""Which InferenceNodes a pool routes to: pure decisions, no I/O.

A node is eligible for a pool when it matches the pool's label selector, says it is
ready, has a fresh heartbeat and serves at least one of the pool's models. Of the
eligible nodes a pool takes at most `spec.replicas`, sticking to the ones it already
has as long as they stay healthy, so that placement does not churn when free memory
fluctuates between heartbeats. This module does not probe anything: probe results
come in as a mapping.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from mlxpool.nodes import NodeSpec, NodeStatus
from mlxpool.operator.specs import LabelSelector, PoolSpec


@dataclass(frozen=True)
class NodeView:
    """What placement needs to know about one InferenceNode."""

    name: str
    endpoint: str
    labels: Mapping[str, str]
    ready: bool
    heartbeat: datetime | None
    free_memory_bytes: int | None
    models: frozenset[str]

    @classmethod
    def from_body(cls, body: Mapping) -> NodeView:
        """Parse an InferenceNode object; ValueError names what is wrong with it."""
        meta = body.get("metadata") or {}
        try:
            spec = NodeSpec.model_validate(dict(body.get("spec") or {}))
            status = NodeStatus.model_validate(dict(body.get("status") or {}))
        except ValidationError as exc:
            raise ValueError(f"InferenceNode {meta.get('name')!r} is malformed: {exc}") from exc
        return cls(
            name=meta["name"],
            endpoint=spec.endpoint.rstrip("/"),
            labels=dict(meta.get("labels") or {}),
            ready=status.ready,
            heartbeat=status.heartbeat_time,
            free_memory_bytes=status.free_memory_bytes,
            models=frozenset(m.name for m in status.models),
        )

    def routing_key(self) -> tuple:
        """Everything placement reads except the heartbeat and free memory, which change on
        every beat: two views with the same key place identically (short of staleness)."""
        return (self.endpoint, tuple(sorted(self.labels.items())), self.ready, self.models)


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


def exclusion_reason(node: NodeView, spec: PoolSpec, now: datetime, stale_after: float) -> str | None:
    """Why `node` cannot serve the pool, or None when it is eligible."""
    if not selector_matches(spec.node_selector, node.labels):
        return "does not match the pool's nodeSelector"
    if not node.ready:
        return "not ready"
    if node.heartbeat is None:
        return "has no heartbeat"
    age = (now - node.heartbeat).total_seconds()
    if age > stale_after:
        return f"heartbeat is stale ({age:.0f}s old)"
    if not node.models & set(spec.model_names):
        return "serves none of the pool's models"
    return None


def eligible_nodes(nodes: Iterable[NodeView], spec: PoolSpec, now: datetime, stale_after: float) -> list[NodeView]:
    """The nodes that may serve the pool, by name."""
    return sorted((n for n in nodes if exclusion_reason(n, spec, now, stale_after) is None), key=lambda n: n.name)


def choose(
    eligible: Sequence[NodeView],
    replicas: int,
    model_names: Collection[str],
    current: Collection[str],
    healthy: Mapping[str, bool],
) -> list[NodeView]:
    """At most `replicas` of `eligible`, by name.

    Preference: healthy before unhealthy (an unhealthy node only fills a slot no
    healthy node can), then nodes the pool already has (no churn), then nodes serving
    more of the pool's models, then more free memory, then the name (determinism).
    """
    wanted = set(model_names)

    def rank(node: NodeView) -> tuple:
        return (
            not healthy.get(node.name, False),
            node.name not in current,
            -len(node.models & wanted),
            -(node.free_memory_bytes or 0),
            node.name,
        )

    return sorted(sorted(eligible, key=rank)[: max(replicas, 0)], key=lambda n: n.name)
