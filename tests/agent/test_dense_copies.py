"""Dense copies of quantized linears (`engine.densecopies`): the choice of width is pure and
tested alone; the copies themselves on a real 4-bit model (the tiny model quantized with
mlx-lm's own `convert`), in-process on MLX's CPU backend, where `auto` makes none."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from mlxpool.agent.engine import densecopies, loading
from mlxpool.agent.engine.generation import BatchEngine, EngineConfig
from mlxpool.agent.engine.interface import (
    AcceleratorKind,
    DenseCopyPolicy,
    GenerationRequest,
    LoadOptions,
    SamplingParams,
)

NEVER = densecopies.NEVER
GiB = 1 << 30


@pytest.fixture(scope="module")
def quantized_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("quantized") / "tiny-4bit"
    convert(str(tiny_model), mlx_path=str(out), quantize=True, q_group_size=32, q_bits=4)
    return out


def test_min_rows_is_where_dense_wins_from_then_on():
    # MLX CUDA's shape: the quantized step grows with width, the dense one stays flat.
    h200 = {1: (7.8, 9.0), 2: (12.2, 9.1), 4: (20.7, 9.2), 8: (33.0, 9.3), 16: (56.0, 9.5), 32: (104.3, 9.9)}
    assert densecopies.choose_min_rows(h200) == 2
    # An island of noise below the crossover does not pull the threshold down.
    assert densecopies.choose_min_rows({1: (5, 4), 2: (6, 7), 4: (9, 7), 8: (12, 8)}) == 4
    assert densecopies.choose_min_rows({1: (5, 6), 2: (6, 7), 4: (9, 9.5)}) == NEVER
    assert densecopies.choose_min_rows({}) == NEVER


@given(st.dictionaries(st.sampled_from([1, 2, 4, 8, 16, 32]),
                       st.tuples(st.floats(0.001, 1.0), st.floats(0.001, 1.0)), max_size=6))
def test_min_rows_is_a_suffix_where_dense_is_faster(timings):
    chosen = densecopies.choose_min_rows(timings)
    if chosen == NEVER:
        assert not timings or timings[max(timings)][1] >= timings[max(timings)][0]
        return
    assert all(d < q for w, (q, d) in timings.items() if w >= chosen)
    below = [w for w in timings if w < chosen]
    if below:  # the next narrower width is where it stopped winning
        q, d = timings[max(below)]
        assert d >= q


def test_auto_makes_copies_on_cuda_only_where_they_fit():
    assert densecopies.wanted(DenseCopyPolicy.AUTO, AcceleratorKind.CUDA, 140 * GiB, 16 * GiB)
    assert not densecopies.wanted(DenseCopyPolicy.AUTO, AcceleratorKind.CUDA, 40 * GiB, 16 * GiB)
    assert not densecopies.wanted(DenseCopyPolicy.AUTO, AcceleratorKind.METAL, 192 * GiB, 16 * GiB)
    assert not densecopies.wanted(DenseCopyPolicy.AUTO, AcceleratorKind.CPU, None, 1)
    assert densecopies.wanted(DenseCopyPolicy.ON, AcceleratorKind.CPU, None, 1)
    assert not densecopies.wanted(DenseCopyPolicy.ON, AcceleratorKind.CPU, None, 0)  # nothing quantized
    assert not densecopies.wanted(DenseCopyPolicy.OFF, AcceleratorKind.CUDA, 140 * GiB, 1)


def test_copies_compute_what_the_quantized_kernel_does(quantized_model: Path):
    plain = loading.load(quantized_model, LoadOptions(dense_copies=DenseCopyPolicy.OFF))
    loaded = loading.load(quantized_model, LoadOptions(dense_copies=DenseCopyPolicy.ON))
    try:
        assert plain.dense is None and loaded.dense is not None
        dense = loaded.dense
        assert dense.bytes == densecopies.dense_bytes(loaded.model) > 0
        assert loaded.info.memory_bytes == plain.info.memory_bytes + dense.bytes
        # The copies are no parameters: pinning, residency and identity see the same arrays.
        assert [k for k, _ in tree_flatten(loaded.model.parameters())] == [
            k for k, _ in tree_flatten(plain.model.parameters())]
        tokens = mx.array([[5, 9, 13, 17, 21, 25, 29, 33]] * 3)
        quantized = loaded.model(tokens)
        dense.switch.min_rows = 0
        from_copies = loaded.model(tokens)
        assert mx.allclose(quantized, plain.model(tokens)).item()  # NEVER: the quantized kernel
        assert mx.allclose(from_copies, quantized, rtol=1e-3, atol=1e-3).item()
        # The real measurement: both paths timed on the model's own decode steps, switch restored.
        dense.switch.min_rows = 7
        timings = densecopies.measure(dense, densecopies.decode_step(loaded.model), [1, 2], repeats=1)
        assert sorted(timings) == [1, 2] and all(q > 0 and d > 0 for q, d in timings.values())
        assert dense.switch.min_rows == 7
        dense.drop()
        assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
        assert mx.array_equal(loaded.model(tokens), quantized).item()
    finally:
        plain.weights.close()
        loaded.weights.close()


async def _greedy(engine: BatchEngine, n: int = 8) -> list[int]:
    request = GenerationRequest("r", (5, 9, 13, 17), SamplingParams(n, temperature=0.0))
    return [event.token_id async for event in engine.submit(request)]


@pytest.mark.parametrize("dense_wins_from", [2, None])
async def test_engine_keeps_copies_only_where_they_win(quantized_model: Path, monkeypatch, dense_wins_from):
    measured: list[list[int]] = []

    def measure(copies, step, widths, repeats=3):
        measured.append(widths)
        wins = dense_wins_from or math.inf
        return {w: (1.0, 0.5 if w >= wins else 2.0) for w in widths}

    monkeypatch.setattr(densecopies, "measure", measure)
    reference = BatchEngine(str(quantized_model), EngineConfig(max_running=4))
    engine = BatchEngine(str(quantized_model), EngineConfig(max_running=4, load=LoadOptions(
        dense_copies=DenseCopyPolicy.ON)))
    plain_info = await reference.start()
    info = await engine.start()
    try:
        assert measured == [[1, 2, 4]]  # the measured widths stop at the decode concurrency
        stats = engine.stats
        if dense_wins_from is None:
            assert stats.dense_copy_bytes == 0 and stats.dense_from_rows == 0
            assert info.memory_bytes == plain_info.memory_bytes
        else:
            assert stats.dense_from_rows == 2 and stats.dense_copy_bytes > 0
            assert info.memory_bytes == plain_info.memory_bytes + stats.dense_copy_bytes
        # A width-1 decode stays quantized, the 4-token prefill computes from the copies: greedy
        # output is the reference's either way.
        assert await _greedy(engine) == await _greedy(reference)
    finally:
        await engine.stop()
        await reference.stop()


async def test_a_restart_reuses_the_measured_crossover(quantized_model: Path, tmp_path: Path, monkeypatch):
    measured: list[list[int]] = []

    def measure(copies, step, widths, repeats=7):
        measured.append(widths)
        return {w: (1.0, 0.5 if w >= 4 else 2.0) for w in widths}

    monkeypatch.setattr(densecopies, "measure", measure)
    # As on CUDA with a kernel cache (the CPU engine would compile nothing ahead).
    from mlxpool.agent.engine import precompile

    monkeypatch.setattr(precompile, "wanted", lambda kind, environ=None: True)
    monkeypatch.setattr(precompile, "compile_ahead", lambda *a, **k: 0)
    monkeypatch.setenv(precompile.CACHE_ENV, str(tmp_path))
    config = EngineConfig(max_running=4, load=LoadOptions(dense_copies=DenseCopyPolicy.ON))
    for _ in range(2):
        engine = BatchEngine(str(quantized_model), config)
        await engine.start()
        try:
            assert engine.stats.dense_from_rows == 4
        finally:
            await engine.stop()
    assert measured == [[1, 2, 4]]  # the second start read it back
    (record,) = tmp_path.glob("mlxpool-dense-*")
    record.write_text("not json")  # unreadable: measured again, not trusted
    engine = BatchEngine(str(quantized_model), config)
    await engine.start()
    await engine.stop()
    assert len(measured) == 2


@pytest.mark.parametrize("dense_wins_from", [2, None])
async def test_the_books_count_the_kept_copies_beside_a_tensor_share(quantized_model: Path, monkeypatch,
                                                                      dense_wins_from):
    from mlxpool.agent.engine.memory import MemoryBooks, MemoryPolicy
    from mlxpool.agent.engine.tensorshare import TensorShare
    from mlxpool.agent.operations.identity import content_identity

    wins = dense_wins_from or math.inf
    monkeypatch.setattr(densecopies, "measure",
                        lambda copies, step, widths, repeats=7: {w: (1.0, 0.5 if w >= wins else 2.0) for w in widths})
    books = MemoryBooks(MemoryPolicy(capacity_bytes=1 << 34, headroom_bytes=0, pressure_free_bytes=0,
                                     long_request_bytes=0))
    engine = BatchEngine(str(quantized_model), EngineConfig(max_running=4, load=LoadOptions(
        dense_copies=DenseCopyPolicy.ON)), name="q", memory=books, tensor_share=TensorShare(),
        tensor_digests=content_identity(quantized_model).tensors)
    info = await engine.start()
    try:
        # One model alone: every byte it holds counted once, its kept copies included (and
        # none of theirs once dropped).
        assert books.weights_bytes == info.memory_bytes
        assert (engine.stats.dense_copy_bytes > 0) == (dense_wins_from is not None)
    finally:
        await engine.stop()
