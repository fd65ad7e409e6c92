"""The pipeline and its pickers: filters, a weighted sum of scores, a ranked candidate list.

`Pipeline.rank` is the whole endpoint choice of a request. It returns every surviving
endpoint, best first, so the forwarder's failover simply walks the list. Synchronous
and I/O-free: one pick cannot interleave with another on the event loop. The last
step is a plugin too (`Picker`):
- `max-score`: highest total first, ties in the table's order (deterministic);
- `weighted-random`: llm-d's weighted random picker, order drawn in proportion to the
  totals times the endpoints' table weights (capacity), which spreads a burst of
  identical requests instead of sending them all to the one endpoint that scored best
  a moment ago.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from mlxpool.router.picking.plugins import Filter, Picker, PickRequest, Scorer
from mlxpool.router.picking.signals import EndpointSignals
from mlxpool.routing import RouteEndpoint


class MaxScorePicker(Picker):
    type_name = "max-score"

    def order(self, request: PickRequest, endpoints: Sequence[RouteEndpoint], totals: Sequence[float],
              ) -> list[RouteEndpoint]:
        return [endpoints[i] for i in sorted(range(len(endpoints)), key=lambda i: (-totals[i], i))]


class WeightedRandomParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int | None = Field(default=None, description="Seed of the draw (tests, benchmarks); None: random.")


class WeightedRandomPicker(Picker):
    type_name = "weighted-random"
    Params = WeightedRandomParams
    params: WeightedRandomParams

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._random = random.Random(self.params.seed)

    def order(self, request: PickRequest, endpoints: Sequence[RouteEndpoint], totals: Sequence[float],
              ) -> list[RouteEndpoint]:
        # Efraimidis-Spirakis: key u^(1/w), largest first, is a draw without replacement
        # in proportion to w = total x the endpoint's capacity weight from the table (a Mac
        # twice as fast gets twice the share at equal scores). A zero still gets a tiny
        # weight: it stays a failover.
        keys = [self._random.random() ** (1.0 / max(t * e.weight, 1e-6))
                for t, e in zip(totals, endpoints, strict=True)]
        return [endpoints[i] for i in sorted(range(len(endpoints)), key=lambda i: -keys[i])]


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
    picker: Picker = field(default_factory=MaxScorePicker)

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
        ranked = self.picker.order(request, survivors, totals)
        for weighted in self.scorers:
            weighted.scorer.picked(request, ranked)
        return ranked
