"""The kopf wiring: settings, clients, the InferenceNode index, and one daemon per pool.

Each InferencePool gets a daemon that runs `PoolReconciler.reconcile` now and then
every probe interval; kopf starts it when a pool appears or the operator resumes, and
stops it when the pool goes. Events wake it early instead of waiting for the tick:
a spec change of the pool (generation ahead of observedGeneration), a change of an
InferenceNode that matters for routing (not mere heartbeats), or the deletion of a
routing-table ConfigMap. There are no kopf change handlers on purpose: they would cost
annotation writes per change, and the daemon already converges from any state.

Nothing here decides anything; it only connects kopf to `reconciling`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import kopf
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from mlxpool.operator import metrics
from mlxpool.operator.config import OperatorConfig
from mlxpool.operator.kube import KubeClient, open_api_client
from mlxpool.operator.placement import NodeView
from mlxpool.operator.probing import Prober
from mlxpool.operator.reconciling import PoolReconciler, PoolState
from mlxpool.operator.specs import PoolSpec
from mlxpool.resources import FINALIZER, GROUP, LABEL_POOL, NODE_PLURAL, POOL_PLURAL, VERSION

log = logging.getLogger(__name__)

TRANSIENT_ERRORS = (ApiException, aiohttp.ClientError, asyncio.TimeoutError, ValidationError)
"""Errors a pass logs and retries at the next tick (API hiccups, a spec the CRD let through)."""


@dataclass
class PoolRuntime:
    """A running pool daemon: its memory and its wake-up call."""

    state: PoolState
    woken: asyncio.Event = field(default_factory=asyncio.Event)

    async def nap(self, seconds: float, stopped: kopf.DaemonStopped) -> None:
        """Sleep `seconds`, or less if woken or stopped."""
        waiters = [asyncio.ensure_future(self.woken.wait()), asyncio.ensure_future(stopped.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        self.woken.clear()


@dataclass
class Runtimes:
    """Shared by all handlers through the operator memo (kopf copies memos shallowly)."""

    pools: dict[tuple[str, str], PoolRuntime] = field(default_factory=dict)
    node_keys: dict[str, tuple] = field(default_factory=dict)

    def wake(self, namespace: str, name: str) -> None:
        if (runtime := self.pools.get((namespace, name))) is not None:
            runtime.woken.set()

    def wake_all(self) -> None:
        for runtime in self.pools.values():
            runtime.woken.set()


class KopfEvents:
    """Kubernetes Events on a pool, posted by kopf's background poster."""

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
    memo.http = httpx.AsyncClient(trust_env=False, follow_redirects=False)
    memo.reconciler = PoolReconciler(memo.kube, Prober(memo.http, config.probe_timeout), config.node_stale_after)
    memo.runtimes = Runtimes()
    memo.metrics = None
    if config.metrics_port is not None:
        memo.metrics = metrics.MetricsServer(config.metrics_port, config.metrics_address)
    # The one "ready" line the dev stack and the tests wait for (url: the metrics endpoint).
    log.info("operator ready%s namespaces=%s probe_interval=%s stale_after=%ss",
             f" url={memo.metrics.url}" if memo.metrics else "", ",".join(config.namespaces) or "*",
             config.probe_interval or "per-pool", config.node_stale_after)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    await memo.kube.close()
    await memo.http.aclose()
    if memo.metrics is not None:
        await asyncio.to_thread(memo.metrics.close)  # joins a thread: not on the event loop


@kopf.index(GROUP, VERSION, NODE_PLURAL)
def inference_nodes(name: str, body: kopf.Body, **_: Any) -> dict[str, NodeView]:
    """Every InferenceNode by name, parsed once per change instead of once per pass."""
    try:
        return {name: NodeView.from_body(body)}
    except ValueError as exc:
        raise kopf.PermanentError(str(exc)) from exc  # dropped from the index, logged once


@kopf.on.event(GROUP, VERSION, NODE_PLURAL)
def node_changed(type: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Wake every pool when a node changes in a way routing cares about (not heartbeats)."""
    runtimes: Runtimes = memo.runtimes
    if type == "DELETED":
        key = None
    else:
        try:
            key = NodeView.from_body(body).routing_key()
        except ValueError:
            key = ("malformed",)
    if runtimes.node_keys.get(name) != key:
        if key is None:
            runtimes.node_keys.pop(name, None)
        else:
            runtimes.node_keys[name] = key
        runtimes.wake_all()


@kopf.on.event(GROUP, VERSION, POOL_PLURAL)
def pool_changed(name: str, namespace: str, meta: kopf.Meta, status: kopf.Status, memo: kopf.Memo,
                 **_: Any) -> None:
    """Wake a pool's daemon when its spec changed (kopf already updated its live body)."""
    if meta.get("generation") != status.get("observedGeneration"):
        memo.runtimes.wake(namespace, name)


@kopf.on.event("v1", "configmaps", labels={LABEL_POOL: kopf.PRESENT})
def routes_changed(type: str | None, namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
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
    """Reconcile the pool every probe interval (and when woken) until it is deleted."""
    config: OperatorConfig = memo.config
    runtimes: Runtimes = memo.runtimes
    runtime = runtimes.pools[namespace, name] = PoolRuntime(PoolState.from_status(body.get("status")))
    events = KopfEvents(body)
    try:
        while not stopped:
            try:
                await memo.reconciler.reconcile(body, _all_nodes(inference_nodes), runtime.state, events)
            except TRANSIENT_ERRORS as exc:
                metrics.RECONCILES.labels("error").inc()
                logger.warning("reconcile failed, retrying next tick: %s", _describe(exc))
            await runtime.nap(probe_interval(body, config), stopped)
    finally:
        if runtimes.pools.get((namespace, name)) is runtime:
            del runtimes.pools[namespace, name]
        metrics.forget_pool(namespace, name)


def probe_interval(body: Mapping, config: OperatorConfig) -> float:
    if config.probe_interval is not None:
        return config.probe_interval
    try:
        return float(PoolSpec.from_body(body).health_check.interval_seconds)
    except ValidationError:
        return 1.0


def _all_nodes(index: kopf.Index) -> Iterable[NodeView]:
    return [node for store in index.values() for node in store]


def _describe(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"API {exc.status} {exc.reason}: {(exc.body or '')[:300]!s}"
    return f"{type(exc).__name__}: {exc}"
