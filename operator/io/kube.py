"""The operator's own Kubernetes API calls: routing-table ConfigMaps and status writes.

A thin typed layer over kubernetes_asyncio (kopf does the watching). Every write is a
JSON merge patch or a create, and every request is counted in `metrics.API_REQUESTS`.
Deciding whether to write is the caller's job; this module never reads-before-write
on its own.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from mlxpool.operator.io import metrics
from mlxpool.resources import (
    API_VERSION,
    CACHE_PLURAL,
    GROUP,
    LABEL_POOL,
    NODE_PLURAL,
    POOL_KIND,
    POOL_PLURAL,
    ROUTES_DATA_KEY,
    VERSION,
    routes_configmap_name,
)
from mlxpool.routing import RoutingTable

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
"""Sent as `_content_type`, which kubernetes_asyncio takes but its stubs omit (hence
`type: ignore[call-arg]` on those calls); the stubs also want model objects where the
client serialises plain dicts just as well (`type: ignore[arg-type]`)."""
REQUEST_TIMEOUT = 10.0
MANAGED_BY = "mlxpool-operator"


def routes_configmap(pool: Mapping, table: RoutingTable) -> dict:
    """The ConfigMap `<pool>-routes`, labelled with and owned by the pool."""
    meta = pool["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": routes_configmap_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {LABEL_POOL: meta["name"], "app.kubernetes.io/managed-by": MANAGED_BY},
            "ownerReferences": [{
                "apiVersion": API_VERSION, "kind": POOL_KIND, "name": meta["name"], "uid": meta["uid"],
                "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "data": {ROUTES_DATA_KEY: table.to_json()},
    }


class KubeClient:
    def __init__(self, api_client: client.ApiClient) -> None:
        self._api_client = api_client
        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)

    async def close(self) -> None:
        await self._api_client.close()

    async def read_routes(self, namespace: str, pool: str) -> RoutingTable | None:
        """The routing table in the pool's ConfigMap; None if absent or unreadable."""
        name = routes_configmap_name(pool)
        metrics.API_REQUESTS.labels("get", "configmaps").inc()
        try:
            cm = await self._core.read_namespaced_config_map(name, namespace, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        text = (cm.data or {}).get(ROUTES_DATA_KEY)
        if text is None:
            return None
        try:
            return RoutingTable.from_json(text)
        except ValidationError as exc:
            log.warning("unreadable routing table, will overwrite namespace=%s configmap=%s error=%s",
                        namespace, name, exc.errors()[0]["msg"])
            return None

    async def write_routes(self, pool: Mapping, table: RoutingTable, exists: bool, *,
                           create_only: bool = False) -> None:
        """Create or merge-patch the ConfigMap; falls back to the other when `exists` was wrong,
        except with `create_only`: then a ConfigMap already there is an error (409, raised)."""
        body = routes_configmap(pool, table)
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        if not exists:
            metrics.API_REQUESTS.labels("create", "configmaps").inc()
            try:
                await self._core.create_namespaced_config_map(
                    namespace, body,  # type: ignore[arg-type]  # see MERGE_PATCH
                    _request_timeout=REQUEST_TIMEOUT)
                return
            except ApiException as exc:
                if exc.status != 409 or create_only:
                    raise
        patch = {"metadata": {k: body["metadata"][k] for k in ("labels", "ownerReferences")}, "data": body["data"]}
        metrics.API_REQUESTS.labels("patch", "configmaps").inc()
        try:
            await self._core.patch_namespaced_config_map(  # type: ignore[call-arg]  # see MERGE_PATCH
                name, namespace, patch, _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status != 404:
                raise
            metrics.API_REQUESTS.labels("create", "configmaps").inc()
            await self._core.create_namespaced_config_map(
                namespace, body,  # type: ignore[arg-type]  # see MERGE_PATCH
                _request_timeout=REQUEST_TIMEOUT)

    async def patch_pool_status(self, namespace: str, name: str, status: Mapping) -> dict:
        """Merge-patch `status`; returns the status the API server stored."""
        metrics.API_REQUESTS.labels("patch", "inferencepools/status").inc()
        updated = await self._custom.patch_namespaced_custom_object_status(  # type: ignore[call-arg]  # see MERGE_PATCH
            GROUP, VERSION, namespace, POOL_PLURAL, name, {"status": dict(status)},
            _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT,
        )
        return dict(updated.get("status") or {})

    async def patch_cache_status(self, namespace: str, name: str, status: Mapping) -> dict:
        """Merge-patch a ModelCache's `status`; returns the stored status."""
        metrics.API_REQUESTS.labels("patch", "modelcaches/status").inc()
        updated = await self._custom.patch_namespaced_custom_object_status(  # type: ignore[call-arg]  # see MERGE_PATCH
            GROUP, VERSION, namespace, CACHE_PLURAL, name, {"status": dict(status)},
            _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT,
        )
        return dict(updated.get("status") or {})

    async def patch_node_status(self, name: str, status: Mapping) -> None:
        """Merge-patch the operator's fields (the conditions) of an InferenceNode's status;
        the agent's own fields are left alone."""
        metrics.API_REQUESTS.labels("patch", "inferencenodes/status").inc()
        await self._custom.patch_cluster_custom_object_status(  # type: ignore[call-arg]  # see MERGE_PATCH
            GROUP, VERSION, NODE_PLURAL, name, {"status": dict(status)},
            _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT,
        )

    async def list_pools(self, namespaces: tuple[str, ...], label_selector: str | None = None) -> list[dict]:
        """Every InferencePool in `namespaces` (all when empty; glob patterns are listed
        cluster-wide and filtered) that `label_selector` selects (the shard's), for seeding
        the fleet at start."""
        selector = label_selector or ""  # the client sends an empty selector as none
        plain = [ns for ns in namespaces if not any(c in ns for c in "*?[!")]
        items: list[dict] = []
        if namespaces and len(plain) == len(namespaces):
            for ns in plain:
                metrics.API_REQUESTS.labels("list", "inferencepools").inc()
                listed = await self._custom.list_namespaced_custom_object(
                    GROUP, VERSION, ns, POOL_PLURAL, _request_timeout=REQUEST_TIMEOUT, label_selector=selector)
                items += listed.get("items") or []
            return items
        metrics.API_REQUESTS.labels("list", "inferencepools").inc()
        listed = await self._custom.list_cluster_custom_object(
            GROUP, VERSION, POOL_PLURAL, _request_timeout=REQUEST_TIMEOUT, label_selector=selector)
        patterns = namespaces or ("*",)
        return [i for i in listed.get("items") or []
                if any(fnmatch.fnmatchcase(i["metadata"]["namespace"], p) for p in patterns)]
