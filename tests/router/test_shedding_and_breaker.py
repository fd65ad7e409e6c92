"""Priority-aware shedding, the circuit breaker, and streams that break or stall mid-way."""

from __future__ import annotations

import asyncio
import json

import pytest

from mlxpool.loadsignals import AgentSignals, ModelSignals
from mlxpool.priorities import Priority
from mlxpool.router.picking.filters import CircuitBreakerFilter
from mlxpool.router.picking.plugins import PickRequest
from mlxpool.router.picking.shedding import SheddingPolicy, shed
from mlxpool.router.picking.signals import Breaker, EndpointSignals, Freshness, LoadView
from mlxpool.router.settings import SignalSettings
from mlxpool.routing import RouteEndpoint

from .conftest import make_table


def view(running: int, waiting: int = 0, slots: int = 4, queued: int = 0, rate: float = 1000.0,
         step: float = 0.01) -> LoadView:
    report = ModelSignals(waiting={Priority.NORMAL: waiting} if waiting else {}, running=running, slots=slots,
                          queued_prompt_tokens=queued, prefill_tokens_per_second=rate, decode_step_seconds=step)
    return LoadView(Freshness.FRESH, report)


POLICY = SheddingPolicy()  # background at slot usage 1.0, low at 1.5, nothing else


def test_background_goes_first_then_low_and_critical_never():
    full = [view(4), view(4)]  # usage 1.0 everywhere
    assert shed(Priority.BACKGROUND, full, POLICY) is not None
    assert shed(Priority.LOW, full, POLICY) is None
    deep = [view(4, waiting=2), view(4, waiting=4)]  # 1.5 and 2.0
    assert [shed(p, deep, POLICY) is not None for p in Priority] == [False, False, False, True, True]
    assert shed(Priority.BACKGROUND, [view(4), view(3)], POLICY) is None  # one endpoint has room


def test_nothing_is_shed_without_fresh_knowledge():
    stale = LoadView(Freshness.STALE, saturated=True)
    assert shed(Priority.BACKGROUND, [stale, stale], POLICY) is None
    assert shed(Priority.BACKGROUND, [view(4), LoadView(Freshness.NONE)], POLICY) is None
    assert shed(Priority.BACKGROUND, [view(4), stale], POLICY) is not None  # stale counts as saturated


def test_retry_after_is_the_least_loaded_endpoints_drain_time():
    # queued 3000 tokens at 1000/s = 3 s, plus 4 waiting over 4 slots x 128 steps x 10 ms = 1.28 s
    slow = view(4, waiting=4, queued=3000)
    fast = view(4, waiting=2, queued=500)  # 0.5 s + 0.64 s
    assert shed(Priority.BACKGROUND, [slow, fast], POLICY) == 2
    assert shed(Priority.BACKGROUND, [view(4, waiting=4, queued=10**7)], POLICY) == 60
    assert shed(Priority.BACKGROUND, [view(4)], POLICY) == 1


@pytest.mark.parametrize(("thresholds", "needle"), [
    ({Priority.CRITICAL: 5.0}, "critical requests are never shed"),
    ({Priority.BACKGROUND: 2.0, Priority.LOW: 1.0}, "must not have a lower threshold"),
    ({Priority.LOW: 1.0}, "tier background has no threshold"),
    ({Priority.BACKGROUND: 0.0}, "positive"),
])
def test_bad_shedding_policies_are_refused(thresholds, needle):
    with pytest.raises(ValueError, match=needle):
        SheddingPolicy(thresholds)


def test_breaker_opens_half_opens_for_one_probe_and_closes_or_reopens():
    signals = EndpointSignals(breaker_failures=3, breaker_open_seconds=5.0)
    url = "http://a"
    assert not signals.failed(url, 0.0) and not signals.failed(url, 0.1)
    assert signals.breaker(url, 0.2) is Breaker.CLOSED
    assert signals.failed(url, 0.2)  # third in a row
    assert signals.breaker(url, 5.1) is Breaker.OPEN and not signals.admits(url, 5.1)
    assert signals.breaker(url, 5.3) is Breaker.HALF_OPEN and signals.admits(url, 5.3)
    signals.attempting(url, 5.3)
    assert not signals.admits(url, 5.4)  # one probe at a time
    assert signals.failed(url, 5.5)  # the probe failed: open again, from now
    assert signals.breaker(url, 10.4) is Breaker.OPEN and signals.breaker(url, 10.6) is Breaker.HALF_OPEN
    signals.attempting(url, 10.6)
    signals.succeeded(url)
    assert signals.breaker(url, 10.7) is Breaker.CLOSED and signals.get(url).failures == 0
    assert signals.failed(url, 11.0, trip=True)  # a refused connection trips at once


