"""The kopf wiring: settings, the operator's services, node monitors, and one daemon per
pool and per model cache.

Each InferencePool and each ModelCache gets a daemon that runs its reconciler now and
again whenever something relevant changes, or at the latest every resync interval
(every probe interval while it is still converging). Wake-ups come from: a spec change
(generation ahead of observedGeneration), an InferenceNode change that matters for
placement (not mere heartbeats), a node monitor's news (a probe result or an agent
report changed), a ModelCache change, or a deleted routing-table ConfigMap. There are
no kopf change handlers on purpose: they would cost annotation writes per change, and
the daemons converge from any state. Deletion runs through kopf's finalizer: a pool
releases its nodes (unloading what no other pool needs), a cache removes its copies.

The services (clients, fleet, reconcilers, monitors, runtimes: `OperatorServices`) are
opened at startup and kept in kopf's operator memo under one key, next to the settings
`main` put there; handlers read both through typed accessors, never loose memo keys.

Nothing here decides anything; it only connects kopf to the reconcilers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from mlxpool.operator.config import OperatorConfig
from mlxpool.operator.io import metrics
from mlxpool.operator.logic.placement import NodeView
from mlxpool.operator.logic.sources import CacheRef
from mlxpool.operator.reconcilers.caches import CacheState
from mlxpool.operator.reconcilers.pools import PoolState, pool_probe_interval
from mlxpool.operator.reconcilers.runtimes import CacheRuntime, PoolRuntime, Runtime
from mlxpool.operator.reconcilers.services import OperatorServices
from mlxpool.resources import CACHE_PLURAL, FINALIZER, GROUP, LABEL_POOL, NODE_PLURAL, POOL_PLURAL, VERSION

log = logging.getLogger(__name__)

TRANSIENT_ERRORS = (ApiException, aiohttp.ClientError, asyncio.TimeoutError, ValidationError)
"""Errors a pass logs and retries at the next tick (API hiccups, a spec the CRD let through)."""

CONFIG, SERVICES = "config", "services"
"""The operator memo's only keys: the settings (from `main`) and the services (from `start`)."""


def operator_memo(config: OperatorConfig) -> kopf.Memo:
    """The operator memo `main` hands to kopf; `start` adds the services to it."""
    return kopf.Memo({CONFIG: config})


def _config(memo: kopf.Memo) -> OperatorConfig:
    config = memo.get(CONFIG)
    if not isinstance(config, OperatorConfig):
        raise RuntimeError("the operator memo holds no settings (start the operator through `main`)")
    return config


def _services(memo: kopf.Memo) -> OperatorServices:
    """The services `start` opened (kopf copies the operator memo into every resource's)."""
    services = memo.get(SERVICES)
    if not isinstance(services, OperatorServices):
        raise RuntimeError("the operator's services are not open (startup did not finish)")
    return services


def _namespace(namespace: str | None) -> str:
    """InferencePools and ModelCaches are namespaced: kopf always gives their namespace."""
    if namespace is None:
        raise kopf.PermanentError("a namespaced object without a namespace")
    return namespace


class KopfEvents:
    """Kubernetes Events on an object, posted by kopf's background poster."""

    def __init__(self, body: kopf.Body) -> None:
        self._body = body

    def info(self, reason: str, message: str) -> None:
        kopf.info(self._body, reason=reason, message=message)

    def warn(self, reason: str, message: str) -> None:
        kopf.warn(self._body, reason=reason, message=message)


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """kopf settings for this operator (see notes/local-control-plane.md for the why)."""
    # Without a shard: one replica, Recreate, no peering objects needed. With one, its
    # replicas peer through the shard's own object, so one works and the others wait.
    settings.peering.standalone = config.peering_name is None
    if config.peering_name is not None:
        settings.peering.name, settings.peering.mandatory = config.peering_name, True
        settings.peering.priority = config.priority
    if config.pool_selector is not None:
        # The shard's pools (and caches) only, filtered by the API server: another shard's
        # objects are never heard of, so never acted on.
        for plural in (POOL_PLURAL, CACHE_PLURAL):
            settings.watching.label_selectors[GROUP, plural] = config.pool_selector
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
    config = _config(memo)
    configure(settings, config)
    services = memo[SERVICES] = await OperatorServices.open(config)
    if config.agent_token is None:
        log.warning("no agent token (--agent-token-file or $MLXPOOL_AGENT_TOKEN): agents will refuse "
                    "load, unload and staging calls")
    # The one "ready" line the dev stack and the tests wait for (url: the metrics endpoint).
    log.info("operator ready%s namespaces=%s probe_interval=%s stale_after=%ss",
             f" url={services.metrics.url}" if services.metrics else "", ",".join(config.namespaces) or "*",
             config.probe_interval or "per-pool", config.node_stale_after)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    await _services(memo).close()


