"""Which resident models make room for one more: the model manager's admission policy.

Pure: given what is resident, what the newcomer needs, and the node's limits (a
count, `multi_model.max_models`, and a memory budget), it answers either the models
to evict, in order, or a refusal that says what blocks the load. Only idle, unpinned,
ready models past their keep-alive are ever evicted; a model that is loading, serving a
request, pinned or kept alive stays.

In which order (`multi_model.eviction`):
- `cost` (the default): cheapest to be without first. A model's worth keeping is how
  often it is asked for (a request count that halves every `usage_half_life`, so old
  popularity fades; remembered across unloads, so a rare model that was just loaded
  does not look as good as a popular one) times what bringing it back costs (its bytes
  over the measured load rate of the tier it would come back from). Plain LRU throws
  out a popular model for one that served a single request, then loads it again;
  this keeps the popular ones and lets the rare ones take turns.
- `lru`: least recently used first (for comparison, and what it was).

It does no I/O and keeps no state, so the tables in
tests/agent/operations/test_eviction.py are its whole specification; `replay` runs a
trace of requests through it, which is how the benchmark compares policies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from mlxpool.agent.serving.usage import UsageCounts


class Order(StrEnum):
    COST = "cost"
    LRU = "lru"


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
    uses: float = 0.0
    """Requests for it, decayed to now (`decayed`)."""
    reload_seconds: float = 0.0
    """What bringing it back would cost: its bytes over the measured load rate of its next tier."""
    kept_alive: bool = False
    """Used within its keep-alive: not evicted yet."""

    @property
    def worth(self) -> float:
        """Expected cost of being without it: how often it is asked for times the cost of bringing it back."""
        return self.uses * self.reload_seconds


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


def eviction_order(residents: Sequence[Resident], order: Order = Order.LRU) -> list[Resident]:
    """Evictable models, first to go first. LRU: least recently used, then larger, then by name;
    cost: least worth keeping (`Resident.worth`), then least recently used."""
    evictable = [r for r in residents if not r.pinned and not r.busy and not r.kept_alive]
    if order is Order.COST:
        return sorted(evictable, key=lambda r: (r.worth, r.last_used, -r.memory_bytes, r.name))
    return sorted(evictable, key=lambda r: (r.last_used, -r.memory_bytes, r.name))


def admit(
    residents: Sequence[Resident], need_bytes: int, *, max_models: int,
    budget_bytes: int | None, evict: bool = True, order: Order = Order.LRU,
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
    for candidate in eviction_order(residents, order) if evict else []:
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
    alive = sorted(r.name for r in residents if r.kept_alive and not r.busy and not r.pinned)
    parts = [f"pinned: {', '.join(pinned)}"] if pinned else []
    parts += [f"busy or loading: {', '.join(busy)}"] if busy else []
    parts += [f"within keep-alive: {', '.join(alive)}"] if alive else []
    return f" ({'; '.join(parts)})" if parts else ""


def _size(n: int) -> str:
    """Bytes for people: '512 B', '3.2 MiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@dataclass(frozen=True)
class Replay:
    loads: int
    loads_by_model: dict[str, int]
    requests_by_model: dict[str, int]


def replay(trace: Iterable[str], reload_seconds: dict[str, float], *, max_models: int, order: Order,
           half_life: float = 600.0, interval: float = 1.0) -> Replay:
    """How many loads serving `trace` (model names, one request every `interval` seconds) takes
    on a node holding `max_models`, evicting in `order`; usage is remembered across unloads."""
    resident: dict[str, Resident] = {}
    usage = UsageCounts(half_life)
    loads: dict[str, int] = {}
    requests: dict[str, int] = {}
    for step, name in enumerate(trace):
        now = step * interval
        usage.used(name, now)
        requests[name] = requests.get(name, 0) + 1
        if name not in resident:
            seen = [replace(r, uses=usage.uses(r.name, now)) for r in resident.values()]
            decision = admit(seen, 0, max_models=max_models, budget_bytes=None, order=order)
            for victim in decision.victims:
                del resident[victim]
            loads[name] = loads.get(name, 0) + 1
        resident[name] = Resident(name, 0, now, reload_seconds=reload_seconds.get(name, 1.0))
    return Replay(sum(loads.values()), loads, requests)
