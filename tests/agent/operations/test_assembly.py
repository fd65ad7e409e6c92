"""Building the operations side from settings, and the status nudger's coalescing."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mlxpool.agent.config import MultiModel, WeightManagement
from mlxpool.agent.engine.interface import Accelerator, AcceleratorKind, DeviceMemory, DeviceProbe
from mlxpool.agent.node.hardware import physical_memory_bytes
from mlxpool.agent.operations.assembly import Operations, StatusNudger
from mlxpool.agent.serving.lifecycle import Lifecycle
from mlxpool.agent.serving.repository import ModelRepository

CPU = DeviceProbe(lambda: Accelerator(AcceleratorKind.CPU, "x86_64", None), lambda: DeviceMemory(0, 0, 0))
H200 = DeviceProbe(lambda: Accelerator(AcceleratorKind.CUDA, "NVIDIA H200", 140 << 30),
                   lambda: DeviceMemory(4 << 30, 5 << 30, 1 << 30))


async def test_nudges_during_a_write_cause_exactly_one_more_write():
    writes = 0
    release = asyncio.Event()

    async def write() -> None:
        nonlocal writes
        writes += 1
        await release.wait()

    nudger = StatusNudger(write)
    nudger.nudge()
    await asyncio.sleep(0)
    nudger.nudge()
    nudger.nudge()  # both arrive while the first write is in flight
    release.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert writes == 2
    await nudger.close()


def test_settings_become_capacity_cache_and_hub(tmp_path: Path):
    ops = Operations.build(
        repository=ModelRepository(), lifecycle=Lifecycle(),
        make_engine=lambda *a, **k: None,  # type: ignore[arg-type,return-value]
        multi_model=MultiModel(max_models=3, memory_budget_fraction=0.5, eviction="none", unload_timeout_seconds=2),
        weights=WeightManagement(cache_dir=tmp_path / "c", max_cache_bytes=10, allow_pin=False),
        node_name="n1", endpoint=lambda: "http://x", environ={"HF_ENDPOINT": "http://hub.local", "HF_TOKEN": "t"},
        probe=CPU,
    )
    capacity = ops.manager.capacity
    assert (capacity.max_models, capacity.evict, capacity.unload_timeout) == (3, False, 2)
    assert capacity.budget_bytes == int(physical_memory_bytes() * 0.5)
    assert ops.cache.root == tmp_path / "c"
    assert (ops.cache._max_bytes, ops.cache._allow_pin) == (10, False)
    assert (ops.cache._hub_endpoint, ops.cache._hub_token) == ("http://hub.local", "t")
    explicit = Operations.build(
        repository=ModelRepository(), lifecycle=Lifecycle(),
        make_engine=lambda *a, **k: None,  # type: ignore[arg-type,return-value]
        multi_model=MultiModel(memory_budget_bytes=1234), weights=WeightManagement(),
        node_name="n1", endpoint=lambda: "http://x", environ={}, probe=CPU,
    )
    assert explicit.manager.capacity.budget_bytes == 1234 and explicit.manager.capacity.evict
    assert explicit.cache.root == Path("~/.cache/mlxpool/models").expanduser()
    assert explicit.cache._hub_endpoint == "https://huggingface.co" and explicit.cache._hub_token is None


async def test_on_a_discrete_gpu_the_budget_and_free_memory_are_the_devices(tmp_path: Path):
    ops = Operations.build(
        repository=ModelRepository(), lifecycle=Lifecycle(),
        make_engine=lambda *a, **k: None,  # type: ignore[arg-type,return-value]
        multi_model=MultiModel(memory_budget_fraction=0.5), weights=WeightManagement(cache_dir=tmp_path / "c"),
        node_name="n1", endpoint=lambda: "http://x", environ={}, probe=H200,
    )
    assert ops.manager.capacity.budget_bytes == 70 << 30
    await ops.start()
    try:
        report = await ops.reporter.report()
    finally:
        await ops.close()
    assert report.hardware.accelerator == "cuda" and report.hardware.device_name == "NVIDIA H200"
    assert report.hardware.device_memory_bytes == 140 << 30
    assert report.device_memory_used_bytes == 5 << 30  # active + cached
    assert report.free_memory_bytes == 135 << 30  # the device's, not the host's


def test_bad_settings_are_rejected_naming_the_key():
    import pytest

    from mlxpool.agent.config import ConfigError, load_runtime_config

    cases = {
        "MLXPOOL_MULTI_MODEL__MAX_MODELS": ("0", "multi_model.max_models"),
        "MLXPOOL_MULTI_MODEL__EVICTION": ("fifo", "multi_model.eviction"),
        "MLXPOOL_MULTI_MODEL__MEMORY_BUDGET_FRACTION": ("1.5", "multi_model.memory_budget_fraction"),
        "MLXPOOL_WEIGHT_MANAGEMENT__MAX_CACHE_BYTES": ("-1", "weight_management.max_cache_bytes"),
        "MLXPOOL_WEIGHT_MANAGEMENT__PIN": (
            "true", "weight_management.pin (from MLXPOOL_WEIGHT_MANAGEMENT__PIN): unknown key"),
    }
    for env, (value, words) in cases.items():
        with pytest.raises(ConfigError) as caught:
            load_runtime_config(environ={env: value})
        assert words in str(caught.value), (env, str(caught.value))


def test_the_command_line_makes_the_model_optional_and_sets_the_cache_dir(tmp_path: Path, tiny_model: Path):
    import pytest

    from mlxpool.agent.main import parse_config

    empty = parse_config(["--cache-dir", str(tmp_path / "cache")])
    assert empty.model_path is None and empty.model_name is None
    assert empty.runtime.weight_management.cache_dir == tmp_path / "cache"
    with_model = parse_config(["--model", str(tiny_model)])
    assert with_model.model_path == tiny_model.resolve() and with_model.model_name == tiny_model.name
    with pytest.raises(SystemExit):
        parse_config(["--model-name", "x"])  # a name without a model
