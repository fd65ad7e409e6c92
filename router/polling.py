"""Polling the agents' load reports (`GET /v1/signals`) into `EndpointSignals`.

One task per router: every `interval` it asks every endpoint of the current table, all
at once, with a short timeout, and stores what arrives with its arrival time. A poll
that fails stores nothing, so the report ages and the staleness bound takes over. An
agent that answers 404 (older, without signals) is asked again only every 30 s. The
age of each endpoint's report is exported as a gauge read at scrape time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

import httpx
from pydantic import ValidationError

from mlxpool.httptransports import PerHostTransport
from mlxpool.loadsignals import SIGNALS_PATH, AgentSignals
from mlxpool.router.metrics import RouterMetrics
from mlxpool.router.picking.signals import EndpointSignals
from mlxpool.router.settings import SignalSettings
from mlxpool.router.tables.holder import TableHolder

log = logging.getLogger(__name__)

UNSUPPORTED_RETRY_SECONDS = 30.0
MAX_REPORT_BYTES = 1 << 20
"""A report larger than this is refused (a few hundred bytes per model is normal)."""


class SignalPoller:
    def __init__(self, client: httpx.AsyncClient, holder: TableHolder, signals: EndpointSignals,
                 metrics: RouterMetrics, settings: SignalSettings,
                 clock: Callable[[], float] = time.monotonic, pools: PerHostTransport | None = None) -> None:
        """`pools`: the client's transport, whose pools of agents that left the table get closed."""
        self.client, self.holder, self.signals = client, holder, signals
        self.pools = pools
        self._pruned_for: object = None  # the table whose departed agents' pools were closed
        self.metrics, self.settings, self.clock = metrics, settings, clock
        self._unsupported: dict[str, float] = {}  # url -> when to ask again
        self._gauged: dict[str, str] = {}  # url -> node label of its age gauge
        self.polls = 0

    def endpoints(self) -> dict[str, str]:
        """URL -> node of every endpoint of the current table, healthy or not."""
        table = self.holder.current
        if table is None:
            return {}
        return {e.url: e.node for es in table.models.values() for e in es}

    async def run(self) -> None:
        while True:
            started = self.clock()
            await self.poll_once()
            await asyncio.sleep(max(self.settings.interval - (self.clock() - started), 0.005))

    async def poll_once(self) -> None:
        endpoints = self.endpoints()
        self._track_gauges(endpoints)
        now = self.clock()
        due = [u for u in endpoints if self._unsupported.get(u, 0.0) <= now]
        if due:
            await asyncio.gather(*(self._poll(url) for url in due))
        table = self.holder.current
        if self.pools is not None and table is not self._pruned_for:
            # Every poll of this round ended, so no pool is busy: those of agents that left close now.
            await self.pools.retain(endpoints)
            self._pruned_for = table
        self.polls += 1

    async def _poll(self, url: str) -> None:
        try:
            response = await self.client.get(url.rstrip("/") + SIGNALS_PATH, timeout=self.settings.timeout)
        except httpx.HTTPError as exc:
            log.debug("signals poll failed url=%s error=%r", url, exc)
            return
        if response.status_code == 404:
            if url not in self._unsupported:
                log.info("endpoint serves no load signals; using local counts url=%s", url)
            self._unsupported[url] = self.clock() + UNSUPPORTED_RETRY_SECONDS
            return
        if response.status_code != 200 or len(response.content) > MAX_REPORT_BYTES:
            log.debug("signals poll refused url=%s status=%d bytes=%d", url, response.status_code,
                      len(response.content))
            return
        try:
            report = AgentSignals.model_validate_json(response.content)
        except ValidationError as exc:
            log.warning("signals report does not parse url=%s errors=%d", url, exc.error_count())
            return
        self._unsupported.pop(url, None)
        self.signals.report(url, dict(report.models), report.draining, self.clock())

    def _track_gauges(self, endpoints: dict[str, str]) -> None:
        for url, node in list(self._gauged.items()):
            if endpoints.get(url) != node:
                self.metrics.signal_age.remove(node)
                del self._gauged[url]
        for url, node in endpoints.items():
            if url not in self._gauged:
                self._gauged[url] = node
                self.metrics.signal_age.labels(node).set_function(functools.partial(self._age, url))

    def _age(self, url: str) -> float:
        age = self.signals.age(url, self.clock())
        return -1.0 if age is None else age
