"""Compiling the warm-up ahead in child processes (CUDA only; the children run here on the CPU)."""

from __future__ import annotations

from pathlib import Path

from mlxpool.agent.engine import precompile
from mlxpool.agent.engine.interface import AcceleratorKind, EngineConfig
from mlxpool.agent.engine.shapes import ShapePlan


def test_only_on_cuda_with_a_kernel_cache():
    assert precompile.wanted(AcceleratorKind.CUDA, {"MLX_PTX_CACHE_DIR": "/tmp/k"})
    assert not precompile.wanted(AcceleratorKind.CUDA, {})
    assert not precompile.wanted(AcceleratorKind.CPU, {"MLX_PTX_CACHE_DIR": "/tmp/k"})
    assert not precompile.wanted(AcceleratorKind.METAL, {"MLX_PTX_CACHE_DIR": "/tmp/k"})


def test_shares_cover_every_run_once_and_spread_the_ladders():
    runs = ShapePlan(32, 16, 2048).runs(4)
    shares = precompile.split(runs, 4)
    assert len(shares) == 4 and sorted(map(id, (r for s in shares for r in s))) == sorted(map(id, runs))
    assert shares[0][0] is runs[0] and shares[1][0] is runs[1]  # greedy and temperature ladders apart
    assert precompile.split(runs[:2], 4) == [[runs[0]], [runs[1]]]
    assert precompile.split(runs, 0) == [runs]


def test_children_run_their_shares_and_exit_zero(tiny_model: Path):
    config = EngineConfig(max_running=2, prefill_batch_size=2, prefill_step_size=32)
    runs = ShapePlan(2, 2, 32).runs(2)
    assert precompile.compile_ahead(str(tiny_model), config, runs, workers=2, timeout_s=120) == 2
