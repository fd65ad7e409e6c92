"""Scorer plugins: each endpoint gets a score in [0, 1], higher is better.

- `weighted-round-robin`: smooth weighted round-robin (nginx's), per model; the only
  stateful scorer, it advances in `picked`.
- `least-in-flight`: fewer requests in flight from this router scores higher.
- `low-latency`: a lower EWMA of time to first byte scores higher; unmeasured
  endpoints score as the best so they get measured.

A prefix-affinity scorer would hash `PickRequest.prompt` in blocks and score endpoints
by the longest prefix they were last sent; the interface already carries the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from mlxpool.router.plugins import PickRequest, Scorer, spread
from mlxpool.router.signals import EndpointSignals
from mlxpool.routing import RouteEndpoint


class WeightedRoundRobinScorer(Scorer):
    """Rotates over endpoints in proportion to their table weight, spreading each turn.

    Smooth weighted round-robin: each pick every endpoint's credit grows by its weight,
    the endpoint with most credit wins and pays back the total. The score is the credit
    after growth, normalised, so the ranking after the winner is the rotation order:
    exactly what failover should walk.
    """

    type_name = "weighted-round-robin"

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._credit: dict[str, dict[str, float]] = {}  # model -> url -> credit

    def _grown(self, model: str, endpoints: Sequence[RouteEndpoint]) -> list[float]:
        credit = self._credit.get(model, {})
        return [credit.get(e.url, 0.0) + e.weight for e in endpoints]

    def score(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[float]:
        return spread(self._grown(request.model, endpoints), higher_is_better=True)

    def picked(self, request: PickRequest, ranked: Sequence[RouteEndpoint]) -> None:
        grown = self._grown(request.model, ranked)
        credit = {e.url: c for e, c in zip(ranked, grown, strict=True)}
        # Endpoints missing from this pick (filtered out) restart from zero later.
        credit[ranked[0].url] -= sum(e.weight for e in ranked)
        self._credit[request.model] = credit


class LeastInFlightScorer(Scorer):
    """Prefers endpoints with fewer requests in flight from this router."""

    type_name = "least-in-flight"

    def score(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[float]:
        return spread([signals.get(e.url).in_flight for e in endpoints], higher_is_better=False)


class LowLatencyScorer(Scorer):
    """Prefers endpoints with a lower smoothed time to first byte."""

    type_name = "low-latency"

    def score(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[float]:
        measured = [signals.get(e.url).first_byte_ewma for e in endpoints]
        known = [m for m in measured if m is not None]
        if not known:
            return [1.0] * len(endpoints)
        best = min(known)
        return spread([best if m is None else m for m in measured], higher_is_better=False)
