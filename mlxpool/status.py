"""`mlxpool status`: pools, nodes, caches, routing revisions and recent Events at a glance.

What `kubectl get ipool,inode,mcache` and `kubectl get events` would show, joined into
one summary a person reads top to bottom: a pool's ready count next to the nodes it
counts, each node's readiness beside the operator's verdict and its heartbeat age (from
its Lease, the heartbeat the operator reads), memory in GiB, and the Events the
operator posted on mlxpool objects. It also checks that a pool's ready count and its
nodes' READY agree, and says so when they do not (the operator writes the two in
separate writes, so a disagreement lasting longer than a probe interval is a bug).

Split as everywhere else: `summarise` and `render` are pure (tested alone);
`fetch` does the reads through the Kubernetes client. Read-only: it writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlxpool.nodes import gib, lease_renewal
from mlxpool.resources import (
    CACHE_KIND,
    CACHE_PLURAL,
    GROUP,
    NODE_KIND,
    NODE_LEASE_NAMESPACE,
    NODE_PLURAL,
    POOL_KIND,
    POOL_PLURAL,
    VERSION,
)

DEFAULT_EVENTS = 10
MAX_EVENTS = 1000
"""Events shown at most (`--events`); listing asks the API server for no more than this per kind."""


@dataclass(frozen=True)
class Snapshot:
    """The objects as read, plain dicts in their wire shape."""

    pools: list[dict[str, Any]]
    nodes: list[dict[str, Any]]
    caches: list[dict[str, Any]]
    leases: list[dict[str, Any]]
    events: list[dict[str, Any]]


@dataclass(frozen=True)
class PoolRow:
    namespace: str
    name: str
    ready: str
    status: str
    models: list[str]
    strategy: str
    revision: int | None
    nodes: list[str]
    """Nodes the pool counts as ready (healthy and serving all its models)."""
    message: str


@dataclass(frozen=True)
class NodeRow:
    name: str
    ready: str
    """The operator's verdict (the Ready condition), as `kubectl get inode` shows it."""
    agent_ready: bool
    """The agent's own word (status.ready)."""
    models: list[str]
    memory: str
    free: str
    heartbeat_age_seconds: float | None
    pools: list[str]
    version: str


@dataclass(frozen=True)
class CacheRow:
    namespace: str
    name: str
    model: str
    ready: str
    status: str


@dataclass(frozen=True)
class EventRow:
    age_seconds: float | None
    type: str
    reason: str
    object: str
    message: str
    count: int


