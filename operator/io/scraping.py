"""Scrape the placed agents' `/metrics` and export per-pool load figures (`usage`).

One background task for the whole operator: every `scrape_interval` it reads
`/metrics` of every node some pool claims (concurrently, short timeout), parses the
vLLM-compatible gauges and the generated-token counter per model, and sets the
`mlxpool_pool_*` gauges. A pool whose claims are gone loses its series.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from mlxpool.operator.io import metrics
from mlxpool.operator.io.agentclient import AgentError
from mlxpool.operator.logic.claims import PoolKey
from mlxpool.operator.logic.fleet import Fleet
from mlxpool.operator.logic.usage import ModelSample, Scrape, pool_usage

log = logging.getLogger(__name__)

RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
GENERATED = "mlxpool_generation_tokens"  # a counter: samples are named ..._total


def parse_metrics(text: str) -> dict[str, ModelSample]:
    """Per-model samples from an agent's Prometheus text; unknown series are ignored."""
    values: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (RUNNING, WAITING, GENERATED):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            model = sample.labels.get("model_name")
            if model is not None:
                values.setdefault(model, {})[family.name] = sample.value
    return {m: ModelSample(running=v.get(RUNNING, 0.0), waiting=v.get(WAITING, 0.0),
                           generated_tokens=v.get(GENERATED, 0.0)) for m, v in values.items()}


class MetricsAgents(Protocol):
    async def metrics_text(self, url: str) -> str: ...


class UsageScraper:
    def __init__(self, fleet: Fleet, agents: MetricsAgents, interval: float) -> None:
        self._fleet = fleet
        self._agents = agents
        self._interval = interval
        self._latest: dict[str, Scrape] = {}
        self._exported: set[PoolKey] = set()

    async def run(self) -> None:
        while True:
            await self.scrape_once()
            await asyncio.sleep(self._interval)

    async def scrape_once(self) -> None:
        observed = self._fleet.observed
        nodes = sorted(n for n in self._fleet.claims.nodes() if n in observed.views and observed.of(n).probe.healthy)
        results = await asyncio.gather(*(self._scrape(n) for n in nodes))
        before = self._latest
        now = {node: scrape for node, scrape in zip(nodes, results, strict=True) if scrape is not None}
        self._latest = now
        exported = set()
        for pool, claim in list(self._fleet.claims.pools.items()):
            usage = pool_usage(claim.nodes, now, before)
            labels = pool
            metrics.POOL_QUEUE_DEPTH.labels(*labels).set(usage.queue_depth)
            metrics.POOL_RUNNING.labels(*labels).set(usage.running)
            metrics.POOL_TOKENS_PER_SECOND.labels(*labels).set(usage.tokens_per_second)
            metrics.POOL_UTILIZATION.labels(*labels).set(usage.utilization)
            metrics.POOL_SCRAPED_ENDPOINTS.labels(*labels).set(usage.scraped)
            exported.add(pool)
        for gone in self._exported - exported:
            for gauge in metrics.USAGE_GAUGES:
                with contextlib.suppress(KeyError):
                    gauge.remove(*gone)
        self._exported = exported

    async def _scrape(self, node: str) -> Scrape | None:
        view = self._fleet.observed.views.get(node)
        if view is None:
            return None
        try:
            text = await self._agents.metrics_text(view.endpoint)
            return Scrape(time.monotonic(), parse_metrics(text))
        except AgentError as exc:
            log.debug("metrics scrape failed node=%s error=%s", node, exc)
        except ValueError as exc:  # not Prometheus text
            log.warning("unreadable /metrics node=%s error=%s", node, exc)
        return None
