"""Admission decisions: how long a new request would wait, whether to refuse it at once,
and which running sequence to pause for an urgent one.

- `predicted_wait`: list scheduling over the batch slots. Each running sequence frees
  its slot after its predicted remaining time; the waiting requests that go before the
  new one (its tier and more urgent ones) then take the earliest free slots for their
  predicted durations; the new request gets the next free slot. Free slots count as
  free now. Its predicted time to first token is that wait plus its prefill.
- `shed`: a sheddable request whose predicted first token already misses its target is
  refused at once (429 with Retry-After = the predicted wait, rounded up), never left
  to time out: it was doomed on arrival.
- a request with a deadline (how long it may wait for a slot) that the predicted wait
  already passes is refused at once too (429 `deadline_unreachable`, Retry-After the
  predicted wait), whatever its tier, instead of waiting out its deadline for a 504.
- a request of a tier with a wait bound (`scheduling.lane_wait_bound`: how long it may
  wait before aging into a preempting tier's lane) predicted to wait longer is refused
  at once as well (429 `wait_bound`), so an overloaded tier's backlog never ages into
  the critical lane.
- `tier_waits` and `Outlook`: the predicted wait of a new request of every tier at once
  (one pass of the same list scheduling, tiers in order, bounded below by the serial
  prefill time of every prompt ahead: prompts are processed one forward pass at a time,
  not in parallel slots), which the engine thread
  publishes after each step so that `refusal` can answer a doomed request on the
  asyncio side without a round trip through the engine thread (429 in well under a
  step's time).
- `choose_victim`: when a request that may preempt would miss its target waiting for
  a slot, the running sequence to pause: a decoding one of a strictly lower tier, the
  lowest tier first, then the one with the most work left (it would hold its slot
  longest). None when no slot would be freed in time by preempting, or none qualifies.

Pure: no MLX, no clock (callers pass `now`), no engine state beyond the views given.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from mlxpool.priorities import Priority

MAX_RETRY_AFTER_S = 3600
"""Retry-After never says more than this (a prediction that far out is not worth trusting)."""


@dataclass(frozen=True, slots=True)
class RunningView:
    """A running sequence as admission sees it."""

    key: str
    priority: Priority
    remaining_s: float
    """Predicted time until it ends and frees its slot."""
    decoding: bool = True
    """Its prompt is processed (only those can be paused with their KV)."""
    preemptible: bool = True
    """False for one resumed very recently (pausing it again would thrash)."""


def predicted_wait(slots: int, running: Sequence[float], ahead: Iterable[float]) -> float:
    """Seconds until a slot is free for a new request.

    `running`: remaining seconds of each running sequence; `ahead`: predicted durations
    of the waiting requests that go before the new one, in the order they go.
    """
    if slots <= 0:
        return math.inf
    busy = sorted(max(0.0, r) for r in running)[:slots]
    free_at = [0.0] * (slots - len(busy)) + busy
    heapq.heapify(free_at)
    for duration in ahead:
        start = heapq.heappop(free_at)
        heapq.heappush(free_at, start + max(0.0, duration))
    return free_at[0]


def retry_after_seconds(wait_s: float) -> int:
    """The Retry-After of a refusal: the predicted wait, rounded up, at least 1."""
    if not math.isfinite(wait_s):
        return MAX_RETRY_AFTER_S
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(wait_s)))


def shed(sheddable: bool, ttft_target_s: float | None, wait_s: float, prefill_s: float) -> bool:
    """Whether to refuse at once: sheddable, with a target the predicted first token misses."""
    return sheddable and ttft_target_s is not None and wait_s + prefill_s > ttft_target_s


def choose_victim(priority: Priority, slack_s: float, free_slots: int, running: Sequence[RunningView]
                  ) -> RunningView | None:
    """The running sequence to pause for a request of `priority` that has `slack_s` seconds
    before it must start (its TTFT deadline minus its prefill, from now); None to wait."""
    if free_slots > 0:
        return None
    if running and min(r.remaining_s for r in running) <= max(0.0, slack_s):
        return None  # a slot frees in time anyway
    candidates = [r for r in running if r.decoding and r.preemptible and r.priority.rank > priority.rank]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.priority.rank, r.remaining_s))


def tier_waits(slots: int, running: Sequence[float], waiting: Iterable[tuple[Priority, float, float]],
               *, prefilling_s: float = 0.0) -> dict[Priority, float]:
    """`predicted_wait` of a new request of each tier: every waiting request of its tier and
    of more urgent ones goes before it (aging ignored: it only moves old requests up).

    `waiting`: (tier, predicted duration, serial prefill seconds) of each waiting request;
    `prefilling_s`: serial prefill seconds still to do for the running sequences whose
    prompts are not processed yet. Prefill is serial (one forward pass at a time, whatever
    the slots), so a new request's prompt starts no sooner than every prompt ahead of it is
    processed: each tier's wait is at least that sum, the list-scheduling wait otherwise
    (which treats the slots as parallel and so is far too short when prompts queue up)."""
    if slots <= 0:
        return dict.fromkeys(Priority, math.inf)
    busy = sorted(max(0.0, r) for r in running)[:slots]
    free_at = [0.0] * (slots - len(busy)) + busy
    heapq.heapify(free_at)
    by_rank: list[list[tuple[float, float]]] = [[] for _ in Priority]
    for priority, duration, prefill in waiting:
        by_rank[priority.rank].append((duration, prefill))
    waits: dict[Priority, float] = {}
    serial = max(0.0, prefilling_s)
    for priority in Priority:
        for duration, prefill in by_rank[priority.rank]:
            start = heapq.heappop(free_at)
            heapq.heappush(free_at, start + max(0.0, duration))
            serial += max(0.0, prefill)
        waits[priority] = max(free_at[0], serial)
    return waits


@dataclass(frozen=True, slots=True)
class Outlook:
    """The engine's queue as of its last step, for decisions off the engine thread."""

    waiting: Mapping[Priority, int] = field(default_factory=dict)
    """Requests waiting per tier."""
    wait_s: Mapping[Priority, float] = field(default_factory=dict)
    """Predicted wait for a slot of a request of each tier arriving now."""
    prefill_tps: float = 400.0
    """Prompt tokens per second, as measured."""