@dataclass
class Summary:
    pools: list[PoolRow] = field(default_factory=list)
    nodes: list[NodeRow] = field(default_factory=list)
    caches: list[CacheRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    disagreements: list[str] = field(default_factory=list)
    """Where a pool's ready count and its nodes' READY say different things."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _condition(obj: Mapping[str, Any], kind: str = "Ready") -> Mapping[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return {}


def _time(raw: Any) -> datetime | None:
    if isinstance(raw, datetime):
        return raw if raw.tzinfo else raw.replace(tzinfo=UTC)
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(str(raw))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _age(moment: datetime | None, now: datetime) -> float | None:
    return None if moment is None else max(0.0, (now - moment).total_seconds())


def summarise(snapshot: Snapshot, now: datetime, events: int = DEFAULT_EVENTS) -> Summary:
    """The summary of `snapshot` at `now`, with the newest `events` Events."""
    summary = Summary()
    renewals: dict[str, datetime] = {}
    for lease in snapshot.leases:
        try:
            name, renewed = lease_renewal(lease)
        except ValueError:
            continue
        if renewed is not None:
            renewals[name] = renewed

    verdicts: dict[str, str] = {}
    member_of: dict[str, list[str]] = {}
    for pool in sorted(snapshot.pools, key=lambda p: (p["metadata"].get("namespace", ""), p["metadata"]["name"])):
        meta, spec, status = pool["metadata"], pool.get("spec") or {}, pool.get("status") or {}
        key = f"{meta.get('namespace', '')}/{meta['name']}"
        counted = [e["node"] for e in status.get("endpoints") or [] if e.get("healthy") and not e.get("pending")]
        for e in status.get("endpoints") or []:
            member_of.setdefault(e["node"], []).append(key)
        cond = _condition(pool)
        summary.pools.append(PoolRow(
            namespace=meta.get("namespace", ""), name=meta["name"],
            ready=status.get("readySummary") or f"0/{spec.get('replicas', 0)}",
            status=cond.get("status", "Unknown"),
            models=[m["name"] for m in spec.get("models") or []],
            strategy=(spec.get("routing") or {}).get("strategy", ""),
            revision=status.get("routingRevision"), nodes=counted,
            message="" if cond.get("status") == "True" else str(cond.get("message") or cond.get("reason") or ""),
        ))
        ready_count = status.get("readyReplicas")
        if ready_count is not None and ready_count != len(counted):
            summary.disagreements.append(
                f"pool {key} reports {ready_count} ready but lists {len(counted)} ready endpoints")

    for node in sorted(snapshot.nodes, key=lambda n: n["metadata"]["name"]):
        name, spec, status = node["metadata"]["name"], node.get("spec") or {}, node.get("status") or {}
        hardware = spec.get("hardware") or {}
        verdict = _condition(node).get("status", "Unknown")
        verdicts[name] = verdict
        heartbeat = max((t for t in (renewals.get(name), _time(status.get("heartbeatTime"))) if t is not None),
                        default=None)
        free = status.get("freeMemoryBytes")
        summary.nodes.append(NodeRow(
            name=name, ready=verdict, agent_ready=bool(status.get("ready")),
            models=[m["name"] for m in status.get("models") or []],
            memory=gib(hardware["memoryBytes"]) if "memoryBytes" in hardware else "",
            free=gib(free) if isinstance(free, int) else "",
            heartbeat_age_seconds=_age(heartbeat, now),
            pools=sorted(member_of.get(name, [])), version=status.get("agentVersion") or "",
        ))

    for row in summary.pools:
        for counted_node in row.nodes:
            if verdicts.get(counted_node) != "True":
                summary.disagreements.append(
                    f"pool {row.namespace}/{row.name} counts node {counted_node} ready, but the node's READY is "
                    f"{verdicts.get(counted_node, 'missing (no such InferenceNode)')}")
    for pool in snapshot.pools:
        key = f"{pool['metadata'].get('namespace', '')}/{pool['metadata']['name']}"
        for e in (pool.get("status") or {}).get("endpoints") or []:
            if not e.get("healthy") and verdicts.get(e["node"]) == "True":
                summary.disagreements.append(
                    f"pool {key} counts node {e['node']} unhealthy, but the node's READY is True")

    for cache in sorted(snapshot.caches, key=lambda c: (c["metadata"].get("namespace", ""), c["metadata"]["name"])):
        meta, status = cache["metadata"], cache.get("status") or {}
        summary.caches.append(CacheRow(
            namespace=meta.get("namespace", ""), name=meta["name"], model=(cache.get("spec") or {}).get("model", ""),
            ready=status.get("readySummary") or "", status=_condition(cache).get("status", "Unknown")))

    summary.events = _recent_events(snapshot.events, now, events)
    return summary


def _event_time(event: Mapping[str, Any]) -> datetime | None:
    for key in ("lastTimestamp", "eventTime", "firstTimestamp"):
        if (moment := _time(event.get(key))) is not None:
            return moment
    return _time((event.get("metadata") or {}).get("creationTimestamp"))


def _recent_events(events: Iterable[Mapping[str, Any]], now: datetime, limit: int) -> list[EventRow]:
    ours = [e for e in events if str((e.get("involvedObject") or {}).get("apiVersion", "")).startswith(GROUP + "/")]
    ours.sort(key=lambda e: _event_time(e) or datetime.min.replace(tzinfo=UTC))
    rows = []
    for e in ours[-limit:] if limit > 0 else []:
        obj = e.get("involvedObject") or {}
        where = f"{obj.get('namespace')}/" if obj.get("namespace") else ""
        rows.append(EventRow(
            age_seconds=_age(_event_time(e), now), type=e.get("type") or "", reason=e.get("reason") or "",
            object=f"{obj.get('kind', '?')}/{where}{obj.get('name', '?')}",
            message=" ".join(str(e.get("message") or "").split())[:200], count=int(e.get("count") or 1)))
    return rows


def age(seconds: float | None) -> str:
    """kubectl's short ages: 5s, 3m, 2h, 4d."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> list[str]:
    if not rows:
        return [f"{title}: {empty}"]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return [f"{title}:", "  " + fmt(header), *("  " + fmt(r) for r in rows)]


def render(summary: Summary) -> str:
    """The summary as text: one block per kind, then the Events, then any disagreement."""
    lines = _table("POOLS", ["NAMESPACE", "NAME", "READY", "STATUS", "MODELS", "STRATEGY", "REVISION", "NODES",
                             "MESSAGE"],
                   [[p.namespace, p.name, p.ready, p.status, ",".join(p.models) or "-", p.strategy or "-",
                     "-" if p.revision is None else str(p.revision), ",".join(p.nodes) or "-", p.message[:80]]
                    for p in summary.pools], "none")
    lines += ["", *_table(
        "NODES", ["NAME", "READY", "AGENT", "MODELS", "MEMORY", "FREE", "HEARTBEAT", "POOLS", "VERSION"],
        [[n.name, n.ready, "ready" if n.agent_ready else "not-ready", ",".join(n.models) or "-", n.memory or "-",
          n.free or "-", age(n.heartbeat_age_seconds), ",".join(n.pools) or "-", n.version or "-"]
         for n in summary.nodes], "none registered")]
    if summary.caches:
        lines += ["", *_table("CACHES", ["NAMESPACE", "NAME", "MODEL", "READY", "STATUS"],
                              [[c.namespace, c.name, c.model, c.ready or "-", c.status] for c in summary.caches], "")]
    lines += ["", *_table("EVENTS", ["AGE", "TYPE", "REASON", "OBJECT", "MESSAGE"],
                          [[age(e.age_seconds) + (f" (x{e.count})" if e.count > 1 else ""), e.type, e.reason,
                            e.object, e.message] for e in summary.events], "none")]
    if summary.disagreements:
        lines += ["", "DISAGREEMENTS (a pool's count and its nodes' READY differ):"]
        lines += [f"  {d}" for d in summary.disagreements]
    return "\n".join(lines)


async def fetch(kubeconfig: Path | None, namespace: str | None, events: int = DEFAULT_EVENTS,
                lease_namespace: str = NODE_LEASE_NAMESPACE) -> Snapshot:
    """Read the objects `summarise` needs. Leases and Events the caller may not read are left out."""
    from kubernetes_asyncio import client  # not at import time: `mlxpool --help` stays fast
    from kubernetes_asyncio.client.exceptions import ApiException

    from mlxpool.kubeclients import open_api_client

    api_client = await open_api_client(kubeconfig)
    try:
        custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)

        async def custom_list(plural: str) -> list[dict[str, Any]]:
            if namespace is None or plural == NODE_PLURAL:
                body = await custom.list_cluster_custom_object(GROUP, VERSION, plural)
            else:
                body = await custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
            return list(body.get("items") or [])

        async def optional(coro: Any) -> list[dict[str, Any]]:
            try:
                return [api_client.sanitize_for_serialization(item) for item in (await coro).items]
            except ApiException as exc:
                if exc.status in (403, 404):  # no right to read them, or no such namespace: show the rest
                    return []
                raise

        def event_list(kind: str) -> Any:
            selector = f"involvedObject.kind={kind}"
            limit = max(1, min(events, MAX_EVENTS)) * 4  # Events repeat per object; this is plenty
            if namespace is None or kind == NODE_KIND:
                return core.list_event_for_all_namespaces(field_selector=selector, limit=limit)
            return core.list_namespaced_event(namespace, field_selector=selector, limit=limit)

        pools, nodes, caches, leases, *event_lists = await asyncio.gather(
            custom_list(POOL_PLURAL), custom_list(NODE_PLURAL), custom_list(CACHE_PLURAL),
            optional(client.CoordinationV1Api(api_client).list_namespaced_lease(lease_namespace)),
            *(optional(event_list(kind)) for kind in (POOL_KIND, NODE_KIND, CACHE_KIND)),
        )
        return Snapshot(pools=pools, nodes=nodes, caches=caches, leases=leases,
                        events=[e for batch in event_lists for e in batch])
    finally:
        await api_client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxpool status", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="kubeconfig to use (default: in-cluster, then $KUBECONFIG / ~/.kube/config)")
    parser.add_argument("-n", "--namespace", default=None,
                        help="only the pools and caches of this namespace (default: every namespace)")
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS,
                        help=f"newest Events to show (0..{MAX_EVENTS}, default {DEFAULT_EVENTS})")
    parser.add_argument("--lease-namespace", default=NODE_LEASE_NAMESPACE,
                        help=f"where the node Leases are (default {NODE_LEASE_NAMESPACE})")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    if not 0 <= args.events <= MAX_EVENTS:
        parser.error(f"--events must be within 0..{MAX_EVENTS}, not {args.events}")
    try:
        snapshot = asyncio.run(fetch(args.kubeconfig, args.namespace, args.events, args.lease_namespace))
    except Exception as exc:  # a CLI: one readable line, not a traceback
        sys.stderr.write(f"mlxpool status: cannot read the cluster: {type(exc).__name__}: {exc}\n")
        return 1
    summary = summarise(snapshot, datetime.now(UTC), args.events)
    # Disagreements are printed, not an exit status: right after a change they last a probe interval.
    sys.stdout.write((summary.to_json() if args.output == "json" else render(summary)) + "\n")
    return 0
