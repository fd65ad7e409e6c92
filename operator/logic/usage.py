"""Per-pool load figures from the agents' metrics: pure, no I/O.

The inputs are samples of each agent's `/metrics` (by model: requests running and
waiting, the generated-token counter) taken by `scraping`; the outputs are what the
operator exports per pool for autoscalers: queue depth, requests running, tokens per
second between the last two scrapes, and utilization, the share of the pool's scraped
endpoints with work in their batch. A model served by two pools on the same node
counts for both (the agent cannot tell whose request it is).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSample:
    running: float = 0.0
    waiting: float = 0.0
    generated_tokens: float = 0.0
    """A counter: only differences between two samples mean anything."""


@dataclass(frozen=True)
class Scrape:
    """One node's `/metrics`, taken at `at` (monotonic seconds)."""

    at: float
    models: Mapping[str, ModelSample]


@dataclass(frozen=True)
class PoolUsage:
    queue_depth: float = 0.0
    running: float = 0.0
    tokens_per_second: float = 0.0
    utilization: float = 0.0
    scraped: int = 0


def pool_usage(placed: Mapping[str, Collection[str]], now: Mapping[str, Scrape],
               before: Mapping[str, Scrape]) -> PoolUsage:
    """`placed`: node -> the pool's models there; nodes without a scrape are left out."""
    queue = running = rate = 0.0
    busy = scraped = 0
    for node, models in placed.items():
        scrape = now.get(node)
        if scrape is None:
            continue
        scraped += 1
        node_running = 0.0
        for model in models:
            sample = scrape.models.get(model)
            if sample is None:
                continue
            queue += sample.waiting
            node_running += sample.running
            earlier = before.get(node)
            if earlier is not None and scrape.at > earlier.at and model in earlier.models:
                # A counter that went down was reset (agent restart): no rate for this interval.
                generated = max(sample.generated_tokens - earlier.models[model].generated_tokens, 0.0)
                rate += generated / (scrape.at - earlier.at)
        running += node_running
        busy += node_running > 0
    return PoolUsage(queue_depth=queue, running=running, tokens_per_second=rate,
                     utilization=busy / scraped if scraped else 0.0, scraped=scraped)
