"""One monitor task per InferenceNode: probe the agent, refresh its report, mark the node.

Every probe interval (the shortest of the pools using the node, else the operator's
default) a monitor sends `GET /health`; the result goes to the fleet, which wakes the
pools concerned when it changed, so a dead agent leaves the routing tables within one
interval. The agent's report (`GET /v1/node`: models and their phases, cache entries,
free memory) is refreshed every `report_interval`, and at every tick while a load or a
staging is under way there, in a task of its own so that a slow agent never delays
the probes. A node whose probe fails loses its report (an agent that comes back after
a restart holds nothing).

A probe that times out counts only when the next one times out too (a busy agent is
not a dead one); a refused connection or an error answer counts at once. When the
agent answers again, the monitor carries out unloads that pools decided while it did
not (`Fleet.defer_unload`).

The monitor also writes the InferenceNode's `Ready` condition (status subresource,
only when the verdict changes): not ready when the heartbeat is stale, the agent says
it is not ready, or the probe fails. Placement applies the same rules itself; the
condition is for people and other tools (`kubectl get inode`).

Plain asyncio tasks, not kopf daemons: a kopf daemon would put a finalizer on every
InferenceNode, which the agents own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Protocol

from kubernetes_asyncio.client.exceptions import ApiException

from mlxpool.operator.io.agentclient import AgentClient, AgentError
from mlxpool.operator.io.probing import Prober
from mlxpool.operator.logic.conditions import READY, node_readiness, rfc3339
from mlxpool.operator.logic.fleet import HEALTH, Fleet
from mlxpool.operator.logic.placement import NodeView

log = logging.getLogger(__name__)

MARK_RETRY_SECONDS = 30.0
TIMEOUTS_TO_FAIL = 2
"""Probe timeouts in a row that make a node unhealthy (a refused connection does at once)."""


class Kube(Protocol):
    async def patch_node_status(self, name: str, status: Mapping) -> None: ...


class NodeMonitors:
    def __init__(self, fleet: Fleet, prober: Prober, agents: AgentClient, kube: Kube, *, default_interval: float,
                 override_interval: float | None, report_interval: float, stale_after: float,
                 orphan_grace: float = 30.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
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
        self._tasks: dict[str, asyncio.Task] = {}
        self._written: dict[str, tuple[bool, str]] = {}
        self._retry_at: dict[str, float] = {}

    def ensure(self, name: str) -> None:
        """A monitor for `name` runs (started if it was not)."""
        task = self._tasks.get(name)
        if task is None or task.done():
            self._tasks[name] = asyncio.create_task(self._run(name), name=f"monitor-{name}")

    async def stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        self._written.pop(name, None)
        self._retry_at.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        for name in list(self._tasks):
            await self.stop(name)

    def interval(self, name: str) -> float:
        if self._override is not None:
            return self._override
        return self._fleet.probe_interval(name, self._default_interval)

    async def _run(self, name: str) -> None:
        stale: bool | None = None
        timeouts = 0
        # Agent calls run in tasks of their own: a slow agent never delays the probes.
        report: asyncio.Task | None = None
        unloads: asyncio.Task | None = None
        next_report = 0.0
        try:
            while (view := self._fleet.views.get(name)) is not None:
                tick = time.monotonic()
                try:
                    probe = await self._prober.probe(view.endpoint)
                    timeouts = timeouts + 1 if probe.timed_out else 0
                    if probe.timed_out and timeouts < TIMEOUTS_TO_FAIL and self._fleet.observation(name).probe.healthy:
                        probe = self._fleet.observation(name).probe  # one slow answer is not a verdict
                    self._fleet.observe_probe(name, probe)
                    if probe.healthy and (unloads is None or unloads.done()):
                        if deferred := self._fleet.deferred_unloads(name):
                            unloads = asyncio.create_task(self._unload_deferred(name, view, deferred))
                        elif orphans := self._fleet.orphans_due(name, self._orphan_grace):
                            log.info("unloading orphans node=%s models=%s: loaded by this operator, "
                                     "claimed by no pool", name, ",".join(orphans))
                            unloads = asyncio.create_task(self._unload_deferred(name, view, orphans))
                    if not probe.healthy:
                        self._fleet.observe_report(name, None, "the agent does not answer its health probe")
                        next_report = 0.0
                    elif (report is None or report.done()) and (tick >= next_report or self._fleet.in_transit(name)):
                        next_report = tick + self._report_interval
                        report = asyncio.create_task(self._refresh_report(name, view))
                    age = _heartbeat_age(view, self._clock())
                    is_stale = age is None or age > self._stale_after
                    if stale is not None and is_stale != stale:
                        self._fleet.notify(name, HEALTH)  # pools re-place at once, not at the next watch event
                    stale = is_stale
                    await self._mark(name, view, probe.healthy, probe.message)
                except Exception:  # a monitor must never die: log and go on at the next tick
                    log.exception("node monitor tick failed node=%s", name)
                await asyncio.sleep(max(self.interval(name) - (time.monotonic() - tick), 0.05))
        finally:
            for task in (report, unloads):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    async def _unload_deferred(self, name: str, view: NodeView, models: list[str]) -> None:
        """Models a pool gave up while this agent did not answer (or orphans): unload them now."""
        for model in models:
            try:
                state = await self._agents.unload(view.endpoint, model)
                self._fleet.note_model(name, state)
                log.info("deferred unload done node=%s model=%s", name, model)
            except AgentError as exc:
                if exc.status != 404:  # 404: the agent restarted and holds nothing
                    log.warning("deferred unload failed node=%s model=%s error=%s", name, model, exc)
            self._fleet.forget_deferred(name, model)

    async def _refresh_report(self, name: str, view: NodeView) -> None:
        asked_at = self._fleet.now()
        try:
            report = await self._agents.node(view.endpoint)
        except AgentError as exc:  # unreachable, or 401/403 without a token, 404 without the ops API
            self._fleet.observe_report(name, None, str(exc), asked_at=asked_at)
            return
        if name in self._fleet.views:  # not deleted meanwhile
            self._fleet.observe_report(name, report, asked_at=asked_at)

    async def _mark(self, name: str, view: NodeView, probe_healthy: bool, probe_message: str) -> None:
        status, reason, message = node_readiness(
            agent_ready=view.ready, heartbeat_age=_heartbeat_age(view, self._clock()),
            stale_after=self._stale_after, probe_healthy=probe_healthy, probe_message=probe_message)
        verdict = ("True" if status else "False", reason)
        if view.condition == verdict or self._written.get(name) == (status, reason) or \
                time.monotonic() < self._retry_at.get(name, 0.0):
            return
        condition = {"type": READY, "status": verdict[0], "reason": reason, "message": message[:32768],
                     "lastTransitionTime": rfc3339(self._clock())}
        try:
            await self._kube.patch_node_status(name, {"conditions": [condition]})
        except Exception as exc:  # placement does not depend on the condition: log, retry later
            error = f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else f"{type(exc).__name__}: {exc}"
            log.warning("cannot write the Ready condition node=%s error=%s; retrying in %gs", name, error,
                        MARK_RETRY_SECONDS)
            self._retry_at[name] = time.monotonic() + MARK_RETRY_SECONDS
            return
        self._written[name] = (status, reason)
        log.info("node marked node=%s ready=%s reason=%s", name, verdict[0], reason)


def _heartbeat_age(view: NodeView, now: datetime) -> float | None:
    return None if view.heartbeat is None else (now - view.heartbeat).total_seconds()
