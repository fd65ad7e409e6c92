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


def test_a_restart_skips_the_children_once_they_all_succeeded(tiny_model: Path, tmp_path: Path, monkeypatch):
    config = EngineConfig(max_running=2, prefill_batch_size=2, prefill_step_size=32)
    runs = ShapePlan(2, 2, 32).runs(2)
    started: list[list[str]] = []
    codes = iter([0, 1, 0, 0])

    class Child:
        def __init__(self, argv: list[str]) -> None:
            started.append(argv)
            self.code = next(codes)

        def wait(self, timeout: float) -> int:
            return self.code

    monkeypatch.setattr(precompile.subprocess, "Popen", Child)
    cache = str(tmp_path / "kernels")
    (tmp_path / "kernels").mkdir()
    assert precompile.compile_ahead(str(tiny_model), config, runs, workers=2, cache_dir=cache) == 1
    assert len(started) == 2  # one child failed: no marker, the next start compiles ahead again
    assert precompile.compile_ahead(str(tiny_model), config, runs, workers=2, cache_dir=cache) == 2
    assert len(started) == 4
    assert precompile.compile_ahead(str(tiny_model), config, runs, workers=2, cache_dir=cache) == 2
    assert len(started) == 4  # the marker: no child started
    # Other runs (or another model's files) are another marker.
    other = ShapePlan(2, 2, 64).runs(2)
    assert precompile.marker(cache, str(tiny_model), config, other) != precompile.marker(cache, str(tiny_model),
                                                                                          config, runs)
