"""Shapes: the plan (pure), and the engine warming every shape before it serves (tiny model, CPU)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mlxpool.agent.engine.generation import BatchEngine, EngineConfig
from mlxpool.agent.engine.interface import GenerationRequest, SamplingParams
from mlxpool.agent.engine.shapes import (
    Shape,
    ShapeBook,
    ShapeKind,
    ShapePlan,
    group_bucket,
    length_bucket,
    pow2_buckets,
)


def test_buckets_are_powers_of_two_capped_by_the_limit():
    assert pow2_buckets(16, 2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert pow2_buckets(16, 100) == [16, 32, 64, 100]
    assert pow2_buckets(1, 16) == [1, 2, 4, 8, 16]
    assert [length_bucket(n, 2048) for n in (1, 16, 17, 2048, 5000)] == [16, 16, 32, 2048, 2048]
    assert [group_bucket(n, 16) for n in (1, 3, 9, 16)] == [1, 4, 16, 16]


def test_plan_covers_every_decode_width_and_prefill_bucket():
    plan = ShapePlan(max_running=32, prefill_concurrency=16, prefill_step_size=2048)
    shapes = plan.shapes()
    assert {s.size for s in shapes if s.kind is ShapeKind.DECODE} == set(range(1, 33))
    assert {s.size for s in shapes if s.kind is ShapeKind.PREFILL} == {16, 32, 64, 128, 256, 512, 1024, 2048}
    assert {s.size for s in shapes if s.kind is ShapeKind.PREFILL_GROUP} == {1, 2, 4, 8, 16}
    runs = plan.runs(tokens=2)
    ladder = runs[0]
    assert len(ladder.prompt_lengths) == 32 and ladder.max_tokens == tuple(range(2, 34))
    assert [r.sampler for r in runs[:2]] == ["greedy", "temperature"]


def test_top_up_names_only_the_missing_widths():
    plan = ShapePlan(max_running=4, prefill_concurrency=2, prefill_step_size=64)
    seen = {Shape(ShapeKind.DECODE, w) for w in (1, 2, 4)}
    top_up = plan.decode_top_up(seen)
    assert [len(r.prompt_lengths) for r in top_up] == [3]


def test_book_counts_an_unwarmed_shape_once_and_only_after_warm_up():
    book = ShapeBook(ShapePlan(max_running=2, prefill_concurrency=2, prefill_step_size=32))
    assert book.progress == (0, len(book.planned))
    assert book.note(Shape(ShapeKind.DECODE, 1)) is False  # during warm-up: progress, not unwarmed
    assert book.progress[0] == 1
    book.warmed = True
    assert book.note(Shape(ShapeKind.DECODE, 1)) is False  # warmed
    assert book.note(Shape(ShapeKind.DECODE, 7)) is True
    assert book.note(Shape(ShapeKind.DECODE, 7)) is False  # once
    assert book.unwarmed == {Shape(ShapeKind.DECODE, 7)}


async def _burst(engine: BatchEngine, n: int, max_tokens: int = 6) -> None:
    async def one(i: int) -> None:
        request = GenerationRequest(f"r{i}", (5 + i, 6, 7, 8), SamplingParams(max_tokens=max_tokens, temperature=0))
        async for _ in engine.submit(request):
            pass
    await asyncio.gather(*(one(i) for i in range(n)))


async def test_engine_warms_every_planned_shape_and_then_serves_none_unwarmed(tiny_model: Path):
    engine = BatchEngine(str(tiny_model), EngineConfig(max_running=8, prefill_batch_size=4, prefill_step_size=256))
    await engine.start()
    try:
        stats = engine.stats
        assert stats.warmup_shapes_total == len(ShapePlan(8, 4, 256).shapes())
        assert stats.warmup_shapes_done == stats.warmup_shapes_total
        for n in (1, 3, 8, 5):
            await _burst(engine, n)
        assert stats.unwarmed_shapes_total == 0
        assert stats.device_memory_active_bytes >= 0 and stats.device_memory_peak_bytes >= 0
    finally:
        await engine.stop()


async def test_without_warm_up_the_shapes_served_count_as_unwarmed(tiny_model: Path, caplog: pytest.LogCaptureFixture):
    engine = BatchEngine(str(tiny_model), EngineConfig(max_running=4, warmup_tokens=0))
    await engine.start()
    try:
        await _burst(engine, 1)
        await _burst(engine, 1)
        first = engine.stats.unwarmed_shapes_total
        assert first >= 2  # decode width 1, a prefill bucket, a prefill group
        warnings = [r for r in caplog.records if "unwarmed shape" in r.getMessage()]
        assert len(warnings) == first  # logged once per shape, not per request
        assert engine.stats.warmup_shapes_total == 0
    finally:
        await engine.stop()
