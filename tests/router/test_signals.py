"""Agents' load reports: staleness rules (pure) and the poller against fake agents."""

from __future__ import annotations

import asyncio

import pytest

from mlxpool.loadsignals import AgentSignals, ModelSignals
from mlxpool.priorities import Priority
from mlxpool.router.picking.signals import EndpointSignals, Freshness
from mlxpool.router.settings import SignalSettings, StalePolicy

from .conftest import make_table

URL = "http://a"


def test_a_fresh_report_is_trusted_and_ages_into_the_stale_policy():
    report = ModelSignals(waiting={Priority.LOW: 2}, running=3, slots=4)
    for policy, saturated in [(StalePolicy.SATURATED, True), (StalePolicy.FALLBACK, False)]:
        signals = EndpointSignals(max_age=0.2, stale_policy=policy)
        assert signals.load(URL, "m", now=1.0).freshness is Freshness.NONE  # never reported: local counts
        signals.report(URL, {"m": report}, draining=False, now=10.0)
        fresh = signals.load(URL, "m", now=10.2)
        assert (fresh.freshness, fresh.report, fresh.saturated) == (Freshness.FRESH, report, False)
        stale = signals.load(URL, "m", now=10.21)
        assert (stale.freshness, stale.report, stale.saturated) == (Freshness.STALE, None, saturated)
        assert signals.age(URL, 10.5) == pytest.approx(0.5)


def test_a_draining_agent_or_one_without_the_model_counts_as_saturated():
    signals = EndpointSignals()
    signals.report(URL, {"m": ModelSignals(slots=4)}, draining=True, now=0.0)
    assert signals.load(URL, "m", 0.1).saturated
    signals.report(URL, {"m": ModelSignals(slots=4)}, draining=False, now=0.0)
    assert not signals.load(URL, "m", 0.1).saturated
    assert signals.load(URL, "other", 0.1).saturated


def test_model_signals_derive_free_slots_and_usage():
    s = ModelSignals(waiting={Priority.HIGH: 1}, running=2, slots=4)
    assert (s.waiting_total, s.free_slots, s.slot_usage) == (1, 1, 0.75)
    assert ModelSignals().slot_usage == 0.0 and ModelSignals().free_slots == 0


def test_signal_settings_reject_bad_values():
    for bad in [{"interval": -1}, {"max_age": 0}, {"interval": 1.0, "max_age": 0.5}, {"timeout": 0}]:
        with pytest.raises(ValueError, match="signals"):
            SignalSettings(**bad)


async def test_the_router_polls_reports_and_a_silent_agent_goes_stale(agents, start_router):
    report = AgentSignals(models={"m": ModelSignals(running=1, slots=8)}).model_dump(mode="json")
    a = await agents("a", signals=report)
    b = await agents("b")  # an older agent: 404, local counts only
    router = await start_router(make_table({"m": [("a", a.url), ("b", b.url)]}),
                                signals=SignalSettings(interval=0.05, max_age=0.3))
    signals = router.app.state.signals
    clock = asyncio.get_running_loop().time

    async with asyncio.timeout(5):
        while signals.load(a.url, "m", clock()).freshness is not Freshness.FRESH:
            await asyncio.sleep(0.02)
    assert signals.load(a.url, "m", clock()).report.running == 1
    assert signals.load(b.url, "m", clock()).freshness is Freshness.NONE
    polls = b.signal_polls
    await asyncio.sleep(0.3)
    assert b.signal_polls == polls  # a 404 is not asked again at every tick
    metrics = await router.metrics()
    assert 'mlxpool_router_endpoint_signal_age_seconds{endpoint="a"}' in metrics
    assert 'mlxpool_router_endpoint_signal_age_seconds{endpoint="b"} -1.0' in metrics

    a.signals_status = 503  # the agent stops reporting: the last report ages past the bound
    async with asyncio.timeout(5):
        while signals.load(a.url, "m", clock()).freshness is not Freshness.STALE:
            await asyncio.sleep(0.02)
    assert signals.load(a.url, "m", clock()).saturated
    age = float(next(line.split()[-1] for line in (await router.metrics()).splitlines()
                     if line.startswith('mlxpool_router_endpoint_signal_age_seconds{endpoint="a"}')))
    assert age > 0.3
