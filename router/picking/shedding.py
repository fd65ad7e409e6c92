"""Priority-aware shedding: which tiers to refuse when every endpoint is saturated.

When every endpoint of a model is saturated (its agent's batch slots plus queue,
`ModelSignals.slot_usage`, at or past the tier's threshold, or the endpoint counts as
saturated: stale under the `saturated` policy, draining), a request of a tier with a
threshold is refused with 429 instead of joining queues it would only lengthen. Lower
tiers have lower thresholds, so `background` goes first, then `low`; `critical` has
none and is never shed by the router (the agents' own per-tier queue limits still
apply). Nothing is shed without at least one fresh report: a router that knows
nothing refuses nothing.

`Retry-After` is when the least loaded endpoint should have worked off its queue: its
queued prompt tokens at its prefill rate, plus its waiting requests' share of decode
steps, rounded up to whole seconds and clamped to [1, 60].
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from mlxpool.priorities import Priority
from mlxpool.router.picking.signals import Freshness, LoadView

DEFAULT_THRESHOLDS: dict[Priority, float] = {Priority.BACKGROUND: 1.0, Priority.LOW: 1.5}


@dataclass(frozen=True)
class SheddingPolicy:
    thresholds: dict[Priority, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    """Per tier: slot usage (running + waiting over slots) at which every endpoint counts as
    full for that tier; tiers not listed are never shed. Critical may not be listed."""
    mean_output_tokens: int = 128
    """Decode steps a waiting request is assumed to hold a slot for (the Retry-After estimate)."""
    max_retry_after: int = 60

    def __post_init__(self) -> None:
        if Priority.CRITICAL in self.thresholds:
            raise ValueError("shedding: critical requests are never shed; give it no threshold")
        if any(t <= 0 for t in self.thresholds.values()):
            raise ValueError("shedding: thresholds must be positive")
        ordered = sorted(self.thresholds.items(), key=lambda kv: kv[0].rank)
        # A more urgent tier is shed only later than every less urgent one.
        if any(a[1] < b[1] for a, b in itertools.pairwise(ordered)):
            raise ValueError("shedding: a more urgent tier must not have a lower threshold than a less urgent one")
        missing = [p for p in Priority if p is not Priority.CRITICAL and p not in self.thresholds
                   and any(q.rank < p.rank for q in self.thresholds)]
        if missing:
            raise ValueError(f"shedding: tier {missing[0].value} has no threshold while a more urgent tier has one")
        if self.mean_output_tokens < 1 or self.max_retry_after < 1:
            raise ValueError("shedding: mean_output_tokens and max_retry_after must be >= 1")


def drain_seconds(view: LoadView, mean_output_tokens: int) -> float | None:
    """Seconds until the endpoint's queue is worked off, from its fresh report (None: unknown)."""
    report = view.report
    if view.freshness is not Freshness.FRESH or report is None or view.saturated:
        return None
    prefill = report.queued_prompt_tokens / report.prefill_tokens_per_second if report.prefill_tokens_per_second else 0
    slots = max(report.slots, 1)
    decode = report.waiting_total / slots * mean_output_tokens * (report.decode_step_seconds or 0.02)
    return prefill + decode


def shed(priority: Priority, views: Sequence[LoadView], policy: SheddingPolicy) -> int | None:
    """Retry-After seconds if a request of `priority` must be refused now, else None."""
    threshold = policy.thresholds.get(priority)
    if threshold is None or not views:
        return None
    fresh = [v for v in views if v.freshness is Freshness.FRESH and v.report is not None and not v.saturated]
    if not any(v.freshness is Freshness.FRESH for v in views):
        return None
    if any(v.freshness is Freshness.NONE for v in views):
        return None  # an endpoint without reports may well have room
    if any(v.report is not None and v.report.slot_usage < threshold for v in fresh):
        return None
    drains = [d for v in fresh if (d := drain_seconds(v, policy.mean_output_tokens)) is not None]
    seconds = min(drains) if drains else 1.0
    return max(1, min(policy.max_retry_after, math.ceil(seconds)))
