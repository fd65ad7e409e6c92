"""The endpoints of a pool after placement and probing: data shared by the pure modules.

`tables` turns them into the routing table, `statuses` into the pool status.
Probing itself (I/O) lives in `probing`, which produces `ProbeResult`s.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from mlxpool.operator.placement import NodeView


@dataclass(frozen=True)
class ProbeResult:
    """One health probe of an agent. The message is stable across identical failures,
    so a repeated failure does not count as a change."""

    healthy: bool
    message: str = ""


NOT_PROBED = ProbeResult(False, "not probed yet")


@dataclass(frozen=True)
class PlacedEndpoint:
    """A node chosen for a pool, with the pool models it serves and its last probe."""

    node: str
    url: str
    models: tuple[str, ...]
    probe: ProbeResult

    @property
    def healthy(self) -> bool:
        return self.probe.healthy


def placed_endpoints(
    chosen: Sequence[NodeView], model_names: Collection[str], probes: Mapping[str, ProbeResult]
) -> list[PlacedEndpoint]:
    """One entry per chosen node (by name), listing only the pool's models it serves."""
    return [
        PlacedEndpoint(
            node=n.name,
            url=n.endpoint,
            models=tuple(sorted(n.models & set(model_names))),
            probe=probes.get(n.name, NOT_PROBED),
        )
        for n in sorted(chosen, key=lambda n: n.name)
    ]
