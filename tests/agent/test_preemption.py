"""Preemption on the real engine (tiny model, MLX CPU): a critical request that would miss its
target pauses a running low one, whose KV is kept and whose output does not change.

One batch slot: the critical request can only start by taking the low one's. References
are the same requests run alone, greedy (temperature 0) and seeded (temperature 1).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlxpool.agent.engine.generation import BatchEngine, EngineConfig
from mlxpool.agent.engine.interface import GenerationRequest, SamplingParams, TierTerms
from mlxpool.agent.engine.memory import MemoryBooks, MemoryPolicy, projected_kv_bytes
from mlxpool.agent.engine.memorybudget import UnlimitedBudget
from mlxpool.agent.engine.prompts import PromptEncoder
from mlxpool.priorities import Priority

kv_per_token: dict[BatchEngine, int] = {}
"""The KV bytes per token of each engine started here (its ModelInfo's)."""
PROMPT = "Once upon a time there was a cluster of small computers"
URGENT = TierTerms(ttft_target_s=0.05, preempt=True)


@pytest.fixture
async def make_engine(tiny_model: Path):
    started: list[BatchEngine] = []

    async def make(budget: UnlimitedBudget | None, memory: MemoryBooks | None = None) -> BatchEngine:
        engine = BatchEngine(str(tiny_model), EngineConfig(max_running=1, prefill_batch_size=1), paused_budget=budget,
                             memory=memory)
        info = await engine.start()
        started.append(engine)
        kv_per_token[engine] = info.kv_bytes_per_token or 0
        return engine

    yield make
    for engine in started:
        await engine.stop()


async def tokens_of(engine: BatchEngine) -> tuple[int, ...]:
    encoder = PromptEncoder(engine.tokenizer)
    try:
        return tuple(await encoder.encode_text(PROMPT))
    finally:
        encoder.close()


def low(request_id: str, tokens: tuple[int, ...], **sampling) -> GenerationRequest:
    return GenerationRequest(request_id, tokens, SamplingParams(max_tokens=300, **sampling), Priority.LOW)


async def ids(engine: BatchEngine, request: GenerationRequest) -> list[int]:
    return [e.token_id async for e in engine.submit(request)]


async def preempted_run(engine: BatchEngine, budget: UnlimitedBudget | MemoryBooks, request: GenerationRequest,
                        ) -> tuple[list[int], int]:
    """`request` with a critical one arriving after its 10th token; its tokens and the KV bytes held while paused."""
    got: list[int] = []
    tenth = asyncio.Event()

    async def victim() -> None:
        async for event in engine.submit(request):
            got.append(event.token_id)
            if len(got) == 10:
                tenth.set()

    task = asyncio.create_task(victim())
    await asyncio.wait_for(tenth.wait(), 30)
    critical = GenerationRequest("critical", request.prompt_tokens[:4], SamplingParams(max_tokens=40, temperature=0),
                                 Priority.CRITICAL, terms=URGENT, arrival=time.monotonic())
    stream = engine.submit(critical)
    await anext(stream)  # its first token: it runs, the low one is paused
    assert engine.stats.paused == 1
    held = budget.reserved_bytes
    if isinstance(budget, UnlimitedBudget):  # a budget of its own holds exactly the paused KV
        assert held == engine.stats.paused_kv_bytes
    rest = [e async for e in stream]
    assert rest[-1].finish_reason == "length"
    await asyncio.wait_for(task, 60)
    assert engine.stats.paused == 0 and engine.stats.paused_kv_bytes == 0 and budget.reserved_bytes == 0
    return got, held


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 11}],
                         ids=["greedy", "seeded"])
async def test_a_preempted_sequence_keeps_its_kv_and_its_output(make_engine, sampling):
    budget = UnlimitedBudget()
    engine = await make_engine(budget)
    tokens = await tokens_of(engine)
    alone = await ids(engine, low("alone", tokens, **sampling))
    got, held = await preempted_run(engine, budget, low("preempted", tokens, **sampling))
    assert got == alone and len(got) > 20  # a seeded run may end on EOS before max_tokens
    assert held > 0  # the paused KV was in the books
    stats = engine.stats
    assert stats.preemptions_total == {"low": 1} and stats.resumes_total == {"low": 1}
    assert stats.recomputed_tokens_total == 0


async def test_paused_kv_that_does_not_fit_is_recomputed_and_counted(make_engine):
    budget = UnlimitedBudget(limit_bytes=0)  # nothing may be kept
    engine = await make_engine(budget)
    tokens = await tokens_of(engine)
    alone = await ids(engine, low("alone", tokens, temperature=0.0))
    got, held = await preempted_run(engine, budget, low("preempted", tokens, temperature=0.0))
    assert held == 0
    assert got == alone
    stats = engine.stats
    assert stats.preemptions_total == {"low": 1}
    # Recomputed: the prompt and what it had produced when paused.
    assert len(tokens) + 10 <= stats.recomputed_tokens_total < len(tokens) + 300


async def test_paused_kv_is_counted_once_in_the_nodes_books(make_engine):
    """With the node's books, a paused request's KV is inside its projection (prompt + max_tokens,
    reserved at admission until it ends): pausing adds nothing, and the output is unchanged."""
    previous_limit = mx.set_memory_limit(1 << 40)  # the engine sets MLX's limit from the books: put it back after
    try:
        books = MemoryBooks(MemoryPolicy(capacity_bytes=1 << 34, headroom_bytes=0, pressure_free_bytes=0,
                                         long_request_bytes=1 << 34))
        engine = await make_engine(None, books)
        tokens = await tokens_of(engine)
        alone = await ids(engine, low("alone", tokens, temperature=0.0))
        assert books.reserved_bytes == 0
        got, held = await preempted_run(engine, books, low("preempted", tokens, temperature=0.0))
        assert got == alone
        assert engine.stats.recomputed_tokens_total == 0  # the KV was kept
        assert engine.stats.preemptions_total == {"low": 1}
        per_token = kv_per_token[engine]
        assert per_token > 0
        projections = projected_kv_bytes(len(tokens), 300, per_token) + projected_kv_bytes(4, 40, per_token)
        assert held == projections  # before the fix: projections + the paused KV
        assert books.reserved_bytes == 0
    finally:
        mx.set_memory_limit(previous_limit)


async def test_no_preemption_for_a_tier_that_may_not_or_when_a_slot_frees_in_time(make_engine):
    engine = await make_engine(UnlimitedBudget())
    tokens = await tokens_of(engine)
    running = asyncio.create_task(ids(engine, low("low", tokens, temperature=0.0)))
    await asyncio.sleep(0)
    while engine.stats.running == 0:
        await asyncio.sleep(0.005)
    patient = GenerationRequest("high", tokens[:4], SamplingParams(max_tokens=2, temperature=0), Priority.HIGH,
                                terms=TierTerms(ttft_target_s=0.05, preempt=False), arrival=time.monotonic())
    assert len(await ids(engine, patient)) == 2  # it waited for the low one to end
    assert len(await running) == 300
    assert engine.stats.preemptions_total == {}
