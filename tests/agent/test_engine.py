"""The batching engine in-process, on the real tiny model (MLX CPU backend).

Greedy decoding (temperature 0) makes outputs repeatable, so stop strings can be
checked against a reference run of the same prompt.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import pytest

from mlxpool.agent.engine.generation import BatchEngine, EngineConfig
from mlxpool.agent.engine.interface import EngineError, GenerationRequest, SamplingParams, TokenEvent
from mlxpool.agent.engine.prompts import PromptEncoder

PROMPT = "Once upon a time"


@pytest.fixture
async def engine(tiny_model: Path) -> AsyncIterator[BatchEngine]:
    engine = BatchEngine(str(tiny_model), EngineConfig(max_running=4))
    info = await engine.start()
    assert info.context_length == 2048 and info.memory_bytes > 0
    yield engine
    await engine.stop()


async def prompt_tokens(engine: BatchEngine, text: str = PROMPT) -> tuple[int, ...]:
    encoder = PromptEncoder(engine.tokenizer)
    try:
        return tuple(await encoder.encode_text(text))
    finally:
        encoder.close()


async def run(engine: BatchEngine, request_id: str, tokens: tuple[int, ...], **sampling) -> tuple[str, TokenEvent]:
    sampling.setdefault("temperature", 0.0)
    text, last = "", None
    async for event in engine.submit(GenerationRequest(request_id, tokens, SamplingParams(**sampling))):
        text += event.text
        last = event
    assert last is not None
    return text, last


async def test_max_tokens_ends_with_length(engine):
    tokens = await prompt_tokens(engine)
    text, last = await run(engine, "a", tokens, max_tokens=12)
    assert (last.finish_reason, last.completion_tokens) == ("length", 12)
    assert text
    assert engine.stats.generation_tokens_total == 12
    assert engine.stats.prompt_tokens_total == len(tokens)
    assert engine.stats.requests_finished_total == {"length": 1}


async def test_stop_string_spanning_tokens_ends_early_without_the_stop_text(engine):
    tokens = await prompt_tokens(engine)
    reference, _ = await run(engine, "ref", tokens, max_tokens=24)
    stop = reference[3:6]
    expected = reference[: reference.find(stop)]
    text, last = await run(engine, "stopped", tokens, max_tokens=24, stop=(stop,))
    assert (text, last.finish_reason) == (expected, "stop")
    assert last.completion_tokens < 24
    assert engine.stats.running == 0


async def test_concurrent_requests_share_decode_steps(engine):
    tokens = await prompt_tokens(engine)
    results = await asyncio.gather(*(run(engine, f"r{i}", tokens, max_tokens=20) for i in range(4)))
    assert [last.completion_tokens for _, last in results] == [20] * 4
    stats = engine.stats
    assert stats.generation_tokens_total == 80
    assert stats.decode_steps_total < 80  # sequences were decoded in the same steps
    assert stats.running == stats.waiting == 0


async def test_requests_beyond_max_running_wait_then_complete(engine):  # max_running=4
    tokens = await prompt_tokens(engine)
    results = await asyncio.gather(*(run(engine, f"r{i}", tokens, max_tokens=10) for i in range(7)))
    assert all(last.finish_reason == "length" for _, last in results)
    stats = engine.stats
    assert stats.generation_tokens_total == 70
    assert stats.generation_tokens_total / stats.decode_steps_total <= 4  # never more than 4 per step


async def test_closing_the_stream_removes_the_request_from_the_batch(engine):
    tokens = await prompt_tokens(engine)
    stream = engine.submit(GenerationRequest("long", tokens, SamplingParams(max_tokens=1500, temperature=0.0)))
    async with aclosing(stream):
        async for event in stream:
            if event.completion_tokens == 3:
                break
    for _ in range(200):
        if engine.stats.requests_finished_total.get("cancelled"):
            break
        await asyncio.sleep(0.01)
    assert engine.stats.requests_finished_total == {"cancelled": 1}
    assert engine.stats.running == 0
    generated = engine.stats.generation_tokens_total
    assert generated < 1500
    # The slot is free: the next request runs alone and the counter stays put afterwards.
    await run(engine, "next", tokens, max_tokens=2)
    await asyncio.sleep(0.05)
    assert engine.stats.generation_tokens_total == generated + 2


async def test_submitting_to_a_stopped_engine_fails(engine):
    tokens = await prompt_tokens(engine)
    await engine.stop()
    assert not engine.healthy
    with pytest.raises(EngineError, match="not running"):
        await run(engine, "late", tokens, max_tokens=2)


async def test_a_missing_model_fails_start(tmp_path: Path):
    engine = BatchEngine(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a directory"):
        await engine.start()
    assert not engine.healthy
