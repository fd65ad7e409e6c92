"""Fast signals about endpoints: what this router observes, and what the agents report.

The operator owns health; these are what one router knows between two table revisions:
- its own observations: requests in flight, an EWMA of the time to first byte of
  streamed responses, when a connection to the endpoint last failed;
- the agent's own load report (`mlxpool.loadsignals`, polled every 50-200 ms by
  `polling`), with the monotonic time it arrived. A report older than `max_age` is
  not trusted: `load` then answers by the `StalePolicy` (treat the endpoint as
  saturated, or fall back to this router's own counts), llm-d's rule that data older
  than 200 ms means saturated.

Scorers and filters read them; the forwarder and the poller write them. Pure state
keyed by endpoint URL: no clock, no I/O (callers pass `now`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from mlxpool.loadsignals import ModelSignals
from mlxpool.router.settings import StalePolicy

__all__ = ["EndpointSignal", "EndpointSignals", "Freshness", "LoadView", "StalePolicy"]


class Breaker(enum.Enum):
    """Circuit-breaker state of one endpoint."""

    CLOSED = "closed"
    OPEN = "open"
    """Tripped: no request is sent until `open_seconds` have passed."""
    HALF_OPEN = "half_open"
    """The open time is over: one probe request may go; its outcome closes or re-opens."""


class Freshness(enum.Enum):
    FRESH = "fresh"
    STALE = "stale"
    """A report arrived once but is older than the bound (the poller cannot reach the agent)."""
    NONE = "none"
    """No report yet, or the agent serves no signals (an older agent): local counts only."""


@dataclass(frozen=True)
class LoadView:
    """What a scorer may trust about one endpoint's model now."""

    freshness: Freshness
    report: ModelSignals | None = None
    """The agent's figures for the model, only when fresh."""
    saturated: bool = False
    """Treat as full: stale under `StalePolicy.SATURATED`, or the agent is draining."""


@dataclass
class EndpointSignal:
    in_flight: int = 0
    """Requests this router has sent to the endpoint and not finished relaying."""

    first_byte_ewma: float | None = None
    """Smoothed seconds to the first byte of streamed responses; None until measured."""

    connect_failed_at: float | None = None
    """Monotonic time of the last connection failure; cleared by the next success."""

    reported: dict[str, ModelSignals] | None = None
    """The agent's last load report, by model; None before the first."""
    reported_at: float | None = None
    """Monotonic time that report arrived."""
    draining: bool = False
    """The last report said the agent is draining."""

    failures: int = 0
    """Consecutive failed attempts (connect, timeout, 5xx, protocol) since the last success."""
    opened_at: float | None = None
    """Monotonic time the breaker last tripped; None while closed."""
    probing: bool = False
    """A half-open probe is in flight."""


