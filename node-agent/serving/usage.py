"""How often each model is asked for: request counts that fade with time, kept across unloads.

Cost-aware eviction (`operations.eviction`) keeps the models that would cost most to be
without; how often a model is asked for is half of that. A plain count would let last
week's favourite squat forever, so each count halves every `half_life` seconds. Counts
are kept by model name after a model is unloaded, so a rare model that was just loaded
again does not look as popular as one used all day (bounded: the least used names go).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

MAX_NAMES = 1024


def decayed(uses: float, at: float, now: float, half_life: float) -> float:
    """`uses` counted at time `at`, as seen at `now`: halved every `half_life` seconds."""
    if half_life <= 0 or now <= at:
        return uses
    return uses * math.pow(0.5, (now - at) / half_life)


@dataclass
class _Count:
    uses: float
    at: float


class UsageCounts:
    def __init__(self, half_life: float = 600.0) -> None:
        self.half_life = half_life
        self._counts: dict[str, _Count] = {}

    def used(self, name: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        count = self._counts.get(name)
        if count is None:
            if len(self._counts) >= MAX_NAMES:
                del self._counts[min(self._counts, key=lambda n: self.uses(n, now))]
            count = self._counts[name] = _Count(0.0, now)
        count.uses = decayed(count.uses, count.at, now, self.half_life) + 1.0
        count.at = now

    def uses(self, name: str, now: float | None = None) -> float:
        """Requests for `name`, decayed to `now` (0 for a name never asked for)."""
        count = self._counts.get(name)
        if count is None:
            return 0.0
        return decayed(count.uses, count.at, time.monotonic() if now is None else now, self.half_life)
