"""Register this agent as a cluster-scoped InferenceNode and keep its heartbeat.

Like a kubelet with its Node and its Lease: create (or update) the object with labels
and `spec`, then at every heartbeat interval renew a `coordination.k8s.io/v1` Lease
named after the node (in the lease namespace, labelled `mlxpool.dev/node-lease`), and
write `status` through the status subresource only when something in it changed
(free memory: by at least `FREE_MEMORY_STEP`), or `STATUS_REFRESH_S` after the last
write. A Lease renewal is a small write that wakes only who watches leases; a status
write on every beat made every watcher of InferenceNodes hear every beat of every node
(kubelets moved from status heartbeats to Leases for this reason, KEP-589).

JSON merge patches throughout: our fields replace, others' fields stay. Failures are
logged and retried at the next beat; they never stop the agent from serving. The only
module of the agent that imports the Kubernetes client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, CoordinationV1Api, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

from mlxpool.agent.node.nodeinfo import node_object
from mlxpool.nodes import NodeSpec, NodeStatus, lease_duration_seconds, lease_object, micro_time
from mlxpool.resources import GROUP, NODE_LEASE_NAMESPACE, NODE_PLURAL, VERSION

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
"""Sent as `_content_type`, which kubernetes_asyncio takes but its stubs omit (hence the
`type: ignore[call-arg]` on those calls); custom objects take no strategic merge patch."""
REQUEST_TIMEOUT_S = 5.0
FREE_MEMORY_STEP = 1 << 30
"""Free memory moves all the time; the status says it again only once it moved this much
(the operator reads the exact figure from the agent's report, not from the status)."""
STATUS_REFRESH_S = 300.0
"""The status is written at least this often even unchanged (kubelet's node status report
frequency): `heartbeatTime` stays readable in `kubectl get inode`, a lost write heals."""


class NodeRegistrar:
    def __init__(
        self,
        kubeconfig: str,
        name: str,
        labels: dict[str, str],
        spec: NodeSpec,
        status: Callable[[], Awaitable[NodeStatus]],
        interval: float = 10.0,
        lease_namespace: str = NODE_LEASE_NAMESPACE,
        clock: Callable[[], float] = time.monotonic,
        api_client: ApiClient | None = None,
    ) -> None:
        """`api_client`: one to share (many simulated agents in one process); it is then
        the caller's to close."""
        self.name = name
        self._kubeconfig = kubeconfig
        self._labels = labels
        self._spec = spec
        self._status = status
        self._interval = interval
        self._lease_namespace = lease_namespace
        self._clock = clock
        self._client: ApiClient | None = api_client
        self._owns_client = api_client is None
        self._registered = False
        self._lease_exists = False
        self._renewed_at: float | None = None
        self._written: NodeStatus | None = None
        self._written_at = 0.0
        self._lock = asyncio.Lock()  # one API conversation at a time
        self.writes: dict[str, int] = {"lease": 0, "status": 0}
        """API writes made, by kind (benchmarks and tests read them)."""

    async def run(self) -> None:
        """Register, then beat every interval, until cancelled."""
        while True:
            await self.beat()
            await asyncio.sleep(self._interval)

    async def beat(self) -> bool:
        """Register if needed, renew the lease when due, write the status if it changed;
        False (logged) on failure. Called between beats too (a load finished, draining):
        then the status goes out at once and the lease is left alone until due."""
        async with self._lock:
            try:
                api = await self._api()
                if not self._registered:
                    await self._register(api)
                await self._renew_if_due()
                status = await self._status()
                if status_due(status, self._written, self._clock() - self._written_at):
                    await api.patch_cluster_custom_object_status(  # type: ignore[call-arg]  # see MERGE_PATCH
                        GROUP, VERSION, NODE_PLURAL, self.name, {"status": status.to_wire()},
                        _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT_S,
                    )
                    self.writes["status"] += 1
                    self._written, self._written_at = status, self._clock()
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, ApiException) and exc.status == 404:
                    self._registered = False  # deleted behind our back: create it again
                    self._written = None
                log.warning("inferencenode heartbeat failed node=%s error=%s", self.name, _describe(exc))
                return False

    async def close(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.close()
            self._client = None

    async def _api(self) -> CustomObjectsApi:
        if self._client is None:
            self._client = await kube_config.new_client_from_config(config_file=self._kubeconfig)
        return CustomObjectsApi(self._client)

    async def _renew_if_due(self) -> None:
        now = self._clock()
        if self._renewed_at is not None and now - self._renewed_at < self._interval * 0.9:
            return
        assert self._client is not None
        leases = CoordinationV1Api(self._client)
        renew = {"spec": {"holderIdentity": self.name, "renewTime": micro_time(datetime.now(UTC)),
                          "leaseDurationSeconds": lease_duration_seconds(self._interval)}}
        if self._lease_exists:
            try:
                await _raw(leases.patch_namespaced_lease(  # type: ignore[call-arg]  # see MERGE_PATCH
                    self.name, self._lease_namespace, renew, _content_type=MERGE_PATCH,
                    _request_timeout=REQUEST_TIMEOUT_S, _preload_content=False))
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self._lease_exists = False  # deleted behind our back: create it below
        if not self._lease_exists:
            body = lease_object(self.name, self._lease_namespace, self._interval, datetime.now(UTC))
            try:
                await leases.create_namespaced_lease(
                    self._lease_namespace, body,  # type: ignore[arg-type]  # the client serialises dicts too
                    _request_timeout=REQUEST_TIMEOUT_S)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                await leases.patch_namespaced_lease(  # type: ignore[call-arg]  # see MERGE_PATCH
                    self.name, self._lease_namespace, renew, _content_type=MERGE_PATCH,
                    _request_timeout=REQUEST_TIMEOUT_S)
            self._lease_exists = True
        self.writes["lease"] += 1
        self._renewed_at = now

    async def _register(self, api: CustomObjectsApi) -> None:
        body = node_object(self.name, self._labels, self._spec)
        try:
            await api.create_cluster_custom_object(
                GROUP, VERSION, NODE_PLURAL, body, _request_timeout=REQUEST_TIMEOUT_S,
            )
            log.info("inferencenode created node=%s endpoint=%s", self.name, self._spec.endpoint)
        except ApiException as exc:
            if exc.status != 409:
                raise
            patch = {"metadata": {"labels": self._labels}, "spec": body["spec"]}
            await api.patch_cluster_custom_object(  # type: ignore[call-arg]  # see MERGE_PATCH
                GROUP, VERSION, NODE_PLURAL, self.name, patch,
                _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT_S,
            )
            log.info("inferencenode updated node=%s endpoint=%s", self.name, self._spec.endpoint)
        self._registered = True
        self._written = None  # a (re)registered object gets its status at once


def status_due(status: NodeStatus, written: NodeStatus | None, since_written: float) -> bool:
    """Whether `status` must be written: nothing written yet, what placement reads changed,
    free memory moved by `FREE_MEMORY_STEP`, or the last write is `STATUS_REFRESH_S` old."""
    if written is None or since_written >= STATUS_REFRESH_S:
        return True
    if _significant(status) != _significant(written):
        return True
    old, new = written.free_memory_bytes, status.free_memory_bytes
    if (old is None) != (new is None):
        return True
    return old is not None and new is not None and abs(new - old) >= FREE_MEMORY_STEP


def _significant(status: NodeStatus) -> dict[str, Any]:
    return status.model_dump(exclude={"heartbeat_time", "free_memory_bytes", "free_memory"})


async def _raw(call: Awaitable[Any]) -> None:
    """Await a call made with `_preload_content=False`: its answer is read and dropped, not
    parsed into the client's models (a renewal's answer is the whole Lease, and parsing it,
    timestamps and all, was most of a renewal's CPU: 1,000 simulated agents renew 100 a
    second in one process). An error answer raises ApiException as a parsed call would."""
    response = await call
    try:
        body = await response.read()
    finally:
        response.release()
    if not 200 <= response.status <= 299:
        exc = ApiException(status=response.status, reason=response.reason)
        exc.body = body.decode(errors="replace")
        raise exc


def _describe(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}: {(exc.body or '')[:200]!s}"
    return f"{type(exc).__name__}: {exc}"
