"""Builds the operations side of an agent from its settings and hands the runtime its pieces.

The runtime (the composition root) calls `Operations.build` with the repository, the
lifecycle and the prompt cache (which every served model's engine uses), an engine
factory and the `multi_model` / `weight_management` sections; it mounts their HTTP
routes (`http.operations`), calls `start()` before serving, `load_initial()` for the
model named on the command line, and `close()` at shutdown. `StatusNudger` turns "a model was
loaded or unloaded" into one prompt InferenceNode status write, coalescing bursts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mlxpool.agent.config import MultiModel, WeightManagement
from mlxpool.agent.engine.interface import DeviceProbe
from mlxpool.agent.engine.tensorshare import TensorShare
from mlxpool.agent.operations import eviction
from mlxpool.agent.operations.manager import Capacity, EngineFactory, ModelManager, SwitchObserver
from mlxpool.agent.operations.reports import NodeIdentity, NodeReporter, model_memory_bytes
from mlxpool.agent.operations.sources import DEFAULT_HUB_ENDPOINT
from mlxpool.agent.operations.staging import ModelCacheStore
from mlxpool.agent.serving.lifecycle import Lifecycle
from mlxpool.agent.serving.policies import SchedulingPolicies
from mlxpool.agent.serving.promptcache import PromptCache
from mlxpool.agent.serving.repository import ModelRepository
from mlxpool.agentapi import LoadModelRequest, ModelState

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/mlxpool/models")
HUB_ENDPOINT_ENV = "HF_ENDPOINT"
HUB_TOKEN_ENV = "HF_TOKEN"


class StatusNudger:
    """Calls `write` soon after `nudge()`; nudges during a write cause exactly one more write."""

    def __init__(self, write: Callable[[], Awaitable[object]]) -> None:
        self._write = write
        self._dirty = False
        self._task: asyncio.Task[None] | None = None

    def nudge(self) -> None:
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="status-nudge")

    async def _run(self) -> None:
        while self._dirty:
            self._dirty = False
            await self._write()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass
class Operations:
    manager: ModelManager
    cache: ModelCacheStore
    reporter: NodeReporter

    @classmethod
    def build(
        cls, *, repository: ModelRepository, lifecycle: Lifecycle, make_engine: EngineFactory,
        multi_model: MultiModel, weights: WeightManagement, node_name: str, endpoint: Callable[[], str],
        prompt_cache: PromptCache | None = None, on_change: Callable[[], None] | None = None,
        environ: Mapping[str, str] | None = None, policies: SchedulingPolicies | None = None,
        probe: DeviceProbe | None = None, on_switch: SwitchObserver | None = None,
    ) -> Operations:
        env = os.environ if environ is None else environ
        capacity = Capacity(
            max_models=multi_model.max_models,
            budget_bytes=multi_model.memory_budget_bytes
            or int(multi_model.memory_budget_fraction * model_memory_bytes(probe)),
            evict=multi_model.eviction != "none",
            order=eviction.Order.LRU if multi_model.eviction == "lru" else eviction.Order.COST,
            keep_alive=multi_model.keep_alive_seconds,
            default_load_bps=multi_model.default_load_gbps * 1e9,
            unload_timeout=multi_model.unload_timeout_seconds,
            park=multi_model.park,
            wake_timeout=multi_model.wake_timeout_seconds,
            load_on_request=multi_model.load_on_request,
            request_sources=tuple(Path(s) for s in multi_model.load_on_request_sources),
            load_wait=multi_model.load_on_request_wait_seconds,
        )
        manager: ModelManager | None = None
        cache = ModelCacheStore(
            (weights.cache_dir or DEFAULT_CACHE_DIR).expanduser(),
            in_use=lambda key: manager.using_cache(key) if manager is not None else [],
            max_bytes=weights.max_cache_bytes, allow_pin=weights.allow_pin,
            hub_endpoint=env.get(HUB_ENDPOINT_ENV) or DEFAULT_HUB_ENDPOINT, hub_token=env.get(HUB_TOKEN_ENV) or None,
        )
        manager = ModelManager(repository, make_engine, capacity, lifecycle=lifecycle, prompt_cache=prompt_cache,
                               cache_path=cache.ready_path, on_change=on_change, on_switch=on_switch,
                               tensor_share=TensorShare() if multi_model.share_tensors else None)
        reporter = NodeReporter(NodeIdentity(node_name, endpoint), manager, cache, policies, probe)
        return cls(manager, cache, reporter)

    async def start(self) -> None:
        await self.cache.start()

    async def load_initial(self, name: str, path: Path, warm: bool = True) -> ModelState:
        """Load the command line's model through the manager, like any other; its settled state."""
        await self.manager.load(LoadModelRequest(name=name, path=str(path), warm=warm))
        return await self.manager.wait_settled(name)

    async def close(self) -> None:
        await self.manager.close()
        await self.cache.close()



