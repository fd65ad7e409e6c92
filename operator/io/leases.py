"""Node Leases, followed: the agents' heartbeats as `coordination.k8s.io/v1` Leases.

Agents renew a Lease per node every heartbeat interval instead of writing their
InferenceNode's status (`mlxpool.nodes`); this follows those Leases in one namespace
(list, then watch from the list's resourceVersion; relist after an error or an
expired version) and hands every renewal to a callback. Only leases labelled
`mlxpool.dev/node-lease` are listed, so the operator needs `list`/`watch` on leases in
that one namespace and nothing else. kopf is not used: its namespaced watches follow
the pools' namespaces, and the lease namespace is another one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from mlxpool.nodes import lease_renewal
from mlxpool.operator.io import metrics
from mlxpool.resources import LABEL_NODE_LEASE

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 300
"""The API server ends a watch after this long; it is started again from where it was."""
RETRY_S = 2.0

Renewed = Callable[[str, datetime | None], None]
"""`(node, renewTime)` for every lease seen; None when its lease was deleted."""


class LeaseWatcher:
    def __init__(self, api_client: client.ApiClient, namespace: str, renewed: Renewed) -> None:
        self._api = client.CoordinationV1Api(api_client)
        self._namespace = namespace
        self._renewed = renewed
        self._known: set[str] = set()
        self.synced = asyncio.Event()
        """Set once the first list went through (every lease has been heard of once)."""

    async def run(self) -> None:
        """List and watch until cancelled; errors are logged and the list starts over."""
        while True:
            try:
                version = await self._list()
                await self._watch(version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = (f"{exc.status} {exc.reason}" if isinstance(exc, ApiException)
                         else f"{type(exc).__name__}: {exc}")
                log.warning("node lease watch failed namespace=%s error=%s; listing again in %gs",
                            self._namespace, error, RETRY_S)
                await asyncio.sleep(RETRY_S)

    async def _list(self) -> str:
        metrics.API_REQUESTS.labels("list", "leases").inc()
        response = await self._api.list_namespaced_lease(
            self._namespace, label_selector=LABEL_NODE_LEASE, _preload_content=False, _request_timeout=30)
        listed = json.loads(await response.read())  # type: ignore[attr-defined]  # raw: _preload_content=False
        seen: set[str] = set()
        for item in listed.get("items") or []:
            if (name := self._apply(item)) is not None:
                seen.add(name)
        for gone in self._known - seen:
            self._renewed(gone, None)
        self._known = seen
        self.synced.set()
        return str(listed["metadata"]["resourceVersion"])

    async def _watch(self, version: str) -> None:
        metrics.API_REQUESTS.labels("watch", "leases").inc()
        async with watch.Watch() as stream:
            async for event in stream.stream(
                    self._api.list_namespaced_lease, self._namespace, label_selector=LABEL_NODE_LEASE,
                    resource_version=version, timeout_seconds=WATCH_TIMEOUT_S, allow_watch_bookmarks=True):
                kind, raw = event.get("type"), event.get("raw_object") or {}
                if kind == "ERROR":  # e.g. 410 Gone: our version is too old; list again
                    raise RuntimeError(f"watch error: {raw.get('message', raw)}")
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    name = (raw.get("metadata") or {}).get("name")
                    if isinstance(name, str):
                        self._known.discard(name)
                        self._renewed(name, None)
                    continue
                if (name := self._apply(raw)) is not None:
                    self._known.add(name)

    def _apply(self, body: dict[str, Any]) -> str | None:
        try:
            name, renewed = lease_renewal(body)
        except ValueError as exc:
            log.warning("node lease ignored: %s", exc)
            return None
        self._renewed(name, renewed)
        return name
