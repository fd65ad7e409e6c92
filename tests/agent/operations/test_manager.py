"""The model manager over fake engines: phases, idempotency, eviction, unload timing."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from pathlib import Path

import pytest

from mlxpool.agent.engine.interface import GenerationRequest, SamplingParams
from mlxpool.agent.errors import InvalidRequest, ModelLoading, ModelNotFound, ModelUnloading
from mlxpool.agent.operations.errors import (
    MaxModelsReached,
    MemoryBudgetExceeded,
    ModelConflict,
    UnloadInProgress,
)
from mlxpool.agent.operations.eviction import Order
from mlxpool.agent.operations.manager import Capacity, ModelManager
from mlxpool.agent.serving.lifecycle import Lifecycle
from mlxpool.agent.serving.repository import ModelRepository
from mlxpool.agentapi import LoadModelRequest, ModelPhase, ModelTier


def model_dir(root: Path, name: str, weight_bytes: int = 1000) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"\0" * weight_bytes)
    return directory


class Harness:
    def __init__(self, root: Path, capacity: Capacity, engine_type: type) -> None:
        self.root = root
        self.engine_type = engine_type
        self.repository = ModelRepository()
        self.lifecycle = Lifecycle()
        self.engines: dict[str, list] = {}
        self.fail: dict[str, str] = {}
        self.hold: dict[str, asyncio.Event] = {}
        self.changes = 0
        self.manager = ModelManager(self.repository, self.make_engine, capacity, lifecycle=self.lifecycle,
                                    on_change=self._changed, cache_path=lambda key: root / key)

    def _changed(self) -> None:
        self.changes += 1

    def make_engine(self, path: str, name: str, *, warm: bool, identity: str, on_weights_loaded):
        engine = self.engine_type(path, name, warm, on_weights_loaded,
                                  fail=self.fail.get(name), release=self.hold.get(name))
        self.engines.setdefault(name, []).append(engine)
        return engine

    async def load(self, name: str, **kwargs) -> tuple:
        path = self.root / name
        if not path.exists():
            model_dir(self.root, name)
        return await self.manager.load(LoadModelRequest(name=name, path=str(path), **kwargs))

    async def ready(self, name: str, **kwargs) -> None:
        await self.load(name, **kwargs)
        state = await self.manager.wait_settled(name)
        assert state.phase is ModelPhase.READY, state

    async def engine_made(self, name: str) -> None:
        """Wait for the load to reach its engine (the content identity is hashed off the loop first)."""
        for _ in range(500):
            if self.engines.get(name):
                await asyncio.sleep(0.01)
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"no engine made for {name}")

    async def gone(self, name: str) -> None:
        for _ in range(200):
            if name not in {s.name for s in self.manager.states()}:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"{name} still present: {self.manager.states()}")


@pytest.fixture
def harness(tmp_path: Path, fake_engine_type: type):
    def make(**capacity) -> Harness:
        return Harness(tmp_path, Capacity(**{"max_models": 4, "budget_bytes": None, **capacity}), fake_engine_type)

    return make


def request(max_tokens: int = 3) -> GenerationRequest:
    return GenerationRequest("r1", (1, 2, 3), SamplingParams(max_tokens=max_tokens))


async def test_load_moves_through_loading_and_warming_to_ready_and_repeats_safely(harness):
    h = harness()
    h.hold["a"] = asyncio.Event()
    state, ready = await h.load("a")
    assert (state.phase, ready) == (ModelPhase.LOADING, False)
    for _ in range(500):  # the identity is hashed off the loop, then the engine reports its weights loaded
        if h.manager.state("a").phase is not ModelPhase.LOADING:
            break
        await asyncio.sleep(0.01)
    assert h.manager.state("a").phase is ModelPhase.WARMING  # warm-up runs
    with pytest.raises(ModelLoading) as caught:
        h.repository.get("a")
    assert caught.value.status_code == 503 and "warming" in caught.value.message
    again, ready = await h.load("a")  # repeating is safe: same record, no second engine
    assert again.phase is ModelPhase.WARMING and not ready and len(h.engines["a"]) == 1
    h.hold["a"].set()
    state = await h.manager.wait_settled("a")
    assert state.phase is ModelPhase.READY and state.memory_bytes == 1000 and state.load_time_seconds is not None
    assert state.path == str((h.root / "a").resolve())
    assert [m.name for m in h.repository.all()] == ["a"]
    assert (await h.load("a"))[1] is True  # 200 when already ready
    assert h.changes >= 2


async def test_the_owner_of_a_load_is_reported_and_kept(harness):
    h = harness()
    state, _ = await h.load("a", owner="op")
    assert state.owner == "op"
    await h.manager.wait_settled("a")
    again, _ = await h.load("a", owner="someone-else")
    assert again.owner == "op" and [s.owner for s in h.manager.states()] == ["op"]  # the first load's owner stays
    state, _ = await h.load("b")
    assert state.owner is None


async def test_load_without_warm_never_reports_warming(harness):
    h = harness()
    h.hold["a"] = asyncio.Event()
    await h.load("a", warm=False)
    await h.engine_made("a")
    assert h.manager.state("a").phase is ModelPhase.LOADING and h.engines["a"][0].warm is False
    h.hold["a"].set()
    assert (await h.manager.wait_settled("a")).phase is ModelPhase.READY


async def test_another_source_under_the_same_name_is_a_conflict(harness, tmp_path):
    h = harness()
    await h.ready("a")
    other = model_dir(tmp_path, "other")
    with pytest.raises(ModelConflict) as caught:
        await h.manager.load(LoadModelRequest(name="a", path=str(other)))
    assert caught.value.status_code == 409 and "unload it first" in caught.value.message


async def test_a_failed_load_is_reported_and_loaded_afresh_on_retry(harness):
    h = harness()
    h.fail["a"] = "weights are corrupt"
    await h.load("a")
    state = await h.manager.wait_settled("a")
    assert state.phase is ModelPhase.FAILED and "weights are corrupt" in state.message
    assert h.engines["a"][0].stopped
    with pytest.raises(ModelNotFound):
        h.repository.get("a")
    del h.fail["a"]
    await h.ready("a")
    assert len(h.engines["a"]) == 2


async def test_unload_stops_serving_at_once_and_frees_the_engine(harness):
    h = harness()
    await h.ready("a")
    engine = h.engines["a"][0]
    engine.step = asyncio.Event()  # a request in flight keeps the unload going
    stream = h.repository.get("a").engine.submit(request())
    consumer = asyncio.create_task(anext(stream))
    await asyncio.sleep(0.01)
    state = await h.manager.unload("a")
    assert state.phase is ModelPhase.UNLOADING
    with pytest.raises(ModelUnloading) as caught:
        h.repository.get("a")
    assert caught.value.status_code == 503
    with pytest.raises(UnloadInProgress) as refused:  # loading it again must wait until it is gone
        await h.load("a")
    assert refused.value.status_code == 409
    engine.step.set()
    await consumer
    await stream.aclose()
    await h.gone("a")
    assert h.engines["a"][0].stopped and h.repository.all() == []
    with pytest.raises(ModelNotFound):
        h.repository.get("a")
    with pytest.raises(ModelNotFound):
        await h.manager.unload("a")


async def test_unload_waits_for_in_flight_requests(harness):
    h = harness()
    await h.ready("a")
    engine = h.engines["a"][0]
    engine.step = asyncio.Event()
    served = h.repository.get("a")
    events = []

    async def consume() -> None:
        async with aclosing(served.engine.submit(request())) as stream:
            events.extend([event async for event in stream])

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    assert (h.lifecycle.in_flight, h.lifecycle.in_flight_of("a")) == (1, 1)  # one count, two views
    await h.manager.unload("a")
    await asyncio.sleep(0.05)
    assert not engine.stopped  # the request is still running
    engine.step.set()
    await consumer
    await h.gone("a")
    assert engine.stopped and events[-1].finish_reason == "length"
    assert (h.lifecycle.in_flight, h.lifecycle.in_flight_of("a")) == (0, 0)


async def test_unload_stops_anyway_after_its_timeout(harness):
    h = harness(unload_timeout=0.05)
    await h.ready("a")
    engine = h.engines["a"][0]
    engine.step = asyncio.Event()  # never set: the request hangs
    stream = h.repository.get("a").engine.submit(request())
    consumer = asyncio.create_task(anext(stream))
    await asyncio.sleep(0.01)
    await h.manager.unload("a")
    await h.gone("a")
    assert engine.stopped
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    await stream.aclose()


async def test_unload_during_loading_cancels_the_load(harness):
    h = harness()
    h.hold["a"] = asyncio.Event()  # never released
    await h.load("a")
    await h.engine_made("a")
    await h.manager.unload("a")
    await h.gone("a")
    assert h.engines["a"][0].stopped and h.repository.all() == []


async def test_a_full_node_evicts_the_least_recently_used_idle_model(harness):
    h = harness(max_models=2)
    await h.ready("a")
    await h.ready("b")
    h.repository.get("a")  # a request for a: b is now the least recently used
    state, _ = await h.load("c")
    assert state.phase is ModelPhase.LOADING
    assert h.manager.state("b").phase is ModelPhase.UNLOADING
    assert (await h.manager.wait_settled("c")).phase is ModelPhase.READY
    assert sorted(m.name for m in h.repository.all()) == ["a", "c"]
    assert h.engines["b"][0].stopped and not h.engines["a"][0].stopped


@pytest.mark.parametrize(("order", "evicted", "kept"),
                         [(Order.COST, "rare", "popular"), (Order.LRU, "popular", "rare")])
async def test_cost_aware_eviction_keeps_the_popular_model_lru_does_not(harness, order, evicted, kept):
    h = harness(max_models=2, order=order)
    await h.ready("popular")
    await h.ready("rare")
    for _ in range(20):
        h.repository.get("popular")
    h.repository.get("rare")  # the most recent, asked for once
    await h.load("newcomer")
    assert h.manager.state(evicted).phase is ModelPhase.UNLOADING
    assert h.manager.state(kept).phase is ModelPhase.READY


async def test_a_model_within_its_keep_alive_is_not_evicted(harness):
    h = harness(max_models=2)
    await h.ready("kept", keep_alive_seconds=3600)
    await h.ready("popular")
    for _ in range(20):
        h.repository.get("popular")
    h.hold["newcomer"] = asyncio.Event()  # stays loading (busy)
    await h.load("newcomer")
    assert h.manager.state("popular").phase is ModelPhase.UNLOADING  # worth more, but not kept alive
    assert h.manager.state("kept").phase is ModelPhase.READY
    with pytest.raises(MaxModelsReached, match="within keep-alive: kept"):
        await h.load("third")  # newcomer is loading (busy), kept is kept alive
    h.hold["newcomer"].set()


async def test_a_model_s_use_is_remembered_after_it_is_unloaded(harness):
    h = harness(max_models=2)
    await h.ready("a")
    for _ in range(5):
        h.repository.get("a")
    await h.manager.unload("a")
    await h.gone("a")
    assert h.repository.usage.uses("a") > 4  # brought back later, it is not a newcomer
    assert h.manager.load_bps is not None and h.manager.load_bps > 0  # loads are measured


async def test_a_model_serving_a_request_is_not_evicted(harness):
    h = harness(max_models=2)
    await h.ready("a")
    await h.ready("b")
    h.engines["a"][0].step = asyncio.Event()
    stream = h.repository.get("a").engine.submit(request())
    consumer = asyncio.create_task(anext(stream))
    await asyncio.sleep(0.01)
    h.repository.get("b")  # b is more recent, but a is busy
    await h.load("c")
    assert h.manager.state("b").phase is ModelPhase.UNLOADING
    assert h.manager.state("a").phase is ModelPhase.READY
    h.engines["a"][0].step.set()
    await consumer
    await stream.aclose()


async def test_pinned_models_are_never_evicted_and_the_refusal_says_so(harness):
    h = harness(max_models=1)
    await h.ready("a", pin=True)
    with pytest.raises(MaxModelsReached) as caught:
        await h.load("b")
    assert caught.value.status_code == 409 and "pinned: a" in caught.value.message
    await h.load("a", pin=False)  # pin changes apply in place
    assert h.manager.state("a").pinned is False
    await h.ready("b")
    assert [m.name for m in h.repository.all()] == ["b"]


async def test_memory_budget_evicts_or_refuses(harness, tmp_path):
    h = harness(budget_bytes=2500)
    await h.ready("a")   # 1000 bytes each
    await h.ready("b")
    model_dir(tmp_path, "big", weight_bytes=1200)
    await h.load("big")  # 1000 + 1000 + 1200 > 2500: the least recently used goes
    assert h.manager.state("a").phase is ModelPhase.UNLOADING
    model_dir(tmp_path, "huge", weight_bytes=3000)
    with pytest.raises(MemoryBudgetExceeded) as caught:
        await h.load("huge")
    assert caught.value.status_code == 507 and "whole memory budget" in caught.value.message


async def test_without_eviction_a_full_node_refuses(harness):
    h = harness(max_models=1, evict=False)
    await h.ready("a")
    with pytest.raises(MaxModelsReached) as caught:
        await h.load("b")
    assert "eviction is off" in caught.value.message
    assert h.manager.state("a").phase is ModelPhase.READY


async def test_bad_paths_are_refused_naming_the_field(harness, tmp_path):
    h = harness()
    with pytest.raises(InvalidRequest) as caught:
        await h.manager.load(LoadModelRequest(name="x", path="relative/dir"))
    assert caught.value.param == "path" and "absolute" in caught.value.message
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequest) as caught:
        await h.manager.load(LoadModelRequest(name="x", path=str(tmp_path / "empty")))
    assert caught.value.param == "path" and "config.json" in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        await h.manager.load(LoadModelRequest(name="x", path=str(tmp_path / "missing")))
    assert "not a directory" in caught.value.message


async def test_models_from_a_cache_entry_are_listed_as_its_users(harness, tmp_path):
    h = harness()
    model_dir(tmp_path, "entry")
    await h.manager.load(LoadModelRequest(name="m", cache_key="entry"))
    assert h.manager.using_cache("entry") == ["m"] and h.manager.using_cache("other") == []
    await h.manager.wait_settled("m")
    await h.manager.unload("m")
    await h.gone("m")
    assert h.manager.using_cache("entry") == []


async def test_close_stops_every_engine(harness, caplog):
    h = harness()
    await h.ready("a")
    h.hold["b"] = asyncio.Event()
    await h.load("b")
    await h.manager.close()
    assert all(e.stopped for engines in h.engines.values() for e in engines)
    assert h.manager.states() == [] and h.repository.all() == []
    assert "unload grace over" not in caplog.text  # idle models: no wait, whatever the timeout (here 0)


async def test_the_real_engine_reports_its_weights_loaded_and_stops_on_unload(tiny_model):
    """The manager with mlx-lm's engine on the tiny model: the hook the warming phase hangs on
    fires on the engine thread before warm-up, and an unload ends the engine's thread."""
    import threading

    from mlxpool.agent.engine.generation import BatchEngine
    from mlxpool.agent.engine.interface import EngineConfig

    hook_threads: list[str] = []
    engines: list[BatchEngine] = []

    def make(path: str, name: str, *, warm: bool, identity: str, on_weights_loaded) -> BatchEngine:
        def hook() -> None:
            hook_threads.append(threading.current_thread().name)
            on_weights_loaded()

        engine = BatchEngine(path, EngineConfig(max_running=2, warmup_tokens=2 if warm else 0), name=name,
                             on_weights_loaded=hook)
        engines.append(engine)
        return engine

    repository = ModelRepository()
    manager = ModelManager(repository, make, Capacity(max_models=2, budget_bytes=None), lifecycle=Lifecycle())
    await manager.load(LoadModelRequest(name="tiny", path=str(tiny_model)))
    state = await manager.wait_settled("tiny")
    assert state.phase is ModelPhase.READY and state.memory_bytes > 0
    assert hook_threads == ["engine-tiny"]
    served = repository.get("tiny")
    async with aclosing(served.engine.submit(request())) as events:
        assert [e async for e in events][-1].finish_reason is not None
    await manager.unload("tiny")
    for _ in range(400):
        if not manager.states():
            break
        await asyncio.sleep(0.01)
    assert manager.states() == [] and not engines[0]._thread.is_alive()


