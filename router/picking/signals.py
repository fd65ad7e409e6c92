"""Fast local signals about endpoints, observed by this router alone.

The operator owns health; these are what one router sees between two table revisions:
requests in flight, an EWMA of the time to first byte of streamed responses, and when
a connection to the endpoint last failed. Scorers and filters read them; the forwarder
writes them. Pure state keyed by endpoint URL: no clock, no I/O (callers pass `now`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class EndpointSignal:
    in_flight: int = 0
    """Requests this router has sent to the endpoint and not finished relaying."""

    first_byte_ewma: float | None = None
    """Smoothed seconds to the first byte of streamed responses; None until measured."""

    connect_failed_at: float | None = None
    """Monotonic time of the last connection failure; cleared by the next success."""


class EndpointSignals:
    """Signals of every endpoint the router has talked to, by URL."""

    def __init__(self, ewma_alpha: float = 0.3) -> None:
        if not 0 < ewma_alpha <= 1:
            raise ValueError("ewma_alpha must be in (0, 1]")
        self.ewma_alpha = ewma_alpha
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

    def retain(self, urls: Iterable[str]) -> None:
        """Forget endpoints that left the table, except those with requests still in flight."""
        keep = set(urls)
        self._by_url = {u: s for u, s in self._by_url.items() if u in keep or s.in_flight > 0}
