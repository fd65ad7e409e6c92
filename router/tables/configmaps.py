"""Follow the pool's routing-table ConfigMap through the Kubernetes API server.

List the one ConfigMap `<pool>-routes` (field selector on its name), then watch from
the list's resourceVersion; re-list when the watch ends or the version expired (410
Gone); reconnect with jittered exponential backoff on any other error. Tables go to
`TableHolder`, which keeps the last good one. A deleted ConfigMap keeps the router on
its last table (the pool may come back; the operator would say otherwise).

The only module of the router that imports the Kubernetes client.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import aiohttp
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from mlxpool.resources import ROUTES_DATA_KEY, routes_configmap_name
from mlxpool.router.settings import PoolRef, TableSourceSettings
from mlxpool.router.tables.holder import TableHolder

log = logging.getLogger(__name__)

LIST_TIMEOUT = 30.0
"""Seconds for one list request."""


class ConfigMapFollower:
    """Keeps `holder` in step with one pool's routing-table ConfigMap."""

    def __init__(self, api: client.ApiClient, holder: TableHolder, pool: PoolRef,
                 settings: TableSourceSettings) -> None:
        self.core = client.CoreV1Api(api)
        self.holder = holder
        self.pool = pool
        self.settings = settings
        self.name = routes_configmap_name(pool.name)
        self.field_selector = f"metadata.name={self.name}"
        self._waiting_logged = False

    async def run(self) -> None:
        """Follow until cancelled."""
        delay = self.settings.backoff_initial
        while True:
            try:
                resource_version = await self._list()
                delay = self.settings.backoff_initial
                started = time.monotonic()
                await self._watch(resource_version)
                if time.monotonic() - started >= 1.0:
                    continue  # a normal end of a watch: re-list at once
                log.warning("routing table watch ended at once; backing off configmap=%s", self._where())
            except ApiException as exc:
                if exc.status == 410:
                    log.info("routing table watch expired (410 Gone), re-listing configmap=%s", self._where())
                    continue
                log.warning("routing table API error configmap=%s status=%s reason=%s retry_in=%.1fs",
                            self._where(), exc.status, exc.reason, delay)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.warning("routing table API unreachable configmap=%s error=%r retry_in=%.1fs",
                            self._where(), exc, delay)
            await asyncio.sleep(delay * random.uniform(1.0, 1.2))
            delay = min(delay * 2, self.settings.backoff_max)

    def _where(self) -> str:
        return f"{self.pool.namespace}/{self.name}"

    async def _list(self) -> str:
        result = await self.core.list_namespaced_config_map(
            self.pool.namespace, field_selector=self.field_selector, _request_timeout=LIST_TIMEOUT)
        if not result.items:
            if self.holder.origin is not None:
                log.warning("routing table configmap is gone; keeping the last table configmap=%s", self._where())
                self.holder.forget_origin()
            elif not self._waiting_logged:
                log.info("waiting for the routing table configmap configmap=%s", self._where())
            self._waiting_logged = True
        for item in result.items:
            self._offer(item.metadata.uid, item.data)
        return result.metadata.resource_version

    async def _watch(self, resource_version: str) -> None:
        timeout = self.settings.watch_timeout
        async with watch.Watch() as stream:
            events = stream.stream(
                self.core.list_namespaced_config_map, self.pool.namespace,
                field_selector=self.field_selector, resource_version=resource_version,
                allow_watch_bookmarks=True, timeout_seconds=timeout,
                _request_timeout=aiohttp.ClientTimeout(sock_connect=LIST_TIMEOUT, sock_read=timeout + 30),
            )
            async for event in events:
                kind, raw = event["type"], event["raw_object"]
                if kind in ("ADDED", "MODIFIED"):
                    self._offer(raw["metadata"]["uid"], raw.get("data"))
                elif kind == "DELETED":
                    log.warning("routing table configmap deleted; keeping the last table configmap=%s", self._where())
                    self.holder.forget_origin()

    def _offer(self, uid: str, data: dict[str, Any] | None) -> None:
        origin = f"configmap:{self._where()}@{uid}"
        text = (data or {}).get(ROUTES_DATA_KEY)
        if text is None:
            self.holder.reject(origin, f"no {ROUTES_DATA_KEY} key")
            return
        self.holder.offer_text(text, origin)
