"""Node monitors: probe verdicts (a refused connection at once, timeouts twice in a row),
deferred unloads, and the InferenceNode's Ready condition, as the monitor task applies
them (the decisions alone are tabled in test_monitor_decisions). Faked: the prober (a
script of results), the agents and the API (recorders); the fleet is the real one."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from mlxpool.agentapi import ModelPhase, ModelState, NodeReport
from mlxpool.nodes import Hardware
from mlxpool.operator.io.agentclient import AgentError
from mlxpool.operator.logic.endpoints import ProbeResult
from mlxpool.operator.logic.fleet import Fleet
from mlxpool.operator.logic.observations import HEALTH
from mlxpool.operator.logic.placement import NodeView
from mlxpool.operator.reconcilers.monitors import MARK_WRITES_IN_FLIGHT, NodeMonitors

UP = ProbeResult(True)
SLOW = ProbeResult(False, "no answer to GET /health within 0.5s", timed_out=True)
REFUSED = ProbeResult(False, "cannot connect: refused")


class ScriptedProber:
    watches = False  # probed every interval, as an agent without a health watch is

    def __init__(self, script: list[ProbeResult]) -> None:
        self.script = script
        self.done = asyncio.Event()

    async def watch(self, endpoint: str, alive) -> str:
        raise AssertionError("this prober watches nothing")

    async def probe(self, endpoint: str, reason: str = "scheduled") -> ProbeResult:
        if len(self.script) == 1:
            self.done.set()
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


class Agents:
    def __init__(self) -> None:
        self.unloads: list[str] = []

    async def node(self, url: str):
        raise AgentError(404, "no ops API")

    async def unload(self, url: str, model: str) -> ModelState:
        self.unloads.append(model)
        return ModelState(name=model, phase=ModelPhase.UNLOADING)


class Kube:
    def __init__(self) -> None:
        self.written: list[tuple[str, str]] = []

    async def patch_node_status(self, name: str, status: Mapping) -> None:
        (condition,) = status["conditions"]
        self.written.append((condition["status"], condition["reason"]))


async def watch(script: list[ProbeResult], age: float = 1.0, fleet: Fleet | None = None):
    """Run one monitor through `script`; returns the probe results the fleet saw, in order,
    and the conditions written."""
    fleet = fleet or Fleet()
    seen: list[bool] = []
    fleet.observed.subscribe(lambda node, what: seen.append(fleet.observed.of(node).probe.healthy)
                             if what is HEALTH else None)
    now = datetime.now(UTC)
    fleet.observed.set_view(NodeView(name="n", endpoint="http://n", labels={}, ready=True,
                                     heartbeat=now - timedelta(seconds=age), free_memory_bytes=None,
                                     models=frozenset()))
    prober, agents, kube = ScriptedProber(script), Agents(), Kube()
    monitors = NodeMonitors(fleet, prober, agents, kube, default_interval=0.01, override_interval=0.01,
                            report_interval=60, stale_after=30)
    monitors.ensure("n")
    await asyncio.wait_for(prober.done.wait(), 5)
    await asyncio.sleep(0.05)
    await monitors.close()
    return seen, kube.written, agents


async def test_one_timeout_is_not_a_verdict_two_are():
    seen, written, _ = await watch([UP, SLOW, UP, SLOW, SLOW, UP])
    assert seen == [True, False, True]
    assert written == [("True", "AgentReady"), ("False", "HealthProbeFailed"), ("True", "AgentReady")]


async def test_a_refused_connection_is_a_verdict_at_once():
    seen, written, _ = await watch([UP, REFUSED, UP])
    assert seen == [True, False, True]
    assert written == [("True", "AgentReady"), ("False", "HealthProbeFailed"), ("True", "AgentReady")]


async def test_a_stale_heartbeat_marks_the_node():
    _, written, _ = await watch([UP], age=300)
    assert written == [("False", "HeartbeatStale")]


async def test_deferred_unloads_happen_when_the_agent_answers_again():
    fleet = Fleet()
    fleet.claims.defer_unload("n", "x")
    _, _, agents = await watch([REFUSED, REFUSED, UP], fleet=fleet)
    assert agents.unloads == ["x"] and fleet.claims.deferred_unloads("n") == []


class WatchedProber:
    """An agent with a health watch: it speaks, then dies (`kill`), closing the watch."""

    watches = True

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.dead = False
        self.killed = asyncio.Event()
        self.failed = asyncio.Event()

    async def watch(self, endpoint: str, alive) -> str:
        alive()
        await self.killed.wait()
        return "the health watch broke: RemoteProtocolError"

    async def probe(self, endpoint: str, reason: str = "scheduled") -> ProbeResult:
        self.reasons.append(reason)
        if self.dead:
            self.failed.set()
            return REFUSED
        return UP


async def test_a_watched_agent_is_probed_rarely_and_at_once_when_its_watch_ends():
    fleet = Fleet()
    fleet.observed.set_view(NodeView(name="n", endpoint="http://n", labels={}, ready=True,
                                     heartbeat=datetime.now(UTC), free_memory_bytes=None, models=frozenset()))
    prober = WatchedProber()
    # A 0.05 s interval, but 1,000 probes' worth of budget per node: periodic probes come
    # every 20 s once the watch is open (one node, 0.05 probes a second).
    monitors = NodeMonitors(fleet, prober, Agents(), Kube(), default_interval=0.05, override_interval=0.05,
                            report_interval=60, stale_after=30, probes_per_second=0.05)
    monitors.ensure("n")
    await asyncio.sleep(0.5)  # ten ticks
    assert prober.reasons == ["first"], prober.reasons  # the first probe, then the watch only
    prober.dead = True
    prober.killed.set()
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(prober.failed.wait(), 1)
    assert asyncio.get_running_loop().time() - started < 0.1  # woken by the watch, not by a tick
    assert prober.reasons[1] == "suspected"
    await asyncio.sleep(0.05)
    assert not fleet.observed.of("n").probe.healthy
    await monitors.close()


class ReportingAgents(Agents):
    def __init__(self) -> None:
        super().__init__()
        self.reports = 0
        self.models: list[ModelState] = []

    async def node(self, url: str) -> NodeReport:
        self.reports += 1
        return NodeReport(name="n", endpoint="http://n", max_models=4, agent_version="t", models=self.models,
                          hardware=Hardware(chip="c", memory_bytes=1, cpu_cores=1, accelerator="cpu", platform="p"))


async def test_a_monitor_at_rest_sleeps_until_something_is_due_and_wakes_for_a_load():
    # A 0.02 s interval; watched, so probed every 1,000 / 50 = 20 s and reported on every
    # 60 s: at rest it must not tick every interval (it would tick ~25 times in 0.5 s).
    fleet = Fleet()
    fleet.observed.set_view(NodeView(name="n", endpoint="http://n", labels={}, ready=True,
                                     heartbeat=datetime.now(UTC), free_memory_bytes=None, models=frozenset()))
    agents = ReportingAgents()
    monitors = NodeMonitors(fleet, WatchedProber(), agents, Kube(), default_interval=0.02, override_interval=0.02,
                            report_interval=60, stale_after=30, probes_per_second=0.05)
    monitors.ensure("n")
    await asyncio.sleep(0.5)
    assert monitors.ticks <= 4 and agents.reports == 1, (monitors.ticks, agents.reports)
    # A pool starts a load there: the monitor wakes and follows it at every interval.
    agents.models = [ModelState(name="m", phase=ModelPhase.LOADING)]
    fleet.observed.note_model("n", agents.models[0])
    await asyncio.sleep(0.2)
    assert agents.reports >= 3, agents.reports
    await monitors.close()


class SlowKube(Kube):
    def __init__(self) -> None:
        super().__init__()
        self.in_flight = self.most = 0

    async def patch_node_status(self, name: str, status: Mapping) -> None:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await asyncio.sleep(0.02)
        self.in_flight -= 1
        await super().patch_node_status(name, status)


async def test_ready_condition_writes_are_bounded_fleet_wide():
    fleet = Fleet()
    for i in range(40):
        fleet.observed.set_view(NodeView(name=f"n{i}", endpoint=f"http://n{i}", labels={}, ready=True,
                                         heartbeat=datetime.now(UTC), free_memory_bytes=None, models=frozenset()))
    kube = SlowKube()
    monitors = NodeMonitors(fleet, ScriptedProber([UP]), Agents(), kube, default_interval=0.01,
                            override_interval=0.01, report_interval=60, stale_after=30)
    for i in range(40):
        monitors.ensure(f"n{i}")
    for _ in range(100):
        if len(kube.written) == 40:
            break
        await asyncio.sleep(0.02)
    await monitors.close()
    assert kube.written == [("True", "AgentReady")] * 40  # each node once: coalesced, not repeated per tick
    assert kube.most == MARK_WRITES_IN_FLIGHT
