"""Shapes: the plan (pure), the samplers' compiles, and the engine warming every shape before
it serves (tiny model, CPU)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from mlxpool.agent.engine import sampling
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


def test_cpu_plan_runs_short_ladders_and_one_prompt_and_covers_the_same_shapes():
    full = ShapePlan(max_running=32, prefill_concurrency=16, prefill_step_size=2048)
    cpu = ShapePlan(max_running=32, prefill_concurrency=16, prefill_step_size=2048, cpu=True)
    assert cpu.shapes() == full.shapes()
    for tokens in (2, 4):  # one ladder, whatever the tokens asked: each step is a forward pass
        runs = cpu.runs(tokens=tokens)
        assert [(r.prompt_lengths, r.max_tokens, r.sampler) for r in runs] == [((16, 16), (2, 3), "temperature")]
    assert [(r.prompt_lengths, r.max_tokens) for r in ShapePlan(1, 1, 64, cpu=True).runs(4)] == [((16,), (2,))]
    assert [len(r.prompt_lengths) for r in cpu.decode_top_up({Shape(ShapeKind.DECODE, 1)})] == [2]
    book = ShapeBook(cpu)
    book.cover()
    book.warmed = True
    assert book.progress == (len(book.planned), len(book.planned))
    assert not any(book.note(s) for s in full.shapes())


def test_sampler_filters_match_mlx_lm_and_compile_once_whatever_the_values_and_widths():
    logits = mx.random.normal((4, 512), key=mx.random.key(0))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    (top_p, ), (min_p, ), (top_k, ) = (sampling._filters(512, p, k, m) for p, k, m in
                                       ((0.9, 0, 0.0), (1.0, 0, 0.1), (1.0, 20, 0.0)))
    assert mx.array_equal(top_p(logprobs), apply_top_p(logprobs, 0.9)).item()
    assert mx.array_equal(min_p(logprobs), apply_min_p(logprobs, 0.1)).item()
    assert mx.array_equal(top_k(logprobs), apply_top_k(logprobs, 20)).item()
    sampling.warm_samplers(512, [1, 2])
    before = sampling.compiles()
    for width, (temperature, p, k, m) in zip((3, 7, 1, 32), ((0.7, 0.95, 0, 0.0), (1.3, 1.0, 7, 0.0),
                                                             (0.5, 0.5, 3, 0.01), (0.9, 0.8, 0, 0.2)), strict=True):
        sampler = sampling.SamplerFactory(512).sampler(SamplingParams(max_tokens=1, temperature=temperature,
                                                                      top_p=p, top_k=k, min_p=m))
        assert sampler(mx.zeros((width, 512))).shape == (width,)
    assert sampling.compiles() == before


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


async def _burst(engine: BatchEngine, n: int, max_tokens: int = 6, temperature: float = 0.0, top_p: float = 1.0,
                 prompt: int = 4) -> None:
    async def one(i: int) -> None:
        request = GenerationRequest(f"r{i}", (5 + i, *range(6, 6 + prompt - 1)),
                                    SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p))
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
        compiled = sampling.compiles()  # the CPU plan's one ladder + warm_samplers compiled every filter
        for n in (1, 3, 8, 5):
            await _burst(engine, n)
        await _burst(engine, 6, temperature=0.8, top_p=0.93, prompt=200)  # a new width, a value and a length
        assert sampling.compiles() == compiled
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
