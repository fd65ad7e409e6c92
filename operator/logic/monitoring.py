"""What a node monitor decides at each tick, as pure functions: no I/O, no clock.

The monitor (`reconcilers.monitors`) probes the agent, asks for its report, unloads
and writes the InferenceNode's Ready condition; every decision on the way is here,
taken from values it passes in:

- `probe_now` and `probe_period`: whether to probe at this tick. A node is probed at
  once when something makes it suspect (its health watch ended or went quiet, its
  lease renewal is late), at every tick while its last probe failed (to see it come
  back) or timed out (to confirm), and otherwise only every `probe_period`: the pool's
  interval for an agent that cannot be watched, else spread so that the whole fleet
  costs at most `probes_per_second` (a watched agent's death is heard, not polled for).
- `report_period`: how often to ask an agent for its report when nothing is in transit
  there, spread likewise over the fleet (`reports_per_second`).
- `spread_due` and `phase`: when the next periodic probe or report is due. Each node
  keeps to a grid of its own, offset by a fraction of the period taken from its name,
  so a fleet whose monitors all started together (an operator starting on 1,000 nodes)
  does not probe every agent in the same second, then ask every agent for its report
  in the same second, again and again.
- `probe_verdict`: whether a probe result counts. A timeout counts only when
  `TIMEOUTS_TO_FAIL` come in a row (a busy agent is not a dead one); a refused
  connection or an error answer counts at once.
- `unloads_due`: which unloads to do now: the ones pools decided while the agent did
  not answer first, else orphans; none while it does not answer or a batch still runs.
- `report_step`: whether to ask for the agent's report now (when due, and at every
  tick while something is in transit there), or to drop it (the agent does not answer).
- `heartbeat_news`: whether the heartbeat's freshness flipped, which pools must hear.
- `ready_mark`: whether the Ready condition must be written, and what it says: only
  when the verdict differs from what the object shows and from what was written, and
  not before `MARK_RETRY_SECONDS` after a failed write.
- `tick_delay` and `heartbeat_deadlines`: how long the monitor may sleep before its next
  tick. One interval while something needs following (a failed or timed-out probe, a
  load or staging in transit, a late or stale heartbeat), else until the next thing
  due (a probe, a report, the heartbeat turning late or stale, a write retry), at most
  `MAX_TICK_SECONDS`: a fleet at rest ticks about once per probe period per node, not
  once a second (1,000 ticks a second at 1,000 nodes). What can change meanwhile wakes
  the monitor itself (a suspicion, an event on the node, a change of its agent's view).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from mlxpool.operator.logic.conditions import READY, node_readiness, rfc3339
from mlxpool.operator.logic.endpoints import NOT_PROBED, ProbeResult
from mlxpool.operator.logic.fleet import Fleet
from mlxpool.operator.logic.placement import NodeView

TIMEOUTS_TO_FAIL = 2
"""Probe timeouts in a row that make a node unhealthy (a refused connection does at once)."""
MARK_RETRY_SECONDS = 30.0
"""Seconds before a Ready condition that could not be written is tried again."""
MESSAGE_LIMIT = 32768
"""metav1.Condition's message length limit."""
MAX_TICK_SECONDS = 30.0
"""The longest a node monitor sleeps between ticks, whatever is due (orphans are looked for at ticks)."""


def probe_period(interval: float, *, nodes: int, probes_per_second: float, watched: bool) -> float:
    """Seconds between probes of a node nothing makes suspect."""
    if not watched:
        return interval  # the probe is all there is to hear a death by
    return max(interval, nodes / probes_per_second)


def probe_now(*, now: float, due_at: float, suspected: bool, healthy: bool, timeouts: int) -> bool:
    """Whether to probe at this tick (`due_at`: when the periodic probe is due)."""
    return suspected or not healthy or timeouts > 0 or now >= due_at


def report_period(report_interval: float, *, nodes: int, reports_per_second: float) -> float:
    """Seconds between reports of an agent with nothing in transit (loads and stagings are
    followed at every tick, and the operator's own calls update what it knows at once)."""
    return max(report_interval, nodes / reports_per_second)


def phase(node: str) -> float:
    """The node's offset on its grids, a fraction of the period in [0, 1), from its name."""
    return zlib.crc32(node.encode()) / 2**32


def spread_due(after: float, period: float, offset: float) -> float:
    """The first time at least half a period after `after` on the grid of `period` offset
    by `offset` periods (the times `(k + offset) * period`): between two periodic probes
    (or reports) there is one period; after one made off the grid (the first, a
    suspicion) the next comes within half a period to one and a half."""
    if math.isinf(after):
        return after
    return (math.floor((after + period / 2) / period - offset) + 1 + offset) * period


def lease_late(view: NodeView, now: datetime, stale_after: float) -> bool:
    """The heartbeat is half way to stale: the agent may have lost the API server, or died."""
    age = heartbeat_age(view, now)
    return age is not None and age > stale_after / 2


def heartbeat_deadlines(view: NodeView, now: datetime, stale_after: float) -> tuple[float, ...]:
    """Seconds from `now` until the heartbeat turns late (`lease_late`) and stale, those
    still ahead; none when there is no heartbeat (the monitor then ticks every interval)."""
    age = heartbeat_age(view, now)
    if age is None:
        return ()
    return tuple(at - age for at in (stale_after / 2, stale_after) if at > age)