class EndpointSignals:
    """Signals of every endpoint the router has talked to, by URL."""

    def __init__(self, ewma_alpha: float = 0.3, max_age: float = 0.5,
                 stale_policy: StalePolicy = StalePolicy.SATURATED, breaker_failures: int = 3,
                 breaker_open_seconds: float = 5.0) -> None:
        if not 0 < ewma_alpha <= 1:
            raise ValueError("ewma_alpha must be in (0, 1]")
        if breaker_failures < 1 or breaker_open_seconds <= 0:
            raise ValueError("breaker_failures must be >= 1 and breaker_open_seconds positive")
        self.breaker_failures = breaker_failures
        self.breaker_open_seconds = breaker_open_seconds
        if max_age <= 0:
            raise ValueError("max_age must be positive")
        self.ewma_alpha = ewma_alpha
        self.max_age = max_age
        self.stale_policy = stale_policy
        self._by_url: dict[str, EndpointSignal] = {}

    def get(self, url: str) -> EndpointSignal:
        """The endpoint's signals (all empty for an endpoint never seen)."""
        return self._by_url.get(url) or EndpointSignal()

    def _entry(self, url: str) -> EndpointSignal:
        return self._by_url.setdefault(url, EndpointSignal())

    def started(self, url: str) -> None:
        self._entry(url).in_flight += 1

    def finished(self, url: str) -> None:
        entry = self._entry(url)
        entry.in_flight = max(0, entry.in_flight - 1)
        entry.probing = False  # a probe that ended without an outcome (cancelled) frees the half-open slot

    def observe_first_byte(self, url: str, seconds: float) -> None:
        entry = self._entry(url)
        previous = entry.first_byte_ewma
        entry.first_byte_ewma = seconds if previous is None else previous + self.ewma_alpha * (seconds - previous)

    def connect_failed(self, url: str, now: float) -> None:
        self._entry(url).connect_failed_at = now

    def connected(self, url: str) -> None:
        entry = self._by_url.get(url)
        if entry is not None:
            entry.connect_failed_at = None

    def report(self, url: str, models: dict[str, ModelSignals], draining: bool, now: float) -> None:
        """Store the agent's load report, received at `now`."""
        entry = self._entry(url)
        entry.reported, entry.reported_at, entry.draining = models, now, draining

    def age(self, url: str, now: float) -> float | None:
        """Seconds since the endpoint's last report; None if it never reported."""
        at = self.get(url).reported_at
        return None if at is None else max(now - at, 0.0)

    def load(self, url: str, model: str, now: float) -> LoadView:
        """The endpoint's report for `model` if fresh; else what the stale policy says."""
        entry = self.get(url)
        age = self.age(url, now)
        if age is None or entry.reported is None:
            return LoadView(Freshness.NONE)
        if age > self.max_age:
            return LoadView(Freshness.STALE, saturated=self.stale_policy is StalePolicy.SATURATED)
        # A fresh report without the model: the agent does not (yet) serve it: saturated.
        report = entry.reported.get(model)
        return LoadView(Freshness.FRESH, report, saturated=entry.draining or report is None)

    def urls(self) -> list[str]:
        return list(self._by_url)

    # ---- circuit breaker: closed -> open (N failures in a row, or a refused connection)
    # -> half-open after open_seconds (one probe) -> closed on success / open on failure.

    def breaker(self, url: str, now: float) -> Breaker:
        entry = self.get(url)
        if entry.opened_at is None:
            return Breaker.CLOSED
        if now - entry.opened_at < self.breaker_open_seconds:
            return Breaker.OPEN
        return Breaker.HALF_OPEN

    def admits(self, url: str, now: float) -> bool:
        """Whether the breaker lets a request through now (half-open: only while no probe is out)."""
        state = self.breaker(url, now)
        return state is Breaker.CLOSED or (state is Breaker.HALF_OPEN and not self.get(url).probing)

    def attempting(self, url: str, now: float) -> None:
        """A request is being sent: through a half-open breaker, it is the probe."""
        if self.breaker(url, now) is Breaker.HALF_OPEN:
            self._entry(url).probing = True

    def succeeded(self, url: str) -> None:
        entry = self._by_url.get(url)
        if entry is not None:
            entry.failures, entry.opened_at, entry.probing = 0, None, False
            entry.connect_failed_at = None

    def failed(self, url: str, now: float, *, trip: bool = False) -> bool:
        """Count a failed attempt; True when this trips (or re-trips) the breaker."""
        entry = self._entry(url)
        half_open = self.breaker(url, now) is Breaker.HALF_OPEN
        entry.failures += 1
        entry.probing = False
        if trip or half_open or entry.failures >= self.breaker_failures:
            entry.opened_at = now
            return True
        return False

    def retain(self, urls: Iterable[str]) -> None:
        """Forget endpoints that left the table, except those with requests still in flight."""
        keep = set(urls)
        self._by_url = {u: s for u, s in self._by_url.items() if u in keep or s.in_flight > 0}
