"""The waiting queue: which accepted requests enter the batch when slots free up.

Ordered by priority tier (critical first), then arrival. Each tier may cap how many
of its requests wait (`push` refuses the next one with `errors.QueueFull`, the very
error its client gets), and a waiting request may carry a deadline: `expire(now)`
takes out every request whose deadline has passed, so the engine can fail them
instead of running them late. `pop` takes the most urgent requests that fit both the
free batch slots and a budget of prompt tokens, stopping at the first that does not
fit: a long prompt is never overtaken by shorter, less urgent ones.

Pure logic, no MLX, no clock of its own (the engine passes `now`); used from the
engine thread only. Removal is lazy: heap entries of requests that left are skipped
when they surface, so push, pop and remove stay O(log n).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from mlxpool.agent.errors import QueueFull
from mlxpool.priorities import Priority

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Waiting(Generic[T]):
    arrival: int
    item: T
    priority: Priority
    deadline: float | None
    weight: int = 0


class PriorityAdmission(Generic[T]):
    """Waiting items keyed by request id, served by (priority rank, arrival)."""

    def __init__(self, max_waiting: Mapping[Priority, int] | None = None) -> None:
        self._max_waiting = dict(max_waiting or {})
        self._waiting: dict[str, _Waiting[T]] = {}
        self._order: list[tuple[int, int, str]] = []  # (rank, arrival, request id)
        self._deadlines: list[tuple[float, int, str]] = []  # (deadline, arrival, request id)
        self._arrivals = itertools.count()
        self._counts: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self.weight_total = 0
        """Sum of the `weight` of the waiting items (the engine's: their prompt tokens)."""

    def push(self, request_id: str, item: T, priority: Priority = Priority.NORMAL,
             deadline: float | None = None, *, over_limit: bool = False, limit: int | None = None,
             weight: int = 0) -> None:
        """Queue `item`; QueueFull if its tier is at its limit, ValueError on a duplicate id.

        `limit` is the tier's bound as the request's policy says (else the queue's own);
        `over_limit` skips it: for a request the caller admits at once, which does not
        really wait.
        """
        if request_id in self._waiting:
            raise ValueError(f"request {request_id!r} is already waiting")
        if limit is None:
            limit = self._max_waiting.get(priority)
        if not over_limit and limit is not None and self._counts[priority] >= limit:
            raise QueueFull(priority, limit)
        arrival = next(self._arrivals)
        self._waiting[request_id] = _Waiting(arrival, item, priority, deadline, weight)
        self._counts[priority] += 1
        self.weight_total += weight
        heapq.heappush(self._order, (priority.rank, arrival, request_id))
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, arrival, request_id))

    def pop(self, free_slots: int, *, cost: Callable[[T], int] | None = None, budget: int | None = None,
            at_least_one: bool = False) -> list[T]:
        """Up to `free_slots` items to admit now, most urgent first, removed from the queue.

        With `cost` and `budget`, the items taken cost at most `budget` in all; the first
        item that would overrun it stops the pop (it stays first in line), unless it would
        be the only one taken and `at_least_one` is set.
        """
        taken: list[T] = []
        spent = 0
        while self._order and len(taken) < free_slots:
            _, arrival, request_id = self._order[0]
            entry = self._waiting.get(request_id)
            if entry is None or entry.arrival != arrival:  # left already
                heapq.heappop(self._order)
                continue
            if cost is not None and budget is not None:
                price = cost(entry.item)
                if spent + price > budget and not (at_least_one and not taken):
                    break
                spent += price
            heapq.heappop(self._order)
            self._forget(request_id, entry)
            taken.append(entry.item)
        return taken

    def remove(self, request_id: str) -> T | None:
        """Drop a waiting item (its client went away); None if it is not waiting."""
        entry = self._waiting.get(request_id)
        if entry is None:
            return None
        self._forget(request_id, entry)
        return entry.item

    def expire(self, now: float) -> list[T]:
        """Remove and return the items whose deadline is before `now`."""
        expired: list[T] = []
        while self._deadlines and self._deadlines[0][0] < now:
            _, arrival, request_id = heapq.heappop(self._deadlines)
            entry = self._waiting.get(request_id)
            if entry is None or entry.arrival != arrival:
                continue
            self._forget(request_id, entry)
            expired.append(entry.item)
        return expired

    def drain(self) -> list[T]:
        """Remove and return everything (engine stopping)."""
        items = [entry.item for entry in self._waiting.values()]
        self._waiting.clear()
        self._order.clear()
        self._deadlines.clear()
        self._counts = dict.fromkeys(Priority, 0)
        self.weight_total = 0
        return items

    def counts(self) -> dict[Priority, int]:
        """Waiting items per tier (every tier listed)."""
        return dict(self._counts)

    def __len__(self) -> int:
        return len(self._waiting)

    def _forget(self, request_id: str, entry: _Waiting[T]) -> None:
        del self._waiting[request_id]
        self._counts[entry.priority] -= 1
        self.weight_total -= entry.weight
        # Keep the heaps from growing without bound when many entries leave out of order.
        if len(self._order) > 64 and len(self._order) > 4 * len(self._waiting):
            self._order = [e for e in self._order if self._live(e[2], e[1])]
            heapq.heapify(self._order)
        if len(self._deadlines) > 64 and len(self._deadlines) > 4 * len(self._waiting):
            self._deadlines = [e for e in self._deadlines if self._live(e[2], e[1])]
            heapq.heapify(self._deadlines)

    def _live(self, request_id: str, arrival: int) -> bool:
        entry = self._waiting.get(request_id)
        return entry is not None and entry.arrival == arrival
