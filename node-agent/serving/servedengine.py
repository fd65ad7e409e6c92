"""A served model's engine as requests reach it: counted in flight, prompts looked up first.

The model manager wraps each engine it serves in a `ServedEngine` before the
repository (and so the data plane) sees it. Submitting through it does what every
request needs on its way to the engine, so the data plane just submits:

- it holds the lifecycle's lease for the model while the request runs: the one count
  of requests in flight, which a drain waits for in total and an unload per model;
- it asks the prompt cache for KV state of the prompt that other agents computed (none
  when the fleet-wide tier is off), which the engine then uses instead of computing it;
- when the model is parked (`asleep`: its engine released, its weights kept), it first
  asks the model manager to wake it (`wake`), outside the lease: a park waits for the
  requests in flight, and one waiting to wake is not.

Reading (`stats`, `healthy`) goes to the engine. Nothing here imports MLX.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import replace

from mlxpool.agent.engine.interface import Engine, EngineStats, GenerationRequest, TierTerms, TokenEvent
from mlxpool.agent.serving.lifecycle import Lifecycle
from mlxpool.agent.serving.promptcache import PromptCache
from mlxpool.priorities import Priority


class ServedEngine:
    """Implements `interface.Engine` over the engine serving `model` (of content identity `model_id`)."""

    def __init__(self, engine: Engine, model: str, model_id: str, lifecycle: Lifecycle,
                 prompt_cache: PromptCache, wake: Callable[[], Awaitable[None]] | None = None) -> None:
        self.engine = engine
        self.asleep = False
        """Parked: the engine is released until `wake` brings it back."""
        self._wake = wake
        self.model = model
        self.model_id = model_id
        self._lifecycle = lifecycle
        self._prompt_cache = prompt_cache

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    @property
    def healthy(self) -> bool:
        return self.asleep or self.engine.healthy  # parked: no thread to be alive, and nothing wrong

    @property
    def in_flight(self) -> int:
        return self._lifecycle.in_flight_of(self.model)

    @property
    def busy(self) -> bool:
        """Requests in flight, or sequences in (or waiting for) the engine's batch."""
        stats = self.engine.stats
        return self.in_flight > 0 or stats.running > 0 or stats.waiting > 0

    def refuse_early(self, priority: Priority, terms: TierTerms | None, deadline: float | None,
                     prompt_tokens: int) -> None:
        if not self.asleep:  # parked: no outlook to judge from; `submit` decides once awake
            self.engine.refuse_early(priority, terms, deadline, prompt_tokens)

    async def submit(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        while True:
            if self.asleep and self._wake is not None:
                await self._wake()
            async with self._lifecycle.lease(self.model):
                if self.asleep and self._wake is not None:
                    continue  # parked again between the wake and the lease: wake it again
                shared = await self._prompt_cache.lookup(self.model_id, request.prompt_tokens)
                if shared is not None:
                    request = replace(request, shared_prefix=shared)
                async with aclosing(self.engine.submit(request)) as events:
                    async for event in events:
                        yield event
                return

    async def wait_idle(self, timeout: float) -> bool:
        """Wait for the model's requests in flight to end (at once if there are none)."""
        return await self._lifecycle.wait_idle(self.model, timeout)