@kopf.index(GROUP, VERSION, NODE_PLURAL)
def inference_nodes(name: str, body: kopf.Body, **_: Any) -> dict[str, NodeView]:
    """Every InferenceNode by name. Daemons take this index as an argument only because kopf
    then starts them after it is fully populated: a restarted operator must not place a
    pool before it has heard of every node. The fleet is the working copy."""
    try:
        return {name: NodeView.from_body(body)}
    except ValueError as exc:
        raise kopf.PermanentError(str(exc)) from exc  # dropped from the index, logged once


def _adopt(services: OperatorServices, index: kopf.Index[str, NodeView] | None) -> None:
    """Nodes the index knows and the fleet does not yet (events still in flight). kopf passes
    every index to every handler by name; None only where a caller has none."""
    observed = services.fleet.observed
    for store in (index or {}).values():
        for view in store:
            if view.name not in observed.views:
                observed.set_view(view)
                services.monitors.ensure(view.name)


@kopf.on.event(GROUP, VERSION, NODE_PLURAL)
async def node_changed(type: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Keep the fleet's view of the node, its monitor running, and wake what it concerns."""
    services = _services(memo)
    fleet, runtimes = services.fleet, services.runtimes
    if type == "DELETED":
        fleet.drop_view(name)
        await services.monitors.stop(name)
        runtimes.node_changed(name)
        return
    try:
        view = NodeView.from_body(body)
    except ValueError as exc:
        if name in fleet.observed.views:
            log.warning("%s; not used until fixed", exc)
            fleet.drop_view(name)
            await services.monitors.stop(name)
            runtimes.node_changed(name)
        return
    before = fleet.observed.views.get(name)
    if fleet.observed.set_view(view):
        runtimes.node_changed(name)
    elif before is not None and before.residency != view.residency:
        runtimes.residency_changed(name)  # only the caches holding a copy there say where the weights are
    services.monitors.ensure(name)


@kopf.on.event(GROUP, VERSION, POOL_PLURAL)
async def pool_changed(name: str, namespace: str | None, meta: kopf.Meta, status: kopf.Status, memo: kopf.Memo,
                       **_: Any) -> None:
    """Wake a pool's daemon when its spec changed (kopf already updated its live body)."""
    if meta.get("generation") != status.get("observedGeneration"):
        _services(memo).runtimes.wake(_namespace(namespace), name)


@kopf.on.event(GROUP, VERSION, CACHE_PLURAL)
async def cache_changed(type: str | None, name: str, namespace: str | None, body: kopf.Body, memo: kopf.Memo,
                        **_: Any) -> None:
    """Keep the registry pools resolve models with; wake the namespace's pools on a change.
    A cache being deleted is dropped at once: no new load may use a copy on its way out."""
    runtimes = _services(memo).runtimes
    namespace = _namespace(namespace)
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
async def routes_changed(type: str | None, namespace: str | None, labels: kopf.Labels, memo: kopf.Memo,
                         **_: Any) -> None:
    """A deleted routing table is written again at once."""
    if type == "DELETED":
        pool = labels[LABEL_POOL]
        if (runtime := _services(memo).runtimes.pools.get((_namespace(namespace), pool))) is not None:
            runtime.state.forget_table()
            runtime.woken.set()


@kopf.daemon(GROUP, VERSION, POOL_PLURAL, id="reconcile", backoff=2.0,
             cancellation_backoff=2.0, cancellation_timeout=5.0)  # finish the pass, else cancel
async def reconcile_pool(
    name: str, namespace: str | None, body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
    logger: kopf.Logger, inference_nodes: kopf.Index[str, NodeView] | None = None, **_: Any,
) -> None:
    """Reconcile the pool now, on every wake-up, and at least every resync interval."""
    services = _services(memo)
    _adopt(services, inference_nodes)
    config, runtimes = services.config, services.runtimes
    key = (_namespace(namespace), name)
    runtime = runtimes.pools[key] = PoolRuntime(state=PoolState.from_status(body.get("status")))
    events = KopfEvents(body)
    try:
        while not stopped:
            interval = pool_probe_interval(body, config)
            try:
                result = await services.pool_reconciler.reconcile(body, runtimes.caches_by_model(key[0]),
                                                                  runtime.state, events, interval)
                runtime.interest, runtime.settled = result.interest, result.settled
                runtime.holds = frozenset(e.node for e in result.endpoints)
                runtime.seen = frozenset(services.fleet.observed.views)
            except TRANSIENT_ERRORS as exc:
                metrics.RECONCILES.labels("error").inc()
                runtime.settled = False
                logger.warning("reconcile failed, retrying next tick: %s", _describe(exc))
            await runtime.nap(config.resync_interval if runtime.settled else interval, stopped)
    finally:
        if runtimes.pools.get(key) is runtime:
            del runtimes.pools[key]
        runtime.ended.set()
        metrics.forget_pool(*key)


@kopf.on.delete(GROUP, VERSION, POOL_PLURAL, id="release")
async def release_pool(name: str, namespace: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The pool is going: give up its nodes and unload what no other pool needs there."""
    services = _services(memo)
    key = (_namespace(namespace), name)
    await _daemon_gone(services.runtimes.pools, key)
    pairs = services.fleet.claims.release(key)
    services.pool_reconciler.forget(key)
    await services.pool_reconciler.unload(pairs, KopfEvents(body))


@kopf.daemon(GROUP, VERSION, CACHE_PLURAL, id="stage", backoff=2.0,
             cancellation_backoff=2.0, cancellation_timeout=5.0)
async def reconcile_cache(
    name: str, namespace: str | None, body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
    logger: kopf.Logger, inference_nodes: kopf.Index[str, NodeView] | None = None, **_: Any,
) -> None:
    """Stage the cache on its nodes and follow their progress until it is deleted."""
    services = _services(memo)
    _adopt(services, inference_nodes)
    config, runtimes = services.config, services.runtimes
    key = (_namespace(namespace), name)
    runtime = runtimes.caches[key] = CacheRuntime(state=CacheState.from_status(body.get("status")))
    events = KopfEvents(body)
    fast = config.probe_interval or 1.0
    try:
        while not stopped:
            try:
                result = await services.cache_reconciler.reconcile(body, runtime.state, events)
                runtime.settled, runtime.interest = result.done, result.interest
                runtime.holds = frozenset(n["node"] for n in result.status.get("nodes") or [])
                runtime.seen = frozenset(services.fleet.observed.views)
            except TRANSIENT_ERRORS as exc:
                metrics.CACHE_RECONCILES.labels("error").inc()
                runtime.settled = False
                logger.warning("cache reconcile failed, retrying next tick: %s", _describe(exc))
            await runtime.nap(config.resync_interval if runtime.settled else fast, stopped)
    finally:
        if runtimes.caches.get(key) is runtime:
            del runtimes.caches[key]
        runtime.ended.set()


@kopf.on.delete(GROUP, VERSION, CACHE_PLURAL, id="cleanup")
async def cleanup_cache(name: str, namespace: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Remove the copies; retried while an agent that is still alive holds one it cannot drop."""
    services = _services(memo)
    await _daemon_gone(services.runtimes.caches, (_namespace(namespace), name))
    pending = await services.cache_reconciler.cleanup(body, KopfEvents(body))
    if pending:
        raise kopf.TemporaryError(f"copies still to remove on: {', '.join(pending)}", delay=2)


async def _daemon_gone(running: Mapping[tuple[str, str], Runtime], key: tuple[str, str],
                       timeout: float = 10.0) -> None:
    """Wait for the object's daemon to finish its last pass (kopf stops it in parallel)."""
    runtime = running.get(key)
    if runtime is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runtime.ended.wait(), timeout)


def _describe(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"API {exc.status} {exc.reason}: {(exc.body or '')[:300]!s}"
    return f"{type(exc).__name__}: {exc}"
