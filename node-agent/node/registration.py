"""Register this agent as a cluster-scoped InferenceNode and keep its heartbeat.

Like a kubelet with its Node: create (or update) the object with labels and `spec`,
then write `status` through the status subresource every heartbeat interval (JSON
merge patches: our fields replace, others' fields stay). Failures are logged and
retried; they never stop the agent from serving. The only module of the agent that
imports the Kubernetes client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

from mlxpool.agent.node.nodeinfo import node_object
from mlxpool.nodes import NodeSpec, NodeStatus
from mlxpool.resources import GROUP, NODE_PLURAL, VERSION

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
"""Sent as `_content_type`, which kubernetes_asyncio takes but its stubs omit (hence the
`type: ignore[call-arg]` on those calls); custom objects take no strategic merge patch."""
REQUEST_TIMEOUT_S = 5.0


class NodeRegistrar:
    def __init__(
        self,
        kubeconfig: str,
        name: str,
        labels: dict[str, str],
        spec: NodeSpec,
        status: Callable[[], Awaitable[NodeStatus]],
        interval: float = 5.0,
    ) -> None:
        self.name = name
        self._kubeconfig = kubeconfig
        self._labels = labels
        self._spec = spec
        self._status = status
        self._interval = interval
        self._client: ApiClient | None = None
        self._registered = False
        self._lock = asyncio.Lock()  # one API conversation at a time

    async def run(self) -> None:
        """Register, then beat every interval, until cancelled."""
        while True:
            await self.beat()
            await asyncio.sleep(self._interval)

    async def beat(self) -> bool:
        """Register if needed and write the current status; False (logged) on failure."""
        async with self._lock:
            try:
                api = await self._api()
                if not self._registered:
                    await self._register(api)
                status = await self._status()
                await api.patch_cluster_custom_object_status(  # type: ignore[call-arg]  # see MERGE_PATCH
                    GROUP, VERSION, NODE_PLURAL, self.name, {"status": status.to_wire()},
                    _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT_S,
                )
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, ApiException) and exc.status == 404:
                    self._registered = False  # deleted behind our back: create it again
                log.warning("inferencenode heartbeat failed node=%s error=%s", self.name, _describe(exc))
                return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _api(self) -> CustomObjectsApi:
        if self._client is None:
            self._client = await kube_config.new_client_from_config(config_file=self._kubeconfig)
        return CustomObjectsApi(self._client)

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


def _describe(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}: {(exc.body or '')[:200]!s}"
    return f"{type(exc).__name__}: {exc}"
