"""What a node monitor decides at each tick (`logic.monitoring`), as tables: whether a
probe counts, which unloads to start, whether a report is due, whether the heartbeat's
freshness flipped, whether the Ready condition must be written. Pure: no task, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mlxpool.agentapi import ModelPhase, ModelState, NodeReport
from mlxpool.nodes import Hardware
from mlxpool.operator.logic.endpoints import NOT_PROBED, ProbeResult
from mlxpool.operator.logic.fleet import Fleet
from mlxpool.operator.logic.monitoring import (
    MAX_TICK_SECONDS,
    ReadyMark,
    ReportStep,
    Unloads,
    heartbeat_deadlines,
    heartbeat_news,
    lease_late,
    phase,
    probe_now,
    probe_period,
    probe_verdict,
    ready_mark,
    report_period,
    report_step,
    spread_due,
    tick_delay,
    unloads_due,
)
from mlxpool.operator.logic.placement import NodeView

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
UP = ProbeResult(True)
SLOW = ProbeResult(False, "no answer to GET /health within 0.5s", timed_out=True)
REFUSED = ProbeResult(False, "cannot connect: refused")


def view(age: float | None = 1.0, ready: bool = True, condition: tuple[str, str] | None = None,
         generation: int = 1, condition_generation: int = 1) -> NodeView:
    return NodeView(name="n", endpoint="http://n", labels={}, ready=ready,
                    heartbeat=None if age is None else NOW - timedelta(seconds=age), free_memory_bytes=None,
                    models=frozenset(), condition=condition, generation=generation,
                    condition_generation=condition_generation if condition else None)


@pytest.mark.parametrize(("result", "timeouts", "recorded", "expected"), [
    (UP, 0, NOT_PROBED, (UP, 0)),
    (UP, 1, UP, (UP, 0)),  # an answer ends the run of timeouts
    (SLOW, 0, UP, (UP, 1)),  # one slow answer is not a verdict: the healthy result stays
    (SLOW, 1, UP, (SLOW, 2)),  # the second in a row is
    (SLOW, 2, SLOW, (SLOW, 3)),
    (SLOW, 0, NOT_PROBED, (NOT_PROBED, 1)),  # a first probe that times out: not probed yet, asked again
    (SLOW, 1, NOT_PROBED, (SLOW, 2)),  # ... and the second counts
    (SLOW, 0, REFUSED, (SLOW, 1)),
    (REFUSED, 0, UP, (REFUSED, 0)),  # a refused connection counts at once
    (REFUSED, 1, UP, (REFUSED, 0)),
])
def test_probe_verdicts(result, timeouts, recorded, expected):
    assert probe_verdict(result, timeouts, recorded) == expected


@pytest.mark.parametrize(("result", "timeouts", "recorded", "expected"), [
    (SLOW, 1, UP, (UP, 2)),  # its watch speaks: the agent lives, a slow answer is the machine's
    (SLOW, 5, UP, (UP, 6)),
    (REFUSED, 0, UP, (REFUSED, 0)),  # a refusal counts whatever the watch says
    (SLOW, 1, SLOW, (SLOW, 2)),  # already failed: stays failed until it answers
])
def test_probe_verdicts_while_the_watch_speaks(result, timeouts, recorded, expected):
    assert probe_verdict(result, timeouts, recorded, watch_alive=True) == expected


@pytest.mark.parametrize(("healthy", "asking", "in_transit", "now", "due_at", "step"), [
    (False, False, False, 10.0, 0.0, ReportStep.DROP),
    (False, True, True, 10.0, 0.0, ReportStep.DROP),  # whatever else: an agent that does not answer holds nothing
    (True, False, False, 10.0, 10.0, ReportStep.ASK),  # due
    (True, False, False, 10.0, 0.0, ReportStep.ASK),
    (True, False, False, 9.9, 10.0, ReportStep.WAIT),
    (True, False, True, 9.9, 10.0, ReportStep.ASK),  # a load or staging under way: every tick
    (True, True, True, 10.0, 0.0, ReportStep.WAIT),  # never two requests at once
])
def test_report_steps(healthy, asking, in_transit, now, due_at, step):
    assert report_step(healthy=healthy, asking=asking, in_transit=in_transit, now=now, due_at=due_at) is step


@pytest.mark.parametrize(("age", "was_stale", "expected"), [
    (1.0, None, (False, False)),  # the first tick tells nobody
    (100.0, None, (True, False)),
    (None, None, (True, False)),  # no heartbeat at all is stale
    (1.0, False, (False, False)),
    (100.0, True, (True, False)),
    (100.0, False, (True, True)),  # went stale: pools must re-place now
    (1.0, True, (False, True)),  # fresh again
    (None, False, (True, True)),
    (30.0, False, (False, False)),  # stale only past the bound
])
def test_heartbeat_news(age, was_stale, expected):
    assert heartbeat_news(view(age), NOW, 30, was_stale) == expected


READY = ReadyMark(True, "AgentReady", "the agent is ready, beats and answers its health probe", 1)


@pytest.mark.parametrize(("node", "probe", "written", "retry_at", "tick", "expected"), [
    (view(), UP, None, 0.0, 100.0, READY),
    (view(condition=("True", "AgentReady")), UP, None, 0.0, 100.0, None),  # the object already says so
    (view(), UP, (True, "AgentReady", 1), 0.0, 100.0, None),  # written already (the watch may lag)
    (view(), UP, (False, "HealthProbeFailed", 1), 0.0, 100.0, READY),  # the verdict changed
    # A new spec generation (the agent registered again): same verdict, observedGeneration follows.
    (view(condition=("True", "AgentReady"), generation=2), UP, None, 0.0, 100.0,
     ReadyMark(True, "AgentReady", READY.message, 2)),
    (view(condition=("True", "AgentReady"), generation=2), UP, (True, "AgentReady", 2), 0.0, 100.0, None),
    (view(), UP, None, 130.0, 100.0, None),  # a write failed: wait for the retry time
    (view(), UP, None, 130.0, 130.0, READY),
    (view(condition=("True", "AgentReady")), REFUSED, None, 0.0, 100.0,
     ReadyMark(False, "HealthProbeFailed", "cannot connect: refused", 1)),
    (view(condition=("True", "AgentReady")), ProbeResult(False), None, 0.0, 100.0,
     ReadyMark(False, "HealthProbeFailed", "the agent fails its health probe", 1)),
    (view(age=300), UP, None, 0.0, 100.0,
     ReadyMark(False, "HeartbeatStale", "no heartbeat for more than 30s; no pool routes here", 1)),
    (view(age=None), UP, None, 0.0, 100.0, ReadyMark(False, "NoHeartbeat", "the agent has not sent a heartbeat", 1)),
    (view(ready=False), UP, None, 0.0, 100.0,
     ReadyMark(False, "AgentNotReady", "the agent reports it is not ready", 1)),
])
def test_ready_marks(node, probe, written, retry_at, tick, expected):
    assert ready_mark(node, probe, now=NOW, stale_after=30, written=written, retry_at=retry_at,
                      tick=tick) == expected


def test_a_ready_mark_is_a_metav1_condition():
    mark = ReadyMark(False, "HealthProbeFailed", "x" * 40000, 3)
    assert mark.verdict == ("False", "HealthProbeFailed")
    assert mark.condition(NOW) == {"type": "Ready", "status": "False", "reason": "HealthProbeFailed",
                                   "message": "x" * 32768, "lastTransitionTime": "2026-01-01T12:00:00Z",
                                   "observedGeneration": 3}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fleet_with(*, deferred: tuple[str, ...] = (), orphan: str | None = None, clock: Clock | None = None) -> Fleet:
    """A fleet whose node `n` owes `deferred` unloads and holds `orphan`, a ready model of
    ours that no pool claims."""
    fleet = Fleet(owner="op", clock=clock or Clock())
    fleet.claims.seeded = True
    fleet.observed.set_view(view())
    models = [ModelState(name=orphan, phase=ModelPhase.READY, owner="op")] if orphan else []
    fleet.observed.observe_report("n", NodeReport(
        name="n", endpoint="http://n", max_models=4, agent_version="t", models=models,
        hardware=Hardware(chip="c", memory_bytes=1, cpu_cores=1, accelerator="cpu", platform="p")))
    for model in deferred:
        fleet.claims.defer_unload("n", model)
    return fleet


@pytest.mark.parametrize(("deferred", "orphan", "healthy", "unloading", "expected"), [
    ((), None, True, False, None),
    (("x", "y"), None, True, False, Unloads(("x", "y"), orphans=False)),
    ((), "o", True, False, Unloads(("o",), orphans=True)),
    (("x",), "o", True, False, Unloads(("x",), orphans=False)),  # what pools decided comes first
    (("x",), "o", False, False, None),  # not to an agent that does not answer
    (("x",), "o", True, True, None),  # one batch at a time
])
def test_unloads_due(deferred, orphan, healthy, unloading, expected):
    fleet = fleet_with(deferred=deferred, orphan=orphan)
    assert unloads_due(fleet, "n", healthy=healthy, unloading=unloading, orphan_grace=0) == expected


def test_orphans_are_not_looked_for_while_a_deferred_unload_is_owed():
    clock = Clock()
    fleet = fleet_with(deferred=("x",), orphan="o", clock=clock)
    assert unloads_due(fleet, "n", healthy=True, unloading=False, orphan_grace=10) == Unloads(("x",), orphans=False)
    clock.now = 20
    fleet.claims.forget_deferred("n", "x")  # the unload is done
    assert unloads_due(fleet, "n", healthy=True, unloading=False, orphan_grace=10) is None  # grace starts now
    clock.now = 30
    assert unloads_due(fleet, "n", healthy=True, unloading=False, orphan_grace=10) == Unloads(("o",), orphans=True)


@pytest.mark.parametrize(("interval", "nodes", "watched", "expected"), [
    (1.0, 1000, False, 1.0),  # no watch: the probe is all there is, every interval
    (1.0, 1000, True, 20.0),  # watched: 1,000 nodes within 50 probes a second
    (1.0, 10, True, 1.0),  # a small fleet: never less often than the interval
    (5.0, 100, True, 5.0),
])
def test_probe_period_spreads_a_watched_fleet_over_the_budget(interval, nodes, watched, expected):
    assert probe_period(interval, nodes=nodes, probes_per_second=50, watched=watched) == expected


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, False),  # healthy, not due, nothing suspect: wait
    ({"due_at": 5.0}, True),  # the periodic probe is due
    ({"suspected": True}, True),  # a watch ended, a lease is late
    ({"healthy": False}, True),  # failing: probe at every interval to see it back
    ({"timeouts": 1}, True),  # one timeout: confirm at once
])
def test_probe_now(kw, expected):
    args = {"now": 5.0, "due_at": 20.0, "suspected": False, "healthy": True, "timeouts": 0, **kw}
    assert probe_now(**args) is expected


def test_report_period_and_lease_lateness():
    assert report_period(5.0, nodes=1000, reports_per_second=20) == 50.0
    assert report_period(5.0, nodes=10, reports_per_second=20) == 5.0
    assert not lease_late(view(age=15), NOW, 40) and lease_late(view(age=25), NOW, 40)
    assert not lease_late(view(age=None), NOW, 40)  # no heartbeat at all: staleness says so


@pytest.mark.parametrize(("busy", "due", "expected"), [
    (True, [150.0], 1.0),  # following something (a failed probe, a load in transit): every interval
    (False, [120.0, 150.0], 20.0),  # at rest: until the earliest thing due
    (False, [100.5], 1.0),  # never sooner than the interval
    (False, [90.0], 1.0),  # overdue: at the next interval
    (False, [1000.0], MAX_TICK_SECONDS),  # never later than the cap
    (False, [], MAX_TICK_SECONDS),
])
def test_tick_delay(busy, due, expected):
    assert tick_delay(interval=1.0, now=100.0, busy=busy, due=due) == expected


def test_heartbeat_deadlines_are_late_then_stale_those_ahead():
    assert heartbeat_deadlines(view(age=5), NOW, 40) == (15.0, 35.0)
    assert heartbeat_deadlines(view(age=25), NOW, 40) == (15.0,)  # late already: stale in 15 s
    assert heartbeat_deadlines(view(age=50), NOW, 40) == ()
    assert heartbeat_deadlines(view(age=None), NOW, 40) == ()


@pytest.mark.parametrize(("after", "offset", "expected"), [
    (0.0, 0.5, 30.0),  # at least half a period after, on the node's grid (k + 0.5) * 20
    (10.0, 0.5, 30.0),  # on the grid: the next slot, one period later
    (30.0, 0.5, 50.0),
    (25.0, 0.5, 50.0),  # off the grid (a suspicion): 25 s later, not 5
    (float("-inf"), 0.5, float("-inf")),  # never probed: due now
])
def test_spread_due(after, offset, expected):
    assert spread_due(after, 20.0, offset) == expected


def test_phases_spread_a_fleet_over_the_period():
    offsets = sorted(phase(f"node-{i:03d}") for i in range(1000))
    assert all(0 <= o < 1 for o in offsets) and phase("node-001") == phase("node-001")
    per_tenth = [sum(1 for o in offsets if k / 10 <= o < (k + 1) / 10) for k in range(10)]
    assert min(per_tenth) > 60, per_tenth  # about 100 in each tenth of the period, not all at once
