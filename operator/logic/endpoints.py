"""The endpoints of a pool after placement and probing: data shared by the pure modules.

`tables` turns them into the routing table, `statuses` into the pool status.
Probing itself (I/O) lives in `probing`, which produces `ProbeResult`s; `placement`
builds the endpoints from the nodes it chose.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeResult:
    """One health probe of an agent. The message is stable across identical failures,
    so a repeated failure does not count as a change."""

    healthy: bool
    message: str = ""
    timed_out: bool = False
    """No answer in time: maybe a dead agent, maybe a busy one (monitors want two in a row)."""


NOT_PROBED = ProbeResult(False, "not probed yet")


@dataclass(frozen=True)
class PlacedEndpoint:
    """A node chosen for a pool: the pool models it serves, those it does not serve yet,
    and its last probe."""

    node: str
    url: str
    models: tuple[str, ...]
    probe: ProbeResult
    pending: tuple[str, ...] = ()
    """Pool models this node does not serve yet (loading, or waiting for their copy)."""
    managed: tuple[str, ...] = ()
    """Pool models the operator loaded here (it unloads them when no pool needs them)."""
    capacities: tuple[tuple[str, float | None], ...] = ()
    """(model, decode tokens/s measured or estimated; None if unknown), for the route weights."""

    @property
    def healthy(self) -> bool:
        return self.probe.healthy

    @property
    def ready(self) -> bool:
        """Healthy and serving every model of the pool."""
        return self.healthy and not self.pending
