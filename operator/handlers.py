"""The kopf wiring: settings, clients, the fleet, node monitors, and one daemon per pool
and per model cache.

Each InferencePool and each ModelCache gets a daemon that runs its reconciler now and
again whenever something relevant changes, or at the latest every resync interval
(every probe interval while it is still converging). Wake-ups come from: a spec change
(generation ahead of observedGeneration), an InferenceNode change that matters for
placement (not mere heartbeats), a node monitor's news (a probe result or an agent
report changed), a ModelCache change, or a deleted routing-table ConfigMap. There are
no kopf change handlers on purpose: they would cost annotation writes per change, and
the daemons converge from any state. Deletion runs through kopf's finalizer: a pool
releases its nodes (unloading what no other pool needs), a cache removes its copies.

Nothing here decides anything; it only connects kopf to the reconcilers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import httpx
import kopf
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from mlxpool.kubeclients import open_api_client
from mlxpool.operator.config import OperatorConfig
from mlxpool.operator.io import metrics
from mlxpool.operator.io.agentclient import AgentClient
from mlxpool.operator.io.kube import KubeClient
from mlxpool.operator.io.probing import Prober
from mlxpool.operator.io.scraping import UsageScraper
from mlxpool.operator.logic.fleet import Fleet
from mlxpool.operator.logic.placement import NodeView
from mlxpool.operator.logic.sources import CacheRef
from mlxpool.operator.logic.specs import PoolSpec
from mlxpool.operator.reconcilers.caches import CacheReconciler, CacheState
from mlxpool.operator.reconcilers.monitors import NodeMonitors
from mlxpool.operator.reconcilers.pools import PoolReconciler, PoolState, seed_fleet
from mlxpool.operator.reconcilers.runtimes import CacheRuntime, PoolRuntime, Runtimes
from mlxpool.resources import CACHE_PLURAL, FINALIZER, GROUP, LABEL_POOL, NODE_PLURAL, POOL_PLURAL, VERSION

log = logging.getLogger(__name__)

TRANSIENT_ERRORS = (ApiException, aiohttp.ClientError, asyncio.TimeoutError, ValidationError)
"""Errors a pass logs and retries at the next tick (API hiccups, a spec the CRD let through)."""


class KopfEvents:
    """Kubernetes Events on an object, posted by kopf's background poster."""

    def __init__(self, body: kopf.Body) -> None:
        self._body = body

    def info(self, reason: str, message: str) -> None:
        kopf.info(self._body, reason=reason, message=message)

    def warn(self, reason: str, message: str) -> None:
        kopf.warn(self._body, reason=reason, message=message)


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings for this operator (see notes/local-control-plane.md for the why)."""
    settings.peering.standalone = True  # one replica, Recreate: no peering objects needed
    settings.persistence.finalizer = FINALIZER
    # Our status schema is strict: keep kopf's own bookkeeping in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.reporting_component = "mlxpool-operator"
    # Watches end server-side regularly and are restarted; a silent stream is dropped.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    # Only our routing-table ConfigMaps are of interest: filter them on the server.
    settings.watching.label_selectors["v1", "configmaps"] = LABEL_POOL


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config: OperatorConfig = memo.config
    configure(settings)
    memo.kube = KubeClient(await open_api_client(config.kubeconfig))
    # Many agents, probed every second: keep their connections open.
    memo.http = httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                  limits=httpx.Limits(max_connections=512, max_keepalive_connections=256))
    memo.fleet = fleet = Fleet(retry_after=config.load_retry_after, owner=config.owner)
    agents = AgentClient(memo.http, config.agent_token, config.agent_timeout, owner=config.owner)
    memo.reconciler = PoolReconciler(memo.kube, agents, fleet, config.node_stale_after)
    memo.cache_reconciler = CacheReconciler(memo.kube, agents, fleet, config.node_stale_after)
    memo.monitors = NodeMonitors(
        fleet, Prober(memo.http, config.probe_timeout), agents, memo.kube, default_interval=1.0,
        override_interval=config.probe_interval, report_interval=config.report_interval,
        stale_after=config.node_stale_after, orphan_grace=config.orphan_grace)
    memo.runtimes = runtimes = Runtimes()
    fleet.subscribe(runtimes.node_changed)
    await _seed(memo.kube, fleet, config)
    memo.scraper = asyncio.create_task(UsageScraper(fleet, agents, config.scrape_interval).run(), name="scraper")
    memo.metrics = None
    if config.metrics_port is not None:
        memo.metrics = metrics.MetricsServer(config.metrics_port, config.metrics_address)
    if config.agent_token is None:
        log.warning("no agent token (--agent-token-file or $MLXPOOL_AGENT_TOKEN): agents will refuse "
                    "load, unload and staging calls")
    # The one "ready" line the dev stack and the tests wait for (url: the metrics endpoint).
    log.info("operator ready%s namespaces=%s probe_interval=%s stale_after=%ss",
             f" url={memo.metrics.url}" if memo.metrics else "", ",".join(config.namespaces) or "*",
             config.probe_interval or "per-pool", config.node_stale_after)


async def _seed(kube: KubeClient, fleet: Fleet, config: OperatorConfig) -> None:
    """Every pool's claims from its status, before any pool acts: a pool that moved away
    from a node must not unload a model another pool (not reconciled yet) still uses."""
    try:
        pools = await kube.list_pools(config.namespaces)
    except ApiException as exc:
        log.warning("cannot list pools to seed the fleet, unloads may be premature and orphans stay: %s",
                    exc.reason)
        return
    for body in pools:
        meta = body["metadata"]
        seed_fleet(fleet, (meta["namespace"], meta["name"]), body, probe_interval(body, config))
    fleet.seeded = True
    log.info("fleet seeded pools=%d", len(pools))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    memo.scraper.cancel()
    await asyncio.gather(memo.scraper, return_exceptions=True)
    await memo.monitors.close()
    await memo.kube.close()
    await memo.http.aclose()
    if memo.metrics is not None:
        await asyncio.to_thread(memo.metrics.close)  # joins a thread: not on the event loop


@kopf.index(GROUP, VERSION, NODE_PLURAL)
def inference_nodes(name: str, body: kopf.Body, **_: Any) -> dict[str, NodeView]:
    """Every InferenceNode by name. Daemons take this index as an argument only because kopf
    then starts them after it is fully populated: a restarted operator must not place a
    pool before it has heard of every node. The fleet is the working copy."""
    try:
        return {name: NodeView.from_body(body)}
    except ValueError as exc:
        raise kopf.PermanentError(str(exc)) from exc  # dropped from the index, logged once


def _adopt(memo: kopf.Memo, index: kopf.Index) -> None:
    """Nodes the index knows and the fleet does not yet (events still in flight)."""
    for store in index.values():
        for view in store:
            if view.name not in memo.fleet.views:
                memo.fleet.set_view(view)
                memo.monitors.ensure(view.name)


@kopf.on.event(GROUP, VERSION, NODE_PLURAL)
async def node_changed(type: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Keep the fleet's view of the node, its monitor running, and wake what it concerns."""
    fleet: Fleet = memo.fleet
    runtimes: Runtimes = memo.runtimes
    if type == "DELETED":
        fleet.drop_view(name)
        await memo.monitors.stop(name)
        runtimes.node_changed(name)
        return
    try:
        view = NodeView.from_body(body)
    except ValueError as exc:
        if name in fleet.views:
            log.warning("%s; not used until fixed", exc)
            fleet.drop_view(name)
            await memo.monitors.stop(name)
            runtimes.node_changed(name)
        return
    if fleet.set_view(view):
        runtimes.node_changed(name)
    memo.monitors.ensure(name)


