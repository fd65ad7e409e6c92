"""Counting a model's in-flight requests, so an unload waits for exactly those.

The model manager wraps each engine it serves in a `TrackedEngine` before the data
plane sees it. Everything but `submit` is the wrapped engine's (attribute reads are
delegated), so metrics and the data plane read the engine as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from mlxpool.agent.engine.interface import Engine, EngineStats, GenerationRequest, TokenEvent


class TrackedEngine:
    """An engine whose in-flight requests are counted; `wait_idle` waits for them to end."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def stats(self) -> EngineStats:
        return self.inner.stats

    @property
    def healthy(self) -> bool:
        return self.inner.healthy

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.inner.stats.running > 0 or self.inner.stats.waiting > 0

    async def submit(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        self.in_flight += 1
        self._idle.clear()
        try:
            async with aclosing(self.inner.submit(request)) as events:
                async for event in events:
                    yield event
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
