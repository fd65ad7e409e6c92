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

Residency tiers (`agentapi.ModelTier`): with parking on (`multi_model.park`), a slot is
made by parking an active model (its engine released, its weights kept: a request wakes it
in milliseconds), and memory by dropping models out of memory (parked ones and active
ones alike, by the same worth: an active one passes through parked on its way out). So a
model goes down one tier at a time, and the slots (`max_models`, engines) and the memory
budget (weights, active or parked) are decided apart. Without parking, a slot is made by
dropping, as before.

It does no I/O and keeps no state, so the tables in
tests/agent/operations/test_eviction.py are its whole specification; `replay` runs a
trace of requests through it, which is how the benchmark compares policies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from mlxpool.agent.serving.usage import UsageCounts
from mlxpool.agentapi import ModelTier


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
    tier: ModelTier = ModelTier.ACTIVE
    """ACTIVE (holds an engine slot) or PARKED (weights in memory only)."""
    wake_seconds: float = 0.0
    """What waking it from parked would cost: its bytes over the measured wake rate."""
    anchored: bool = False
    """LoRA adapters run over its weights: it may be parked, never dropped out of memory."""

    @property
    def worth(self) -> float:
        """Expected cost of being without it: how often it is asked for times the cost of bringing it back."""
        return self.uses * self.reload_seconds

    @property
    def active_worth(self) -> float:
        """Expected cost of parking it: how often it is asked for times the cost of waking it."""
        return self.uses * self.wake_seconds


class Shortage(StrEnum):
    SLOTS = "slots"
    MEMORY = "memory"


@dataclass(frozen=True)
class Refusal:
    shortage: Shortage
    message: str


@dataclass(frozen=True)
class Admission:
    """Evict `victims` out of memory (in this order) and park `parked`, then load; or, if
    `refusal`, do not load."""

    victims: tuple[str, ...] = ()
    refusal: Refusal | None = None
    parked: tuple[str, ...] = ()

    @property
    def admitted(self) -> bool:
        return self.refusal is None


def eviction_order(residents: Sequence[Resident], order: Order = Order.LRU, *,
                   parking: bool = False) -> list[Resident]:
    """Evictable models, first to go first. LRU: least recently used, then larger, then by name;
    cost: least worth keeping (`Resident.worth`, or `active_worth` when `parking`: what waking
    it would cost), then parked before active, then least recently used."""
    evictable = [r for r in residents if not r.pinned and not r.busy and not r.kept_alive]
    if order is Order.COST:
        return sorted(evictable, key=lambda r: (r.active_worth if parking else r.worth,
                                                r.tier is ModelTier.ACTIVE, r.last_used, -r.memory_bytes, r.name))
    return sorted(evictable, key=lambda r: (r.last_used, -r.memory_bytes, r.name))


def admit(
    residents: Sequence[Resident], need_bytes: int, *, max_models: int,
    budget_bytes: int | None, evict: bool = True, order: Order = Order.LRU, park: bool = False,
) -> Admission:
    """Make room for one model of `need_bytes` (budget None: memory is not limited) in an engine
    slot. `residents` are the models in memory, active or parked; `max_models` bounds the active
    ones. With `park`, a slot is made by parking an active model rather than dropping it."""
    if budget_bytes is not None and need_bytes > budget_bytes:
        return Admission(refusal=Refusal(Shortage.MEMORY, (
            f"the model needs {_size(need_bytes)}, more than this node's whole memory budget "
            f"of {_size(budget_bytes)}"
        )))
    active = [r for r in residents if r.tier is ModelTier.ACTIVE]
    slots_short = len(active) + 1 - max_models
    used = sum(r.memory_bytes for r in residents)
    bytes_short = 0 if budget_bytes is None else used + need_bytes - budget_bytes
    victims: list[str] = []
    parked: list[str] = []
    # Memory first: each victim leaves memory (an active one frees its slot too).
    for candidate in eviction_order([r for r in residents if not r.anchored], order) if evict else []:
        if bytes_short <= 0:
            break
        victims.append(candidate.name)
        bytes_short -= candidate.memory_bytes
        slots_short -= candidate.tier is ModelTier.ACTIVE
    # Then slots: park (or drop) the active models least worth keeping active.
    rest = [r for r in active if r.name not in victims]
    for candidate in eviction_order(rest, order, parking=park) if evict else []:
        if slots_short <= 0:
            break
        (parked if park else victims).append(candidate.name)
        slots_short -= 1
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
    return Admission(victims=tuple(victims), parked=tuple(parked))


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
    """Models read from their files (page cache or disk) into memory."""
    loads_by_model: dict[str, int]
    requests_by_model: dict[str, int]
    wakes: int = 0
    """Parked models woken (weights already in memory: milliseconds, not a load)."""

    def load_share_below(self, traffic_share: float) -> float:
        """The share of loads made for models with less than `traffic_share` of the requests."""
        total = sum(self.requests_by_model.values())
        rare = {m for m, n in self.requests_by_model.items() if n < traffic_share * total}
        return sum(n for m, n in self.loads_by_model.items() if m in rare) / self.loads if self.loads else 0.0


def replay(trace: Iterable[str], reload_seconds: dict[str, float], *, max_models: int, order: Order,
           half_life: float = 600.0, interval: float = 1.0, memory_models: int | None = None,
           wake_seconds: dict[str, float] | None = None) -> Replay:
    """How many loads serving `trace` (model names, one request every `interval` seconds) takes
    on a node with `max_models` engine slots, evicting in `order`; usage is remembered across
    unloads. `memory_models`: how many models' weights fit in memory (None: `max_models`, no
    parking); more than `max_models` parks the ones that lose their slot."""
    room = max_models if memory_models is None else memory_models
    park = room > max_models
    wake = wake_seconds or {}
    resident: dict[str, Resident] = {}
    usage = UsageCounts(half_life)
    loads: dict[str, int] = {}
    requests: dict[str, int] = {}
    wakes = 0
    for step, name in enumerate(trace):
        now = step * interval
        usage.used(name, now)
        requests[name] = requests.get(name, 0) + 1
        current = resident.get(name)
        if current is None or current.tier is ModelTier.PARKED:
            seen = [replace(r, uses=usage.uses(r.name, now)) for r in resident.values() if r.name != name]
            # Each model is one byte: the budget counts models; a parked one being woken needs none.
            decision = admit(seen, 0 if current else 1, max_models=max_models, budget_bytes=room, order=order,
                             park=park)
            for victim in decision.victims:
                del resident[victim]
            for parked in decision.parked:
                resident[parked] = replace(resident[parked], tier=ModelTier.PARKED)
            if current is None:
                loads[name] = loads.get(name, 0) + 1
            else:
                wakes += 1
        resident[name] = Resident(name, 1, now, reload_seconds=reload_seconds.get(name, 1.0),
                                  wake_seconds=wake.get(name, 0.001))
    return Replay(sum(loads.values()), loads, requests, wakes)


def fewest_loads(trace: Sequence[str], room: int) -> int:
    """Belady's bound: the fewest loads any policy could make for `trace` with `room` models in
    memory (evict the one asked for again furthest ahead). No online policy does better."""
    next_use: list[int] = [0] * len(trace)
    upcoming: dict[str, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        next_use[i] = upcoming.get(trace[i], len(trace))
        upcoming[trace[i]] = i
    held: dict[str, int] = {}
    loads = 0
    for i, name in enumerate(trace):
        if name not in held:
            loads += 1
            if len(held) >= room:
                del held[max(held, key=lambda m: held[m])]
        held[name] = next_use[i]
    return loads