@kopf.on.event(GROUP, VERSION, POOL_PLURAL)
async def pool_changed(name: str, namespace: str, meta: kopf.Meta, status: kopf.Status, memo: kopf.Memo,
                       **_: Any) -> None:
    """Wake a pool's daemon when its spec changed (kopf already updated its live body)."""
    if meta.get("generation") != status.get("observedGeneration"):
        memo.runtimes.wake(namespace, name)


@kopf.on.event(GROUP, VERSION, CACHE_PLURAL)
async def cache_changed(type: str | None, name: str, namespace: str, body: kopf.Body, memo: kopf.Memo,
                        **_: Any) -> None:
    """Keep the registry pools resolve models with; wake the namespace's pools on a change.
    A cache being deleted is dropped at once: no new load may use a copy on its way out."""
    runtimes: Runtimes = memo.runtimes
    key = (namespace, name)
    ref = None
    if type != "DELETED" and not body.get("metadata", {}).get("deletionTimestamp"):
        try:
            ref = CacheRef.from_body(body)
        except (ValidationError, KeyError) as exc:
            log.warning("ModelCache %s/%s unreadable: %s", namespace, name, exc)
    if runtimes.cache_refs.get(key) != ref:
        if ref is None:
            runtimes.cache_refs.pop(key, None)
        else:
            runtimes.cache_refs[key] = ref
        runtimes.wake_namespace(namespace)
    if (runtime := runtimes.caches.get(key)) is not None and \
            body.get("metadata", {}).get("generation") != (body.get("status") or {}).get("observedGeneration"):
        runtime.woken.set()


