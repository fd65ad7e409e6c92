"""Which resident models make room for one more: the model manager's admission policy.

Pure: given what is resident, what the newcomer needs, and the node's limits (a
count, `multi_model.max_models`, and a memory budget), it answers either the models
to evict, least recently used first, or a refusal that says what blocks the load.
Only idle, unpinned, ready models are ever evicted; a model that is loading,
serving a request or pinned stays. It does no I/O and keeps no state, so the table
of cases in tests/agent/operations/test_eviction.py is its whole specification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class Resident:
    """A model that holds (or is about to hold) a slot and memory on this node."""

    name: str
    memory_bytes: int
    last_used: float
    """Monotonic time of its last request (or of becoming ready if none yet)."""
    pinned: bool = False
    busy: bool = False
    """Requests in flight, or not ready yet (loading, warming): never evicted."""


class Shortage(StrEnum):
    SLOTS = "slots"
    MEMORY = "memory"


@dataclass(frozen=True)
class Refusal:
    shortage: Shortage
    message: str


@dataclass(frozen=True)
class Admission:
    """Evict `victims` (in this order), then load; or, if `refusal`, do not load."""

    victims: tuple[str, ...] = ()
    refusal: Refusal | None = None

    @property
    def admitted(self) -> bool:
        return self.refusal is None


def eviction_order(residents: Sequence[Resident]) -> list[Resident]:
    """Evictable models, first to go first: least recently used, then larger, then by name."""
    evictable = [r for r in residents if not r.pinned and not r.busy]
    return sorted(evictable, key=lambda r: (r.last_used, -r.memory_bytes, r.name))


def admit(
    residents: Sequence[Resident], need_bytes: int, *, max_models: int,
    budget_bytes: int | None, evict: bool = True,
) -> Admission:
    """Make room for one model of `need_bytes` (budget None: memory is not limited)."""
    if budget_bytes is not None and need_bytes > budget_bytes:
        return Admission(refusal=Refusal(Shortage.MEMORY, (
            f"the model needs {_size(need_bytes)}, more than this node's whole memory budget "
            f"of {_size(budget_bytes)}"
        )))
    slots_short = len(residents) + 1 - max_models
    used = sum(r.memory_bytes for r in residents)
    bytes_short = 0 if budget_bytes is None else used + need_bytes - budget_bytes
    victims: list[str] = []
    for candidate in eviction_order(residents) if evict else []:
        if slots_short <= 0 and bytes_short <= 0:
            break
        victims.append(candidate.name)
        slots_short -= 1
        bytes_short -= candidate.memory_bytes
    if slots_short > 0:
        return Admission(refusal=Refusal(Shortage.SLOTS, (
            f"this node holds its maximum of {max_models} model(s) and none can be evicted"
            f"{_blockers(residents, evict)}"
        )))
    if budget_bytes is not None and bytes_short > 0:
        return Admission(refusal=Refusal(Shortage.MEMORY, (
            f"the model needs {_size(need_bytes)} but only {_size(max(budget_bytes - used, 0))} of the "
            f"{_size(budget_bytes)} memory budget is free and not enough can be evicted"
            f"{_blockers(residents, evict)}"
        )))
    return Admission(victims=tuple(victims))


def _blockers(residents: Sequence[Resident], evict: bool) -> str:
    if not evict:
        return " (eviction is off: multi_model.eviction is 'none')"
    pinned = sorted(r.name for r in residents if r.pinned)
    busy = sorted(r.name for r in residents if r.busy and not r.pinned)
    parts = [f"pinned: {', '.join(pinned)}"] if pinned else []
    parts += [f"busy or loading: {', '.join(busy)}"] if busy else []
    return f" ({'; '.join(parts)})" if parts else ""


def _size(n: int) -> str:
    """Bytes for people: '512 B', '3.2 MiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
