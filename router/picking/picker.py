"""The picker: filters, then a weighted sum of scores, then a ranked candidate list.

`Pipeline.rank` is the whole endpoint choice of a request. It returns every surviving
endpoint, best first, so the forwarder's failover simply walks the list. Synchronous
and I/O-free: one pick cannot interleave with another on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlxpool.router.picking.plugins import Filter, PickRequest, Scorer
from mlxpool.router.picking.signals import EndpointSignals
from mlxpool.routing import RouteEndpoint


@dataclass(frozen=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(frozen=True)
class Pipeline:
    """One strategy profile, instantiated: its filters and weighted scorers."""

    name: str
    filters: tuple[Filter, ...]
    scorers: tuple[WeightedScorer, ...]

    def rank(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[RouteEndpoint]:
        """Surviving endpoints, best first; ties keep the table's order."""
        survivors = list(endpoints)
        for filter_ in self.filters:
            if not survivors:
                break
            survivors = filter_.filter(request, survivors, signals)
        if not survivors:
            return []
        totals = [0.0] * len(survivors)
        for weighted in self.scorers:
            scores = weighted.scorer.score(request, survivors, signals)
            if len(scores) != len(survivors) or any(not 0.0 <= s <= 1.0 for s in scores):
                name = weighted.scorer.type_name
                raise ValueError(f"scorer {name!r} returned {scores!r} for {len(survivors)} endpoints")
            totals = [t + weighted.weight * s for t, s in zip(totals, scores, strict=True)]
        order = sorted(range(len(survivors)), key=lambda i: (-totals[i], i))
        ranked = [survivors[i] for i in order]
        for weighted in self.scorers:
            weighted.scorer.picked(request, ranked)
        return ranked