@kopf.on.event("v1", "configmaps", labels={LABEL_POOL: kopf.PRESENT})
async def routes_changed(type: str | None, namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    """A deleted routing table is written again at once."""
    if type == "DELETED":
        pool = labels[LABEL_POOL]
        if (runtime := memo.runtimes.pools.get((namespace, pool))) is not None:
            runtime.state.forget_table()
            runtime.woken.set()


@kopf.daemon(GROUP, VERSION, POOL_PLURAL, id="reconcile", backoff=2.0,
             cancellation_backoff=2.0, cancellation_timeout=5.0)  # finish the pass, else cancel
async def reconcile_pool(
    name: str, namespace: str, body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
    logger: logging.Logger, inference_nodes: kopf.Index, **_: Any,
) -> None:
    """Reconcile the pool now, on every wake-up, and at least every resync interval."""
    _adopt(memo, inference_nodes)
    config: OperatorConfig = memo.config
    runtimes: Runtimes = memo.runtimes
    runtime = runtimes.pools[namespace, name] = PoolRuntime(state=PoolState.from_status(body.get("status")))
    events = KopfEvents(body)
    try:
        while not stopped:
            interval = probe_interval(body, config)
            try:
                result = await memo.reconciler.reconcile(body, runtimes.caches_by_model(namespace), runtime.state,
                                                         events, interval)
                runtime.interest, runtime.settled = result.interest, result.settled
                runtime.holds = frozenset(e.node for e in result.endpoints)
                runtime.seen = frozenset(memo.fleet.views)
            except TRANSIENT_ERRORS as exc:
                metrics.RECONCILES.labels("error").inc()
                runtime.settled = False
                logger.warning("reconcile failed, retrying next tick: %s", _describe(exc))
            await runtime.nap(config.resync_interval if runtime.settled else interval, stopped)
    finally:
        if runtimes.pools.get((namespace, name)) is runtime:
            del runtimes.pools[namespace, name]
        metrics.forget_pool(namespace, name)


@kopf.on.delete(GROUP, VERSION, POOL_PLURAL, id="release")
async def release_pool(name: str, namespace: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The pool is going: give up its nodes and unload what no other pool needs there."""
    await _daemon_gone(memo.runtimes.pools, (namespace, name))
    pairs = memo.fleet.release((namespace, name))
    await memo.reconciler.unload(pairs, KopfEvents(body))


@kopf.daemon(GROUP, VERSION, CACHE_PLURAL, id="stage", backoff=2.0,
             cancellation_backoff=2.0, cancellation_timeout=5.0)
async def reconcile_cache(
    name: str, namespace: str, body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
    logger: logging.Logger, inference_nodes: kopf.Index, **_: Any,
) -> None:
    """Stage the cache on its nodes and follow their progress until it is deleted."""
    _adopt(memo, inference_nodes)
    config: OperatorConfig = memo.config
    runtimes: Runtimes = memo.runtimes
    runtime = runtimes.caches[namespace, name] = CacheRuntime(state=CacheState.from_status(body.get("status")))
    events = KopfEvents(body)
    fast = config.probe_interval or 1.0
    try:
        while not stopped:
            try:
                result = await memo.cache_reconciler.reconcile(body, runtime.state, events)
                runtime.settled, runtime.interest = result.done, result.interest
                runtime.holds = frozenset(n["node"] for n in result.status.get("nodes") or [])
                runtime.seen = frozenset(memo.fleet.views)
            except TRANSIENT_ERRORS as exc:
                metrics.CACHE_RECONCILES.labels("error").inc()
                runtime.settled = False
                logger.warning("cache reconcile failed, retrying next tick: %s", _describe(exc))
            await runtime.nap(config.resync_interval if runtime.settled else fast, stopped)
    finally:
        if runtimes.caches.get((namespace, name)) is runtime:
            del runtimes.caches[namespace, name]


@kopf.on.delete(GROUP, VERSION, CACHE_PLURAL, id="cleanup")
async def cleanup_cache(name: str, namespace: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Remove the copies; retried while an agent that is still alive holds one it cannot drop."""
    await _daemon_gone(memo.runtimes.caches, (namespace, name))
    pending = await memo.cache_reconciler.cleanup(body, KopfEvents(body))
    if pending:
        raise kopf.TemporaryError(f"copies still to remove on: {', '.join(pending)}", delay=2)


async def _daemon_gone(running: Mapping, key: tuple[str, str], timeout: float = 10.0) -> None:
    """Wait for the object's daemon to finish its last pass (kopf stops it in parallel)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while key in running and loop.time() < deadline:
        await asyncio.sleep(0.05)


def probe_interval(body: Mapping, config: OperatorConfig) -> float:
    if config.probe_interval is not None:
        return config.probe_interval
    try:
        return float(PoolSpec.from_body(body).health_check.interval_seconds)
    except ValidationError:
        return 1.0


def _describe(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"API {exc.status} {exc.reason}: {(exc.body or '')[:300]!s}"
    return f"{type(exc).__name__}: {exc}"