def tick_delay(*, interval: float, now: float, busy: bool, due: Iterable[float]) -> float:
    """Seconds to sleep before the next tick: `interval` while `busy`, else until the
    earliest of `due` (monotonic times), never less than `interval` nor more than
    `MAX_TICK_SECONDS` (nor less than `interval` when that is longer)."""
    if busy:
        return interval
    return max(interval, min(min(due, default=now + MAX_TICK_SECONDS), now + MAX_TICK_SECONDS) - now)


def probe_verdict(result: ProbeResult, timeouts: int, recorded: ProbeResult,
                  watch_alive: bool = False) -> tuple[ProbeResult, int]:
    """The probe result to record after `result` (`recorded` is the one recorded so far),
    and the count of timeouts in a row including this one. A timeout is no verdict while
    the agent's health watch speaks (`watch_alive`: its process is alive and serving; a
    loaded machine is slow to answer, and a hung agent goes quiet on its watch too), nor
    before `TIMEOUTS_TO_FAIL` in a row, nor at the first probe (the node stays not probed
    until it answers or times out again)."""
    timeouts = timeouts + 1 if result.timed_out else 0
    if result.timed_out and (recorded.healthy or recorded is NOT_PROBED) and (
            watch_alive or timeouts < TIMEOUTS_TO_FAIL):
        return recorded, timeouts  # one slow answer is not a verdict
    return result, timeouts


@dataclass(frozen=True)
class Unloads:
    models: tuple[str, ...]
    orphans: bool
    """Models of ours no pool has claimed for the grace period; else unloads pools deferred."""


def unloads_due(fleet: Fleet, node: str, *, healthy: bool, unloading: bool, orphan_grace: float) -> Unloads | None:
    """The unloads to start on `node` now, or None. Orphans are only looked for (which
    starts their grace period) when no deferred unload is owed."""
    if not healthy or unloading:
        return None
    if deferred := fleet.claims.deferred_unloads(node):
        return Unloads(tuple(deferred), orphans=False)
    if orphans := fleet.orphans_due(node, orphan_grace):
        return Unloads(tuple(orphans), orphans=True)
    return None


class ReportStep(Enum):
    ASK = "ask"
    """Ask the agent for its report now."""
    DROP = "drop"
    """The agent does not answer its probe: what it last reported holds no more."""
    WAIT = "wait"


def report_step(*, healthy: bool, asking: bool, in_transit: bool, now: float, due_at: float) -> ReportStep:
    """`asking`: a report request is still under way; `due_at`: when the next is due."""
    if not healthy:
        return ReportStep.DROP
    if not asking and (now >= due_at or in_transit):
        return ReportStep.ASK
    return ReportStep.WAIT


def heartbeat_age(view: NodeView, now: datetime) -> float | None:
    return None if view.heartbeat is None else (now - view.heartbeat).total_seconds()


def heartbeat_news(view: NodeView, now: datetime, stale_after: float, was_stale: bool | None) -> tuple[bool, bool]:
    """(whether the heartbeat is stale now, whether pools must hear of it): they must when
    it flipped since the last tick (`was_stale`; None at the first), so they re-place at
    once rather than at the next watch event."""
    age = heartbeat_age(view, now)
    stale = age is None or age > stale_after
    return stale, was_stale is not None and stale != was_stale


@dataclass(frozen=True)
class ReadyMark:
    """The Ready condition the monitor writes on an InferenceNode."""

    status: bool
    reason: str
    message: str
    generation: int = 0
    """The node's metadata.generation when judged: the condition's observedGeneration."""

    @property
    def verdict(self) -> tuple[str, str]:
        """(status, reason) as the object shows them (`NodeView.condition`)."""
        return ("True" if self.status else "False", self.reason)

    @property
    def written(self) -> tuple[bool, str, int]:
        """What the monitor remembers having written (`ready_mark`'s `written`)."""
        return self.status, self.reason, self.generation

    def condition(self, now: datetime) -> dict[str, str | int]:
        return {"type": READY, "status": self.verdict[0], "reason": self.reason,
                "message": self.message[:MESSAGE_LIMIT], "lastTransitionTime": rfc3339(now),
                "observedGeneration": self.generation}


def ready_mark(view: NodeView, probe: ProbeResult, *, now: datetime, stale_after: float,
               written: tuple[bool, str, int] | None, retry_at: float, tick: float) -> ReadyMark | None:
    """The condition to write now, or None. `written`: (status, reason, generation) this
    monitor last wrote; a new spec generation is written even with the verdict unchanged, so
    observedGeneration keeps up (kstatus, GitOps health checks); `retry_at`: when a failed
    write may be tried again, on the monotonic clock that `tick` (now) is read from."""
    status, reason, message = node_readiness(
        agent_ready=view.ready, heartbeat_age=heartbeat_age(view, now), stale_after=stale_after,
        probe_healthy=probe.healthy, probe_message=probe.message)
    mark = ReadyMark(status, reason, message, view.generation)
    shown = view.condition == mark.verdict and view.condition_generation == view.generation
    if shown or written == mark.written or tick < retry_at:
        return None
    return mark
