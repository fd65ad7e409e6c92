"""Settings of the operator process, filled from the command line by `main`.

Grouped in one frozen dataclass handed to the kopf handlers through the operator's
memo (`handlers.operator_memo`), then kept in the operator's services. Pool-level
settings (probe interval, strategy) live in each pool's spec instead; what is here
applies to every pool this process reconciles.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from mlxpool.resources import NODE_LEASE_NAMESPACE

OWNER_PREFIX = "mlxpool-operator"
PEERING_PREFIX = "mlxpool-"


@dataclass(frozen=True)
class OperatorConfig:
    kubeconfig: Path | None = None
    """Kubeconfig to use; None means in-cluster config, else $KUBECONFIG or ~/.kube/config."""

    namespaces: tuple[str, ...] = ()
    """Namespaces whose pools to reconcile; empty means every namespace."""

    pool_selector: str | None = None
    """This replica's shard: a label selector on InferencePools (and ModelCaches), e.g.
    `mlxpool.dev/shard=a`; the API server filters, so other shards' pools are never seen.
    None: every pool of `namespaces`. Checked by `logic.shards.parse_selector`."""

    shard: str | None = None
    """The shard's name: replicas of one shard peer through kopf's peering object
    `mlxpool-<shard>` (one active, the others paused); None: standalone, no peering."""

    priority: int = 0
    """kopf peering priority within the shard: the highest active replica works."""

    node_conditions: bool = True
    """Whether to write InferenceNodes' Ready condition. Nodes are cluster-wide: every shard
    probes every node it may place on; writes are on change only, so two shards agreeing
    write once, and a shard may leave them to another (`--no-node-conditions`)."""

    probe_interval: float | None = None
    """Seconds between probes of every pool, overriding spec.healthCheck.intervalSeconds.

    None (the default) follows each pool's spec. Fractions are allowed (tests, benchmarks).
    """

    probe_timeout: float = 1.0
    """Seconds an endpoint has to answer `GET /health` before it counts as failed (0.5 s
    timed healthy agents out on a loaded 2-core machine running 1,000 simulated agents;
    a killed agent refuses at once, so failover does not wait on it)."""

    probes_per_second: float = 50.0
    """Budget of periodic probes for the whole fleet: an agent whose health watch is open is
    probed every `nodes / probes_per_second` seconds (at least every probe interval).
    Suspect nodes (watch ended, lease late) and failing ones are probed at once regardless."""

    max_probes_in_flight: int = 64
    """Probes outstanding at once; more wait their turn (a burst of suspicions, a restart)."""

    watch_interval: float = 10.0
    """Seconds between the lines of an agent's health watch (`GET /health/watch`); it counts
    as ended after 2.5 of them in silence. 0 turns watches off: every agent is then probed
    every probe interval. (The mass silences of the first fleet runs were the operator's
    event loop starved by one shared HTTP connection pool: `io.transports`.)"""

    reports_per_second: float = 20.0
    """Budget of periodic `GET /v1/node` reports for the whole fleet (at least every
    `report_interval` per agent; every tick while a load or staging is under way there)."""

    node_stale_after: float = 40.0
    """Seconds without a heartbeat (node Lease renewal, or the status's `heartbeatTime`)
    after which the node is not routed to.

    Agents renew every 10 s; this tolerates three lost renewals (kubelet's Lease lasts
    40 s too). The probe is what reacts fast to a dead agent; staleness catches an agent
    that answers but lost the API server.
    """

    lease_namespace: str = NODE_LEASE_NAMESPACE
    """Namespace of the agents' node Leases (`mlxpool.resources.NODE_LEASE_NAMESPACE`)."""

    metrics_port: int | None = None
    """Port of the Prometheus `/metrics` endpoint; 0 picks a free one; None disables it."""

    metrics_address: str = "127.0.0.1"
    """Address the metrics endpoint binds to (the Deployment sets 0.0.0.0)."""

    liveness_endpoint: str | None = None
    """kopf's liveness endpoint, e.g. `http://0.0.0.0:8081/healthz`; None disables it."""

    agent_token: str | None = field(default=None, repr=False)
    """Bearer token for the agents' operations API (`--agent-token-file` or
    $MLXPOOL_AGENT_TOKEN). Without it the operator routes to what agents already serve
    but cannot load models or stage caches (agents answer 401/403)."""

    agent_ca_file: Path | None = None
    """CA bundle (PEM) that agents' HTTPS certificates are verified with, for the probes,
    health watches, operations calls and scrapes (`--agent-ca-file`); None: the system's
    trust store. Agents serve HTTPS with `auth.tls_cert_file`/`tls_key_file`."""

    agent_timeout: float = 5.0
    """Seconds an agent has to answer an operations call."""

    report_interval: float = 5.0
    """Seconds between `GET /v1/node` reports of an agent (every probe while it loads or stages)."""

    scrape_interval: float = 5.0
    """Seconds between scrapes of the placed agents' /metrics for the per-pool load gauges."""

    load_retry_after: float = 30.0
    """Seconds a failed load keeps pools away from that node and model before a retry."""

    resync_interval: float = 10.0
    """Seconds between passes of a pool or cache when nothing woke it (changes wake it at once)."""

    orphan_grace: float = 30.0
    """Seconds a model this operator loaded must stay claimed by no pool before it is unloaded
    (an unload lost to a restart, a pool deleted while the operator was down)."""

    @property
    def peering_name(self) -> str | None:
        """kopf's peering object for the shard's replicas (None: standalone)."""
        return None if self.shard is None else f"{PEERING_PREFIX}{self.shard}"

    @property
    def owner(self) -> str:
        """Who this operator is on the agents (`LoadModelRequest.owner`): its namespace scope is
        part of it (namespaces and pool selector), so operators of different shards never clean up
        each other's loads."""
        scope = ",".join(sorted(self.namespaces))
        if self.pool_selector is not None:  # shards of one namespace set must differ too
            scope = f"{scope}[{self.pool_selector}]"
        if not scope:
            return OWNER_PREFIX
        scoped = f"{OWNER_PREFIX}:{scope}"
        if len(scoped) <= 253:
            return scoped
        return f"{OWNER_PREFIX}:{hashlib.sha256(scoped.encode()).hexdigest()[:32]}"