async def test_a_dead_engine_reports_failed_and_a_new_load_clears_it_first(harness):
    h = harness()
    await h.ready("a")
    h.engines["a"][0].healthy = False  # the engine thread died
    state = h.manager.state("a")
    assert state.phase is ModelPhase.FAILED and "stopped unexpectedly" in state.message
    with pytest.raises(UnloadInProgress):  # the dead one is being cleared: retry
        await h.load("a")
    await h.gone("a")
    await h.ready("a")
    assert len(h.engines["a"]) == 2 and h.engines["a"][0].stopped


def test_a_keep_alive_out_of_range_is_refused_naming_the_field():
    from pydantic import ValidationError

    for bad in (-1, 31 * 86400):
        with pytest.raises(ValidationError, match="keep_alive_seconds"):
            LoadModelRequest(name="a", path="/m/a", keep_alive_seconds=bad)


# ---- residency tiers: parked (engine released, weights kept) and woken by a request ----


async def collect(h: Harness, name: str) -> list:
    async with aclosing(h.repository.get(name).engine.submit(request())) as events:
        return [e async for e in events]


async def parked_settled(h: Harness, name: str) -> None:
    for _ in range(200):
        if h.engines[name][-1].parked:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{name} not parked")


async def test_a_model_losing_its_slot_is_parked_and_a_request_wakes_it(harness):
    switches: list = []
    h = harness(max_models=1, park=True)
    h.manager._on_switch = lambda tier, seconds: switches.append(tier)
    await h.ready("a")
    await h.ready("b")  # one slot: a is parked, not unloaded
    await parked_settled(h, "a")
    assert h.manager.state("a").tier is ModelTier.PARKED and h.manager.state("a").phase is ModelPhase.READY
    assert not h.engines["a"][0].stopped and sorted(m.name for m in h.repository.all()) == ["a", "b"]
    assert len(await collect(h, "a")) == 3  # the request wakes a (one engine, resumed), b is parked
    assert h.engines["a"][0].resumes == 1 and len(h.engines["a"]) == 1
    await parked_settled(h, "b")
    assert h.manager.state("a").tier is ModelTier.ACTIVE and h.manager.state("b").tier is ModelTier.PARKED
    assert ModelTier.PARKED in switches and ModelTier.PARKED in h.manager.tier_bps


