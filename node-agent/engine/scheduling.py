"""The waiting queue: which accepted requests enter the batch when slots free up.

The order, most urgent first:
1. by tier, aged: a request's group is its tier's rank (critical 0 .. background 4)
   minus one per `aging_seconds` it has waited, without floor, so after
   (rank + 1) x aging_seconds a request is ahead of every request arriving from then
   on, critical ones included: no tier starves (the bound is in docs/scheduling.md);
2. inside a group, the requests whose time-to-first-token deadline is near (closer
   than their predicted prefill plus `edf_slack`, and still reachable), earliest
   deadline first;
3. then the others, shared fairly between tenants (weighted fair queuing on tokens:
   the tenant whose served tokens over its weight are least goes next), each
   tenant's own requests shortest predicted job first, aged by their wait (the key is
   arrival + predicted duration, so a long job is overtaken only by jobs that would
   finish before it).

Each tier may bound how many of its requests wait (`push` refuses the next one with
`errors.QueueFull`, the very error its client gets), and a waiting request may carry
a wait deadline: `expire(now)` takes out every request whose deadline has passed, so
the engine can fail them instead of running them late. `pop` takes the most urgent
requests that fit both the free batch slots and a budget of prompt tokens, stopping
at the first that does not fit: a long prompt is never overtaken by shorter, less
urgent ones.

Without `now` (and without predictions) the order is simply tier, then arrival.

Aging has a price under sustained overload: a tier whose backlog outgrows the machine
ages into the lane of the tiers above it, and its old requests then go ahead of fresh
critical ones. `lane_wait_bound` gives the longest wait a request can be accepted with
before that happens; admission refuses (429 `wait_bound`) a request of a tier with a
TTFT target predicted to wait longer, so its backlog stays out of the preempting
tier's lane. A prediction is only a prediction (more urgent requests keep arriving
after it), so such a request is also pushed with a `floor`: its aged group never goes
below the group just under the preempting lane, and the engine gives it a wait deadline
at its lane bound (it is refused then, not served in that lane). Tiers without a target
keep the aging guarantee instead: never refused for their wait, never starved.

Pure logic, no MLX, no clock of its own (the engine passes `now`); used from the
engine thread only. The queue is bounded, so `pop` orders it afresh each time
(O(n log n)) rather than keeping indexes that aging would invalidate.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from mlxpool.agent.errors import QueueFull
from mlxpool.priorities import Priority

T = TypeVar("T")

DEFAULT_AGING_S = 10.0
DEFAULT_EDF_SLACK_S = 0.2


def lane_wait_bound(priority: Priority, aging_s: float, preempting: Iterable[Priority], *,
                    has_target: bool) -> tuple[float, Priority] | None:
    """The longest wait for a slot a request of `priority` is accepted with, and the lane
    it would age into past it: that of the most urgent tier that may preempt. A request
    of rank r waiting w seconds ranks with tier r - floor(w / aging_s), so it reaches lane
    l after (r - l) x aging_s. None: no preempting tier above it, or it has no TTFT target
    (then it keeps the aging guarantee)."""
    lanes = [p for p in preempting if p.rank < priority.rank]
    if not has_target or not lanes:
        return None
    lane = min(lanes, key=lambda p: p.rank)
    return (priority.rank - lane.rank) * aging_s, lane


def lane_floor(wait_bound: tuple[float, Priority] | None) -> int | None:
    """The lowest aged group of a request with this wait bound (`lane_wait_bound`): the group
    just under the preempting lane, so that it never ranks with that tier's requests."""
    return None if wait_bound is None else wait_bound[1].rank + 1


@dataclass(frozen=True, slots=True)
class Forecast:
    """What the scheduler predicts of a waiting request (the engine's `SpeedModel` fills it in)."""

    arrival: float = 0.0
    """`time.monotonic()` of its arrival: aging and the shortest-job key start there."""
    ttft_deadline: float | None = None
    """When its first token is due (arrival + its tier's target, or its own deadline)."""
    prefill_s: float = 0.0
    duration_s: float = 0.0
    """Predicted time from admission to its last token."""
    tokens: float = 1.0
    """Its cost in the fair share: prompt tokens plus the tokens it is expected to produce."""
    tenant: str = "anonymous"


@dataclass(frozen=True, slots=True)
class _Waiting(Generic[T]):
    seq: int
    item: T
    priority: Priority
    deadline: float | None
    forecast: Forecast
    weight: int = 0
    floor: int | None = None
    """The lowest aged group it may reach (None: no bound, the aging guarantee)."""


