"""Request priorities (SLA tiers), shared by the router and the agent's scheduler.

A request names its tier in the body field `priority` or the header `x-priority`.
Lower `rank` is served first.
"""

from __future__ import annotations

from enum import Enum

PRIORITY_HEADER = "x-priority"


class Priority(str, Enum):
    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"
    BACKGROUND = "background"

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {p: i for i, p in enumerate(Priority)}
