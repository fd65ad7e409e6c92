"""Scrape the placed agents' `/metrics` and export per-pool load figures (`usage`).

One background task for the whole operator: every `scrape_interval` it reads
`/metrics` of every node some pool claims (at most `MAX_IN_FLIGHT` at once, short
timeout), parses the vLLM-compatible gauges and the generated-token counter per model
(only their lines are parsed), and sets the `mlxpool_pool_*` gauges. A pool whose
claims are gone loses its series. The round is spread over the fleet like probes and
reports: it starts at most every `max(scrape_interval, nodes / scrapes_per_second)`
seconds, so 1,000 placed agents cost 50 scrapes a second, not 200 in bursts of 1,000.
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
MAX_IN_FLIGHT = 16
"""Scrapes outstanding at once: a round of a thousand must not hold a thousand connections."""
SCRAPES_PER_SECOND = 50.0
_WANTED = tuple(f"{prefix}{name}" for name in (RUNNING, WAITING, GENERATED) for prefix in ("", "# HELP ", "# TYPE "))


def _wanted_lines(text: str) -> str:
    """The lines of the three families we read (an agent's /metrics has hundreds more)."""
    return "\n".join(line for line in text.splitlines() if line.startswith(_WANTED)) + "\n"


def parse_metrics(text: str) -> dict[str, ModelSample]:
    """Per-model samples from an agent's Prometheus text; unknown series are ignored."""
    values: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(_wanted_lines(text)):
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
    def __init__(self, fleet: Fleet, agents: MetricsAgents, interval: float,
                 scrapes_per_second: float = SCRAPES_PER_SECOND) -> None:
        self._fleet = fleet
        self._agents = agents
        self._interval = interval
        self._scrapes_per_second = scrapes_per_second
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._latest: dict[str, Scrape] = {}
        self._exported: set[PoolKey] = set()

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            scraped = await self.scrape_once()
            period = max(self._interval, scraped / self._scrapes_per_second)
            await asyncio.sleep(max(period - (time.monotonic() - started), 0.0))

    async def scrape_once(self) -> int:
        """One round; returns how many agents it asked."""
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
        return len(nodes)

    async def _scrape(self, node: str) -> Scrape | None:
        view = self._fleet.observed.views.get(node)
        if view is None:
            return None
        try:
            async with self._slots:
                text = await self._agents.metrics_text(view.endpoint)
            return Scrape(time.monotonic(), parse_metrics(text))
        except AgentError as exc:
            log.debug("metrics scrape failed node=%s error=%s", node, exc)
        except ValueError as exc:  # not Prometheus text
            log.warning("unreadable /metrics node=%s error=%s", node, exc)
        return None