class PriorityAdmission(Generic[T]):
    """Waiting items keyed by request id, ordered as the module says."""

    def __init__(self, max_waiting: Mapping[Priority, int] | None = None, *,
                 aging_s: float = DEFAULT_AGING_S, edf_slack_s: float = DEFAULT_EDF_SLACK_S,
                 tenant_weights: Mapping[str, float] | None = None) -> None:
        if aging_s <= 0 or edf_slack_s < 0:
            raise ValueError("aging_s must be > 0 and edf_slack_s >= 0")
        self._max_waiting = dict(max_waiting or {})
        self.aging_s = aging_s
        self.edf_slack_s = edf_slack_s
        self._weights = dict(tenant_weights or {})
        self._waiting: dict[str, _Waiting[T]] = {}
        self._deadlines: list[tuple[float, int, str]] = []  # (deadline, seq, request id)
        self._seqs = itertools.count()
        self._counts: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self._tenants: dict[tuple[Priority, str], int] = {}
        """Waiting requests per (tier, tenant)."""
        self._served: dict[tuple[Priority, str], float] = {}
        """Fair-share virtual time of each tenant with requests waiting in a tier: tokens over weight."""
        self.weight_total = 0
        """Sum of the `weight` of the waiting items (the engine's: their prompt tokens)."""

    # ---- changes ----

    def push(self, request_id: str, item: T, priority: Priority = Priority.NORMAL,
             deadline: float | None = None, *, over_limit: bool = False, limit: int | None = None,
             forecast: Forecast | None = None, weight: int = 0, floor: int | None = None) -> None:
        """Queue `item`; QueueFull if its tier is at its limit, ValueError on a duplicate id.

        `limit` is the tier's bound as the request's policy says (else the queue's own);
        `over_limit` skips it: for a request the caller admits at once, which does not
        really wait. `floor`: the lowest group its aging may reach (`lane_floor`).
        """
        if request_id in self._waiting:
            raise ValueError(f"request {request_id!r} is already waiting")
        if limit is None:
            limit = self._max_waiting.get(priority)
        if not over_limit and limit is not None and self._counts[priority] >= limit:
            raise QueueFull(priority, limit)
        forecast = forecast or Forecast()
        seq = next(self._seqs)
        self._waiting[request_id] = _Waiting(seq, item, priority, deadline, forecast, weight, floor)
        self._counts[priority] += 1
        self.weight_total += weight
        key = (priority, forecast.tenant)
        if key not in self._tenants:
            # A tenant (re)joining the tier starts level with those already waiting: no credit
            # saved up while it was away, no debt either.
            active = [v for (p, _), v in self._served.items() if p is priority]
            self._served[key] = min(active) if active else 0.0
        self._tenants[key] = self._tenants.get(key, 0) + 1
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, seq, request_id))

    def pop(self, free_slots: int, *, cost: Callable[[T], int] | None = None, budget: int | None = None,
            at_least_one: bool = False, now: float | None = None) -> list[T]:
        """Up to `free_slots` items to admit now, most urgent first, removed from the queue.

        With `cost` and `budget`, the items taken cost at most `budget` in all; the first
        item that would overrun it stops the pop (it stays first in line), unless it would
        be the only one taken and `at_least_one` is set.
        """
        taken: list[T] = []
        if free_slots <= 0 or not self._waiting:
            return taken
        spent = 0
        for request_id, entry in self._ordered(now):
            if len(taken) >= free_slots:
                break
            if cost is not None and budget is not None:
                price = cost(entry.item)
                if spent + price > budget and not (at_least_one and not taken):
                    break
                spent += price
            self._charge(entry)
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
            _, seq, request_id = heapq.heappop(self._deadlines)
            entry = self._waiting.get(request_id)
            if entry is None or entry.seq != seq:
                continue
            self._forget(request_id, entry)
            expired.append(entry.item)
        return expired

    def drain(self) -> list[T]:
        """Remove and return everything (engine stopping)."""
        items = [entry.item for entry in self._waiting.values()]
        self._waiting.clear()
        self._deadlines.clear()
        self._counts = dict.fromkeys(Priority, 0)
        self.weight_total = 0
        self._tenants.clear()
        self._served.clear()
        return items

    # ---- reading ----

    def counts(self) -> dict[Priority, int]:
        """Waiting items per tier (every tier listed)."""
        return dict(self._counts)

    def __len__(self) -> int:
        return len(self._waiting)

    def items(self) -> Iterator[tuple[T, Priority, Forecast]]:
        """Every waiting item with its tier and forecast (no order)."""
        return ((e.item, e.priority, e.forecast) for e in self._waiting.values())

    def ordered(self, now: float | None = None) -> list[T]:
        """The waiting items in the order `pop` would take them (nothing removed)."""
        return [entry.item for _, entry in self._ordered(now)]

    def group(self, priority: Priority, arrival: float, now: float | None, floor: int | None = None) -> int:
        """The aged tier group of a request: lower goes first; may go below 0 (older than any
        critical) unless `floor` bounds it."""
        if now is None:
            return priority.rank
        aged = priority.rank - math.floor(max(0.0, now - arrival) / self.aging_s)
        return aged if floor is None else max(min(floor, priority.rank), aged)

    # ---- the order ----

    def _ordered(self, now: float | None) -> Iterator[tuple[str, _Waiting[T]]]:
        groups: dict[int, list[tuple[str, _Waiting[T]]]] = {}
        for request_id, entry in self._waiting.items():
            group = self.group(entry.priority, entry.forecast.arrival, now, entry.floor)
            groups.setdefault(group, []).append((request_id, entry))
        for key in sorted(groups):
            members = groups[key]
            urgent = [m for m in members if self._urgent(m[1], now)]
            if urgent:
                urgent.sort(key=lambda m: (m[1].forecast.ttft_deadline, m[1].seq))
                yield from urgent
                chosen = {id(m[1]) for m in urgent}
                members = [m for m in members if id(m[1]) not in chosen]
            yield from self._fair(members)

    def _urgent(self, entry: _Waiting[T], now: float | None) -> bool:
        due = entry.forecast.ttft_deadline
        if now is None or due is None:
            return False
        slack = due - now - entry.forecast.prefill_s
        return 0 <= slack <= self.edf_slack_s

    def _fair(self, members: list[tuple[str, _Waiting[T]]]) -> Iterator[tuple[str, _Waiting[T]]]:
        """Weighted fair queuing between tenants; shortest (aged) job first inside each."""
        queues: dict[tuple[Priority, str], list[tuple[float, int, str, _Waiting[T]]]] = {}
        for request_id, entry in members:
            f = entry.forecast
            queues.setdefault((entry.priority, f.tenant), []).append(
                (f.arrival + f.duration_s, entry.seq, request_id, entry))
        for queue in queues.values():
            heapq.heapify(queue)
        virtual = {key: self._served.get(key, 0.0) for key in queues}
        turns = [(virtual[key] + queue[0][3].forecast.tokens / self._weight(key[1]), queue[0][1], key)
                 for key, queue in queues.items()]
        heapq.heapify(turns)
        while turns:
            finish, _, key = heapq.heappop(turns)
            queue = queues[key]
            _, _, request_id, entry = heapq.heappop(queue)
            yield request_id, entry
            virtual[key] = finish
            if queue:
                head = queue[0]
                heapq.heappush(turns, (finish + head[3].forecast.tokens / self._weight(key[1]), head[1], key))

    def _weight(self, tenant: str) -> float:
        return self._weights.get(tenant, 1.0)

    def _charge(self, entry: _Waiting[T]) -> None:
        key = (entry.priority, entry.forecast.tenant)
        self._served[key] = self._served.get(key, 0.0) + entry.forecast.tokens / self._weight(key[1])

    def _forget(self, request_id: str, entry: _Waiting[T]) -> None:
        del self._waiting[request_id]
        self._counts[entry.priority] -= 1
        self.weight_total -= entry.weight
        key = (entry.priority, entry.forecast.tenant)
        left = self._tenants[key] - 1
        if left:
            self._tenants[key] = left
        else:  # the tenant has nothing waiting in the tier: it rejoins level with the others
            del self._tenants[key]
            self._served.pop(key, None)
        # Keep the deadline heap from growing without bound when many entries leave out of order.
        if len(self._deadlines) > 64 and len(self._deadlines) > 4 * len(self._waiting):
            self._deadlines = [e for e in self._deadlines if self._live(e[2], e[1])]
            heapq.heapify(self._deadlines)

    def _live(self, request_id: str, seq: int) -> bool:
        entry = self._waiting.get(request_id)
        return entry is not None and entry.seq == seq
