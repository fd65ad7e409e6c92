"""One monitor task per InferenceNode: watch and probe the agent, refresh its report, mark the node.

Each monitor keeps a health watch open on its agent (`GET /health/watch`, a stream the
agent keeps alive); when it ends (the agent died: its connection closed) or goes quiet
(a hung agent), the node is suspect and is probed at once. So is a node whose lease
renewal is late. Otherwise a watched agent is probed only now and then, spread so the
whole fleet costs at most `probes_per_second`; an agent without a watch (an older one)
is probed every probe interval (the shortest of the pools using the node, else the
operator's default), as before. Every probe result goes to the fleet, which wakes the
pools concerned when it changed, so a dead agent leaves the routing tables within
moments of its death. The agent's report (`GET /v1/node`: models and their phases,
cache entries, free memory) is refreshed every `report_interval` (spread over the fleet
likewise), and at every tick while a load or a staging is under way there, in a task of
its own so that a slow agent never delays the probes. A node whose probe fails loses
its report (an agent that comes back after a restart holds nothing).

A probe that times out counts only when the next one times out too (a busy agent is
not a dead one); a refused connection or an error answer counts at once. When the
agent answers again, the monitor carries out unloads that pools decided while it did
not (`Claims.defer_unload`), and unloads orphans (`Claims.orphans_due`).

The monitor also writes the InferenceNode's `Ready` condition (status subresource,
only when the verdict changes): not ready when the heartbeat is stale, the agent says
it is not ready, or the probe fails. Placement applies the same rules itself; the
condition is for people and other tools (`kubectl get inode`). The writes run beside
the ticks, at most `MARK_WRITES_IN_FLIGHT` at once for the whole fleet, one per node
(coalesced: the verdict is judged again when the write's turn comes), so an operator
starting on 1,000 nodes does not send the API server 1,000 PATCHes at once while
the agents renew their leases through it.

A monitor at rest does not tick every second: it sleeps until its next probe, report,
heartbeat deadline or write retry is due (`logic.monitoring.tick_delay`), and is woken
early by a suspicion, an event on its InferenceNode (`ensure`) or a change of its
agent's view (a load that a pool started there: followed at every tick from then on).

Every decision of a tick (probe now or not, does a probe count, which unloads now, is
a report due, did the heartbeat's freshness flip, must the condition be written) is a
pure function of `logic.monitoring`; this module does the I/O and applies them.

Plain asyncio tasks, not kopf daemons: a kopf daemon would put a finalizer on every
InferenceNode, which the agents own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from kubernetes_asyncio.client.exceptions import ApiException

from mlxpool.agentapi import ModelState, NodeReport
from mlxpool.operator.io import metrics
from mlxpool.operator.io.agentclient import AgentError
from mlxpool.operator.io.probing import WatchUnsupported
from mlxpool.operator.logic.endpoints import NOT_PROBED, ProbeResult
from mlxpool.operator.logic.fleet import Fleet
from mlxpool.operator.logic.monitoring import (
    MARK_RETRY_SECONDS,
    ReadyMark,
    ReportStep,
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
from mlxpool.operator.logic.observations import AGENT, HEALTH, NodeChange
from mlxpool.operator.logic.placement import NodeView

log = logging.getLogger(__name__)

MARK_WRITES_IN_FLIGHT = 8
"""Ready-condition writes outstanding at once, fleet-wide."""
REPORTS_IN_FLIGHT = 32
"""Agent reports (`GET /v1/node`) outstanding at once, fleet-wide: an operator starting on
1,000 nodes asks each for its report at its first tick."""


class Kube(Protocol):
    async def patch_node_status(self, name: str, status: Mapping[str, Any]) -> None: ...


class Prober(Protocol):
    @property
    def watches(self) -> bool: ...
    async def probe(self, endpoint: str, reason: str = ...) -> ProbeResult: ...
    async def watch(self, endpoint: str, alive: Callable[[], None]) -> str: ...


class MonitorAgents(Protocol):
    async def node(self, url: str) -> NodeReport: ...
    async def unload(self, url: str, model: str) -> ModelState: ...


class NodeMonitors:
    def __init__(self, fleet: Fleet, prober: Prober, agents: MonitorAgents, kube: Kube, *, default_interval: float,
                 override_interval: float | None, report_interval: float, stale_after: float,
                 orphan_grace: float = 30.0, probes_per_second: float = 50.0, reports_per_second: float = 20.0,
                 write_conditions: bool = True, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._fleet = fleet
        self._prober = prober
        self._agents = agents
        self._kube = kube
        self._default_interval = default_interval
        self._override = override_interval
        self._report_interval = report_interval
        self._stale_after = stale_after
        self._orphan_grace = orphan_grace
        self._clock = clock
        self._probes_per_second = probes_per_second
        self._write_conditions = write_conditions
        self._reports_per_second = reports_per_second
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._watched: set[str] = set()
        """Nodes whose watch is open and has spoken: their deaths are heard, not polled for."""
        self._spoke: dict[str, float] = {}
        """Node -> when its watch last spoke (monotonic)."""
        self._unwatchable: set[str] = set()
        """Nodes whose agent has no health watch (until it registers again)."""
        self._suspicions: dict[str, str] = {}
        """Node -> why it is suspect, until its monitor probes it."""
        self._wake: dict[str, asyncio.Event] = {}
        self._written: dict[str, tuple[bool, str, int]] = {}
        self._retry_at: dict[str, float] = {}
        self._marking: dict[str, asyncio.Task[None]] = {}
        """Node -> its Ready-condition write, queued or under way (one at a time per node)."""
        self._mark_slots = asyncio.Semaphore(MARK_WRITES_IN_FLIGHT)
        self._report_slots = asyncio.Semaphore(REPORTS_IN_FLIGHT)
        self.ticks = 0
        """Ticks of all monitors so far (tests and benchmarks read it)."""
        fleet.observed.subscribe(self._heard)

    def _heard(self, name: str, what: NodeChange) -> None:
        """What the agent holds changed (a pool's load began there, a report came): tick now,
        so a load in transit is followed at once. Health changes come from the monitor itself."""
        if what is AGENT and (wake := self._wake.get(name)) is not None:
            wake.set()

    def ensure(self, name: str) -> None:
        """A monitor for `name` runs (started if it was not); a running one ticks now (its
        InferenceNode changed)."""
        task = self._tasks.get(name)
        if task is None or task.done():
            self._tasks[name] = asyncio.create_task(self._run(name), name=f"monitor-{name}")
        elif (wake := self._wake.get(name)) is not None:
            wake.set()

    async def stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        watch = self._watches.pop(name, None)
        marking = self._marking.pop(name, None)
        self._written.pop(name, None)
        with contextlib.suppress(KeyError):
            metrics.NODE_READY.remove(name)
        self._retry_at.pop(name, None)
        self._suspicions.pop(name, None)
        self._unwatchable.discard(name)
        self._watched.discard(name)
        self._spoke.pop(name, None)
        self._wake.pop(name, None)
        for each in (task, watch, marking):
            if each is not None:
                each.cancel()
                await asyncio.gather(each, return_exceptions=True)

    def suspect(self, name: str, why: str) -> None:
        """Probe `name` at once (its watch ended, a router saw it fail, ...)."""
        self._suspicions.setdefault(name, why)
        if (wake := self._wake.get(name)) is not None:
            wake.set()

    async def close(self) -> None:
        for name in list(self._tasks) + list(self._watches):
            await self.stop(name)

    def interval(self, name: str) -> float:
        if self._override is not None:
            return self._override
        return self._fleet.claims.probe_interval(name, self._default_interval)

    async def _run(self, name: str) -> None:
        observed = self._fleet.observed
        stale: bool | None = None
        timeouts = 0
        # Agent calls run in tasks of their own: a slow agent never delays the probes.
        report: asyncio.Task[None] | None = None
        unloads: asyncio.Task[None] | None = None
        next_report = 0.0
        probed_at = float("-inf")
        offset = phase(name)
        wake = self._wake.setdefault(name, asyncio.Event())
        try:
            while (view := observed.views.get(name)) is not None:
                tick = time.monotonic()
                wake.clear()
                self.ticks += 1
                delay = self.interval(name)
                try:
                    nodes = len(observed.views)
                    recorded = observed.of(name).probe
                    suspicion = self._suspicions.pop(name, None)
                    if suspicion is None and lease_late(view, self._clock(), self._stale_after):
                        suspicion = "its lease renewal is late"
                    # The period is read at every tick: it lengthens once the watch has spoken.
                    due_at = spread_due(probed_at, probe_period(self.interval(name), nodes=nodes,
                                                                probes_per_second=self._probes_per_second,
                                                                watched=name in self._watched), offset)
                    if probe_now(now=tick, due_at=due_at, suspected=suspicion is not None,
                                 healthy=recorded.healthy or recorded is NOT_PROBED, timeouts=timeouts):
                        reason = ("suspected" if suspicion else "first" if recorded is NOT_PROBED
                                  else "unhealthy" if not recorded.healthy else "scheduled")
                        probe_started = time.monotonic()
                        result = await self._prober.probe(view.endpoint, reason)
                        probe, timeouts = probe_verdict(result, timeouts, recorded,
                                                        watch_alive=self._watch_alive(name))
                        if suspicion and not probe.healthy and recorded.healthy:
                            log.info("suspect node failed its probe node=%s suspicion=%r probe=%r probe_s=%.3f",
                                     name, suspicion, probe.message, time.monotonic() - probe_started)
                        observed.observe_probe(name, probe)
                        probed_at = tick
                    else:
                        probe = recorded
                    if probe.healthy:
                        self._keep_watching(name, view)
                    due = unloads_due(self._fleet, name, healthy=probe.healthy, unloading=_running(unloads),
                                      orphan_grace=self._orphan_grace)
                    if due is not None:
                        if due.orphans:
                            log.info("unloading orphans node=%s models=%s: loaded by this operator, "
                                     "claimed by no pool", name, ",".join(due.models))
                        unloads = asyncio.create_task(self._unload_deferred(name, view, due.models))
                    step = report_step(healthy=probe.healthy, asking=_running(report),
                                       in_transit=observed.in_transit(name), now=tick, due_at=next_report)
                    if step is ReportStep.DROP:
                        observed.observe_report(name, None, "the agent does not answer its health probe")
                        next_report = 0.0
                    elif step is ReportStep.ASK:
                        next_report = spread_due(tick, report_period(self._report_interval, nodes=nodes,
                                                                     reports_per_second=self._reports_per_second),
                                                 offset)
                        report = asyncio.create_task(self._refresh_report(name, view))
                    stale, news = heartbeat_news(view, self._clock(), self._stale_after, stale)
                    if news:
                        observed.notify(name, HEALTH)  # pools re-place at once, not at the next watch event
                    if self._write_conditions:
                        self._mark(name)
                    now = self._clock()
                    busy = (not probe.healthy or timeouts > 0 or observed.in_transit(name) or stale
                            or lease_late(view, now, self._stale_after))
                    due_at = spread_due(probed_at, probe_period(self.interval(name), nodes=nodes,
                                                                probes_per_second=self._probes_per_second,
                                                                watched=name in self._watched), offset)
                    deadlines = [tick + left for left in heartbeat_deadlines(view, now, self._stale_after)]
                    retry = self._retry_at.get(name, 0.0)
                    delay = tick_delay(interval=self.interval(name), now=tick, busy=busy,
                                       due=[due_at, next_report, *deadlines, *([retry] if retry > tick else [])])
                except Exception:  # a monitor must never die: log and go on at the next tick
                    log.exception("node monitor tick failed node=%s", name)
                with contextlib.suppress(TimeoutError):  # woken early by a suspicion or a change
                    await asyncio.wait_for(wake.wait(), max(delay - (time.monotonic() - tick), 0.05))
        finally:
            for task in (report, unloads):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    def _heard_from(self, name: str) -> None:
        self._watched.add(name)
        self._spoke[name] = time.monotonic()

    def _watch_alive(self, name: str) -> bool:
        """Its watch is open and spoke within one and a half of its intervals."""
        spoke = self._spoke.get(name)
        return (name in self._watched and spoke is not None
                and time.monotonic() - spoke < 1.5 * getattr(self._prober, "watch_interval", 10.0))

    def _keep_watching(self, name: str, view: NodeView) -> None:
        """A watch runs on a healthy agent that has one (started again after it ended)."""
        if not self._prober.watches or name in self._unwatchable:
            return
        task = self._watches.get(name)
        if task is None or task.done():
            self._watches[name] = asyncio.create_task(self._watch(name, view.endpoint), name=f"watch-{name}")

    async def _watch(self, name: str, endpoint: str) -> None:
        try:
            why = await self._prober.watch(endpoint, lambda: self._heard_from(name))
        except WatchUnsupported as exc:
            log.info("agent has no health watch node=%s (%s): probing it every interval", name, exc)
            self._unwatchable.add(name)
            return
        finally:
            self._watched.discard(name)
        metrics.WATCH_ENDS.inc()
        log.info("health watch ended node=%s why=%r", name, why)  # rare: an agent died or went quiet
        self.suspect(name, why)

    async def _unload_deferred(self, name: str, view: NodeView, models: Sequence[str]) -> None:
        """Models a pool gave up while this agent did not answer (or orphans): unload them now."""
        for model in models:
            try:
                state = await self._agents.unload(view.endpoint, model)
                self._fleet.observed.note_model(name, state)
                log.info("deferred unload done node=%s model=%s", name, model)
            except AgentError as exc:
                if exc.status != 404:  # 404: the agent restarted and holds nothing
                    log.warning("deferred unload failed node=%s model=%s error=%s", name, model, exc)
            self._fleet.claims.forget_deferred(name, model)

    async def _refresh_report(self, name: str, view: NodeView) -> None:
        observed = self._fleet.observed
        async with self._report_slots:
            asked_at = observed.now()
            try:
                report = await self._agents.node(view.endpoint)
            except AgentError as exc:  # unreachable, or 401/403 without a token, 404 without the ops API
                observed.observe_report(name, None, str(exc), asked_at=asked_at)
                return
        if name in observed.views:  # not deleted meanwhile
            observed.observe_report(name, report, asked_at=asked_at)

    def _due_mark(self, name: str) -> tuple[NodeView, ReadyMark | None] | None:
        """The node's view and the Ready condition to write now (None: none due); None when
        the node is gone."""
        view = self._fleet.observed.views.get(name)
        probe = self._fleet.observed.of(name).probe
        if view is None or probe is NOT_PROBED:  # nothing to say yet (a first probe timed out)
            return None
        return view, ready_mark(view, probe, now=self._clock(), stale_after=self._stale_after,
                                written=self._written.get(name), retry_at=self._retry_at.get(name, 0.0),
                                tick=time.monotonic())

    def _mark(self, name: str) -> None:
        """Write the Ready condition if it is due, beside the tick (`MARK_WRITES_IN_FLIGHT`
        fleet-wide); while a write of this node's is queued or under way, nothing more."""
        if _running(self._marking.get(name)):
            return
        due = self._due_mark(name)
        if due is None:
            return
        view, mark = due
        if mark is None:
            self._export_verdict(name, view)
            return
        self._marking[name] = asyncio.create_task(self._write_mark(name), name=f"mark-{name}")

    async def _write_mark(self, name: str) -> None:
        async with self._mark_slots:
            due = self._due_mark(name)  # judged again: the verdict may have moved while queued
            if due is None:
                return
            view, mark = due
            if mark is None:
                return
            try:
                await self._kube.patch_node_status(name, {"conditions": [mark.condition(self._clock())]})
            except Exception as exc:  # placement does not depend on the condition: log, retry later
                error = (f"{exc.status} {exc.reason}" if isinstance(exc, ApiException)
                         else f"{type(exc).__name__}: {exc}")
                log.warning("cannot write the Ready condition node=%s error=%s; retrying in %gs", name, error,
                            MARK_RETRY_SECONDS)
                self._retry_at[name] = time.monotonic() + MARK_RETRY_SECONDS
                return
        self._written[name] = mark.written
        self._export_verdict(name, view)
        log.info("node marked node=%s ready=%s reason=%s", name, mark.verdict[0], mark.reason)

    def _export_verdict(self, name: str, view: NodeView) -> None:
        """`mlxpool_operator_node_ready`: the verdict as written (or as found on the object), what alerts read."""
        if (written := self._written.get(name)) is not None:
            metrics.NODE_READY.labels(name).set(1 if written[0] else 0)
        elif view.condition is not None:
            metrics.NODE_READY.labels(name).set(1 if view.condition[0] == "True" else 0)


def _running(task: asyncio.Task[None] | None) -> bool:
    return task is not None and not task.done()
