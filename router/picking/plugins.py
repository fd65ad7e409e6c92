"""The plugin interface of endpoint picking (Gateway API inference-extension style).

A pick runs filters (drop endpoints), then scorers (give each survivor a score in
[0, 1]), then a picker that orders survivors by the weighted sum of scores. Each plugin
is a small class with a `type_name`, a strict pydantic `Params` model and synchronous,
I/O-free methods, so one pick is atomic on the event loop and testable alone.

This module holds only the interface; the plugins live in `filters` and `scorers`, the
registry and the named profiles in `profiles`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from mlxpool.priorities import Priority
from mlxpool.router.picking.signals import EndpointSignals
from mlxpool.routing import RouteEndpoint


@dataclass(frozen=True)
class PickRequest:
    """What plugins may know about the request being placed."""

    model: str
    prompt: str = ""
    """The prompt text (completions) or concatenated message contents (chat): for prefix affinity."""
    priority: Priority | None = None
    now: float = 0.0
    """Monotonic time of the pick, so plugins never read a clock."""
    session: str | None = None
    """The conversation the request belongs to (`x-session-id`), for session affinity."""


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin(ABC):
    """Base of filters and scorers: a registered type name and typed parameters."""

    type_name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = params if params is not None else self.Params()


class Filter(Plugin):
    """Drops endpoints that must not take the request."""

    @abstractmethod
    def filter(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[RouteEndpoint]:
        """The endpoints that stay, in their given order."""


class Scorer(Plugin):
    """Scores each endpoint in [0, 1]; higher is better."""

    @abstractmethod
    def score(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[float]:
        """One score per endpoint, in the order given."""

    def picked(self, request: PickRequest, ranked: Sequence[RouteEndpoint]) -> None:
        """Called once the pipeline has ranked `ranked` (first = chosen); for stateful scorers."""


class Picker(Plugin):
    """Orders the survivors from their total scores: the first is sent the request, the rest are failover."""

    @abstractmethod
    def order(self, request: PickRequest, endpoints: Sequence[RouteEndpoint], totals: Sequence[float],
              ) -> list[RouteEndpoint]:
        """Every endpoint given, best first."""


def spread(values: Sequence[float], *, higher_is_better: bool) -> list[float]:
    """Min-max normalise `values` into [0, 1] (all equal → all 1.0), the scorers' common scale."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi == lo:
        return [1.0] * len(values)
    if higher_is_better:
        return [(v - lo) / (hi - lo) for v in values]
    return [(hi - v) / (hi - lo) for v in values]
