"""The simulated agent's inference API (a benchmark tool): its timing model holds, and it speaks
the OpenAI stream format the router and the load generators read. Not a test of the agent."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from bench.simagent import SimAgent, SimSettings
from bench.simagent_engine import TimingModel
from mlxpool.loadsignals import AgentSignals

TIMING = TimingModel(slots=2, prefill_tokens_per_second=10_000, step_base_seconds=0.02,
                     step_per_sequence_seconds=0.005, max_queue=2)


@pytest.fixture
async def agent() -> AsyncIterator[SimAgent]:
    sim = SimAgent("sim-0", 0, SimSettings(timing=TIMING))
    sim.preload("m")
    runner = web.AppRunner(sim.app(), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sim.port = runner.addresses[0][1]
    yield sim
    sim.forget_everything()
    await runner.cleanup()


def test_timing_model_formulas():
    assert TIMING.step_seconds(2) == pytest.approx(0.03)
    assert TimingModel(speed=0.5).step_seconds(1) == pytest.approx(2 * TimingModel().step_seconds(1))
    assert TIMING.decode_tokens_per_second(2) == pytest.approx(2 / 0.03)
    with pytest.raises(ValueError, match="slots"):
        TimingModel(slots=0)


async def test_a_stream_has_max_tokens_events_usage_and_takes_the_modelled_time(agent):
    async with httpx.AsyncClient(base_url=agent.url, trust_env=False, timeout=10) as client:
        started = time.perf_counter()
        async with client.stream("POST", "/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "hi " * 100}], "max_tokens": 10,
                "stream": True, "stream_options": {"include_usage": True}}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
        elapsed = time.perf_counter() - started
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert sum(1 for c in contents if c) == 10
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 10 and chunks[-1]["usage"]["prompt_tokens"] == 75
    # prefill 75 tokens at 10k tok/s, then 9 decode steps of 25 ms (batch of 1)
    assert 9 * 0.025 <= elapsed < 9 * 0.025 + 0.5


async def test_slots_queue_signals_and_refusals(agent):
    async with httpx.AsyncClient(base_url=agent.url, trust_env=False, timeout=10) as client:
        body = {"model": "m", "prompt": "x" * 400, "max_tokens": 20}
        async def settled(running: int, waiting: int) -> tuple[int, int, int]:
            deadline = time.monotonic() + 5
            while True:
                r = AgentSignals.model_validate_json((await client.get("/v1/signals")).content).models["m"]
                if (r.running, r.waiting_total) == (running, waiting) or time.monotonic() > deadline:
                    return r.running, r.waiting_total, r.slots
                await asyncio.sleep(0.005)

        busy = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(2)]
        assert await settled(2, 0) == (2, 0, 2)  # both slots taken
        busy += [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(2)]
        assert await settled(2, 2) == (2, 2, 2)  # the next two wait
        refused = await client.post("/v1/completions", json=body)  # 2 waiting = max_queue
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "queue_full"
        answers = await asyncio.gather(*busy)
        assert all(a.json()["usage"]["completion_tokens"] == 20 for a in answers)
        again = (await client.post("/v1/completions", json=body)).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the prefix cache held it
        missing = await client.post("/v1/completions", json={**body, "model": "nope"})
        assert missing.status_code == 404
        bad = await client.post("/v1/completions", json={**body, "max_tokens": 0})
        assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