async def test_concurrent_requests_for_a_parked_model_wake_it_once(harness):
    h = harness(max_models=1, park=True)
    await h.ready("a")
    await h.ready("b")
    await parked_settled(h, "a")
    results = await asyncio.gather(*(collect(h, "a") for _ in range(5)))
    assert all(len(r) == 3 for r in results) and h.engines["a"][0].resumes == 1


async def test_memory_drops_a_parked_model_out_of_memory_one_tier_down(harness, tmp_path):
    h = harness(max_models=1, park=True, budget_bytes=2500)
    await h.ready("a")  # 1000 bytes each
    await h.ready("b")  # a parked: 2000 bytes in memory
    await parked_settled(h, "a")
    await h.ready("c")  # 3000 > 2500: a (parked, least recently used) leaves memory; b is parked
    await h.gone("a")
    assert h.engines["a"][0].stopped
    assert h.manager.state("b").tier is ModelTier.PARKED and h.manager.state("c").tier is ModelTier.ACTIVE


async def test_a_busy_model_is_not_parked_and_a_wake_waits_for_a_slot_bounded(harness):
    h = harness(max_models=1, park=True, wake_timeout=0.3)
    await h.ready("a")
    await h.ready("b")
    await parked_settled(h, "a")
    h.engines["b"][0].step = asyncio.Event()
    stream = h.repository.get("b").engine.submit(request())
    consumer = asyncio.create_task(anext(stream))
    await asyncio.sleep(0.01)
    with pytest.raises(ModelLoading, match="no engine slot came free"):
        await collect(h, "a")  # b is busy: it cannot be parked, and the wait is bounded
    h.engines["b"][0].step.set()
    await consumer
    await stream.aclose()
    assert len(await collect(h, "a")) == 3  # b idle now: parked, and a woken


async def test_a_pinned_model_is_never_parked(harness):
    h = harness(max_models=1, park=True)
    await h.ready("a", pin=True)
    with pytest.raises(MaxModelsReached, match="pinned: a"):
        await h.load("b")