class RefusalReason(StrEnum):
    QUEUE_FULL = "queue_full"
    """Its tier already has as many requests waiting as allowed."""
    TARGET_UNREACHABLE = "target_unreachable"
    """Sheddable, and its predicted first token already misses its tier's target."""
    DEADLINE_UNREACHABLE = "deadline_unreachable"
    """Its predicted wait for a slot is already longer than its deadline allows."""
    WAIT_BOUND = "wait_bound"
    """Its predicted wait for a slot would age it into a preempting tier's lane."""


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: RefusalReason
    retry_after_s: int
    predicted_ttft_s: float
    limit: int | None = None


def refusal(outlook: Outlook, priority: Priority, *, pending: int, max_waiting: int | None,
            sheddable: bool, ttft_target_s: float | None, prompt_tokens: int,
            deadline_in_s: float | None = None, max_wait_s: float | None = None) -> Refusal | None:
    """Whether a new request must be refused at once, and the Retry-After it gets.

    `pending`: requests of its tier handed to the engine since the outlook was made;
    `deadline_in_s`: how long it may still wait for a slot (its deadline less now), if it has one;
    `max_wait_s`: its tier's wait bound, if it has one.
    """
    wait = outlook.wait_s.get(priority, 0.0)
    prefill = max(0, prompt_tokens) / outlook.prefill_tps if outlook.prefill_tps > 0 else 0.0
    if max_waiting is not None and outlook.waiting.get(priority, 0) + pending >= max_waiting and wait > 0:
        return Refusal(RefusalReason.QUEUE_FULL, retry_after_seconds(wait), wait + prefill, max_waiting)
    if deadline_in_s is not None and wait > max(0.0, deadline_in_s):
        return Refusal(RefusalReason.DEADLINE_UNREACHABLE, retry_after_seconds(wait), wait + prefill)
    if max_wait_s is not None and wait > max_wait_s:
        return Refusal(RefusalReason.WAIT_BOUND, retry_after_seconds(wait), wait + prefill)
    if shed(sheddable, ttft_target_s, wait, prefill):
        return Refusal(RefusalReason.TARGET_UNREACHABLE, retry_after_seconds(wait), wait + prefill)
    return None