def test_breaker_filter_skips_open_endpoints_but_never_all():
    signals = EndpointSignals(breaker_failures=1)
    eps = [RouteEndpoint(node=n, url=f"http://{n}") for n in "ab"]
    signals.failed("http://a", 0.0)
    request = PickRequest("m", now=1.0)
    assert [e.node for e in CircuitBreakerFilter().filter(request, eps, signals)] == ["b"]
    signals.failed("http://b", 0.0)
    assert [e.node for e in CircuitBreakerFilter().filter(request, eps, signals)] == ["a", "b"]


def saturated_report() -> dict:
    return AgentSignals(models={"m": ModelSignals(running=4, slots=4, waiting={Priority.NORMAL: 4},
                                                  queued_prompt_tokens=2000, prefill_tokens_per_second=1000,
                                                  decode_step_seconds=0.01)}).model_dump(mode="json")


async def test_a_saturated_pool_refuses_background_with_retry_after_and_serves_critical(agents, start_router):
    fleet = [await agents(n, signals=saturated_report()) for n in ("a", "b")]
    router = await start_router(make_table({"m": [(a.node, a.url) for a in fleet]}),
                                signals=SignalSettings(interval=0.05, max_age=2.0))
    async with asyncio.timeout(5):
        while any(router.app.state.signals.get(a.url).reported is None for a in fleet):
            await asyncio.sleep(0.02)

    refused = await router.complete(priority="background")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "4"  # 2 s of prefill + 4 waiting / 4 slots x 128 x 10 ms, rounded up
    assert refused.json()["error"]["code"] == "pool_saturated"
    assert (await router.client.post("/v1/completions", json={"model": "m", "prompt": "hi"},
                                     headers={"x-priority": "low"})).status_code == 429  # usage 2.0 >= 1.5
    for tier in ("critical", "high", "normal"):
        assert (await router.complete(priority=tier)).status_code == 200, tier
    assert sum(len(a.received) for a in fleet) == 3
    assert 'mlxpool_router_shed_requests_total{model="m",priority="background"} 1.0' in await router.metrics()


async def test_5xx_bursts_open_the_breaker_and_a_probe_closes_it(agents, start_router):
    bad, good = await agents("bad", status=500), await agents("good")
    router = await start_router(make_table({"m": [("bad", bad.url), ("good", good.url)]}),
                                breaker_failures=2, breaker_open_seconds=2.0)
    for _ in range(6):
        assert (await router.complete()).status_code == 200  # failover answers every one
    assert len(bad.received) == 2  # after two 5xx in a row, the breaker keeps requests away
    assert 'mlxpool_router_breaker_trips_total{endpoint="bad"} 1.0' in await router.metrics()

    bad.status = 200  # it recovers; after the open time one probe goes, and succeeds
    await asyncio.sleep(2.1)
    nodes = [(await router.complete()).json()["node"] for _ in range(4)]
    assert "bad" in nodes and len(bad.received) >= 3
    assert router.app.state.signals.breaker(bad.url, asyncio.get_running_loop().time()) is Breaker.CLOSED


async def test_timeouts_count_toward_the_breaker(agents, start_router):
    slow, good = await agents("slow", first_byte_delay=5), await agents("good")
    router = await start_router(make_table({"m": [("slow", slow.url), ("good", good.url)]}),
                                first_byte_timeout=1.0, breaker_failures=1, breaker_open_seconds=30)
    for _ in range(4):
        answer = await router.complete()
        assert answer.json().get("node") == "good", answer.text
    assert len(slow.received) == 1


async def test_a_stream_that_stalls_after_the_first_byte_ends_with_an_error_event(agents, start_router):
    agent = await agents("a", release=asyncio.Queue())  # first chunk, then silence
    router = await start_router(make_table({"m": [("a", agent.url)]}), read_timeout=0.5)

    async with asyncio.timeout(10):  # never a hang
        response = await router.complete(stream=True)
    events = [json.loads(line.removeprefix("data: ")) for line in response.text.splitlines() if line]
    assert events[0] == {"node": "a", "i": 0}
    assert events[-1]["error"]["code"] == "stream_interrupted"
