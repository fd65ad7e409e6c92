"""The operator's services: built once at startup, shared by every handler, closed at cleanup.

One typed object instead of loose keys in kopf's memo: `handlers` keeps it in the
operator memo under one key (kopf copies the operator memo shallowly into every
resource's memo, so all handlers reach this same object) and reads typed fields from
it. It holds the settings, the API and HTTP clients, the fleet, the two reconcilers,
the node monitors, the daemons' shared runtimes, the usage scraper's task and the
metrics server, and the node-lease watch. Opening it seeds the fleet's claims from every pool's status before
any pool acts.

Kopf-agnostic like the rest of this folder: `handlers` opens and closes it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx
from kubernetes_asyncio.client.exceptions import ApiException

from mlxpool.kubeclients import open_api_client
from mlxpool.operator.config import OperatorConfig
from mlxpool.operator.io.agentclient import AgentClient
from mlxpool.operator.io.kube import KubeClient
from mlxpool.operator.io.leases import LeaseWatcher
from mlxpool.operator.io.metrics import MetricsServer
from mlxpool.operator.io.probing import Prober
from mlxpool.operator.io.scraping import UsageScraper
from mlxpool.operator.io.transports import PerHostTransport, agent_tls
from mlxpool.operator.logic.fleet import Fleet
from mlxpool.operator.reconcilers.caches import CacheReconciler
from mlxpool.operator.reconcilers.monitors import NodeMonitors
from mlxpool.operator.reconcilers.pools import PoolReconciler, pool_probe_interval, seed_fleet
from mlxpool.operator.reconcilers.runtimes import Runtimes

log = logging.getLogger(__name__)

LEASE_SYNC_TIMEOUT_S = 15.0
AGENT_KEEPALIVE_S = 60.0
"""Seconds an idle connection to an agent is kept: below the agents' own 75 s, so the
operator drops an idle connection before the agent does and never sends a probe into one
the agent is closing at that moment (a spurious failed probe)."""


@dataclass(frozen=True)
class OperatorServices:
    config: OperatorConfig
    kube: KubeClient
    http: httpx.AsyncClient
    """Shared by the probes, the operations calls and the scrapes."""
    watch_http: httpx.AsyncClient
    """The agents' health watches: one long-lived connection each, no pool limit."""
    fleet: Fleet
    pool_reconciler: PoolReconciler
    cache_reconciler: CacheReconciler
    monitors: NodeMonitors
    runtimes: Runtimes
    scraper: asyncio.Task[None]
    leases: asyncio.Task[None]
    """Follows the agents' node Leases into the fleet's views (their heartbeats)."""
    metrics: MetricsServer | None
    """None without `--metrics-port`."""

    @classmethod
    async def open(cls, config: OperatorConfig) -> OperatorServices:
        api_client = await open_api_client(config.kubeconfig)
        kube = KubeClient(api_client)
        # Many agents, probed every second: keep their connections open.
        # A small pool per agent: one pool for the whole fleet costs O(connections) per
        # request in httpcore, which starved the event loop at 100 agents (io.transports).
        # One TLS context for both clients (`--agent-ca-file`, else the system's store).
        tls = agent_tls(config.agent_ca_file)
        # Kept alive for AGENT_KEEPALIVE_S: a watched agent is probed every nodes / 50 s (20 s at
        # 1,000 nodes) and reported on every nodes / 20 s; with httpx's 5 s expiry every probe
        # connected afresh (py-spy at 1,000 agents: ~25% of the operator's CPU in TCP connects).
        http = httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                 transport=PerHostTransport(verify=tls, keepalive_expiry=AGENT_KEEPALIVE_S))
        watch_http = httpx.AsyncClient(trust_env=False, follow_redirects=False, transport=PerHostTransport(
            max_connections=None, max_keepalive_connections=0, verify=tls))
        fleet = Fleet(retry_after=config.load_retry_after, owner=config.owner)
        agents = AgentClient(http, config.agent_token, config.agent_timeout, owner=config.owner)
        pool_reconciler = PoolReconciler(kube, agents, fleet, config.node_stale_after)
        cache_reconciler = CacheReconciler(kube, agents, fleet, config.node_stale_after)
        monitors = NodeMonitors(
            fleet, Prober(http, config.probe_timeout, max_in_flight=config.max_probes_in_flight,
                          watch_client=watch_http if config.watch_interval > 0 else None,
                          watch_interval=config.watch_interval or 10.0),
            agents, kube, default_interval=1.0, override_interval=config.probe_interval,
            report_interval=config.report_interval, stale_after=config.node_stale_after,
            orphan_grace=config.orphan_grace, probes_per_second=config.probes_per_second,
            reports_per_second=config.reports_per_second, write_conditions=config.node_conditions)
        runtimes = Runtimes()
        fleet.observed.subscribe(runtimes.node_changed)
        watcher = LeaseWatcher(api_client, config.lease_namespace, fleet.observed.renew)
        leases = asyncio.create_task(watcher.run(), name="node-leases")
        # Agents write their status only on change: until the leases are in, every node's
        # heartbeat looks stale and a pool would route to none. Wait for the first list.
        try:
            await asyncio.wait_for(watcher.synced.wait(), LEASE_SYNC_TIMEOUT_S)
        except TimeoutError:
            log.warning("node leases not listed within %gs namespace=%s: nodes whose agents write no status "
                        "look stale until they are", LEASE_SYNC_TIMEOUT_S, config.lease_namespace)
        await _seed(kube, fleet, config)
        scraper = asyncio.create_task(UsageScraper(fleet, agents, config.scrape_interval).run(), name="scraper")
        server = None
        if config.metrics_port is not None:
            server = MetricsServer(config.metrics_port, config.metrics_address)
        return cls(config=config, kube=kube, http=http, watch_http=watch_http,
                   fleet=fleet, pool_reconciler=pool_reconciler,
                   cache_reconciler=cache_reconciler, monitors=monitors, runtimes=runtimes, scraper=scraper,
                   leases=leases,
                   metrics=server)

    async def close(self) -> None:
        """Stop the scraper and the monitors, then close the clients and the metrics server."""
        for task in (self.scraper, self.leases):
            task.cancel()
        await asyncio.gather(self.scraper, self.leases, return_exceptions=True)
        await self.monitors.close()
        await self.kube.close()
        await self.http.aclose()
        await self.watch_http.aclose()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)  # joins a thread: not on the event loop


async def _seed(kube: KubeClient, fleet: Fleet, config: OperatorConfig) -> None:
    """Every pool's claims from its status, before any pool acts: a pool that moved away
    from a node must not unload a model another pool (not reconciled yet) still uses."""
    try:
        pools = await kube.list_pools(config.namespaces, config.pool_selector)
    except ApiException as exc:
        log.warning("cannot list pools to seed the fleet, unloads may be premature and orphans stay: %s",
                    exc.reason)
        return
    for body in pools:
        meta = body["metadata"]
        seed_fleet(fleet, (meta["namespace"], meta["name"]), body, pool_probe_interval(body, config))
    fleet.claims.seeded = True
    log.info("fleet seeded pools=%d", len(pools))
