"""Request priorities (SLA tiers), shared by the router and the agent's scheduler.

A request names its tier in the body field `priority` or the header `x-priority`.
Lower `rank` is served first. A request may also bound how long it waits for a batch
slot: the body field `deadline_ms` or the header `x-deadline-ms` (milliseconds).
"""

from __future__ import annotations

from enum import StrEnum

PRIORITY_HEADER = "x-priority"
DEADLINE_HEADER = "x-deadline-ms"
TENANT_HEADER = "x-tenant"
"""Names the request's tenant (fair share inside a tier) where `priority_scheduling.allow_tenant_header` is on."""


class Priority(StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"
    BACKGROUND = "background"

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {p: i for i, p in enumerate(Priority)}
