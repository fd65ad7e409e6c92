"""The agent's phase (starting → loading → ready → draining → stopped) and its in-flight work.

`/ready` reads the phase; the data plane admits generation work only while ready. Each
request holds a lease, taken by its model's served engine (`servedengine`), until its
last byte is produced: the one count of requests in flight, seen two ways, in total
(what a drain waits for, `/ready` and the metrics report) and per model (what an unload
waits for). Waiting for no work returns at once, whatever the timeout. Asyncio-only: no
locks, one event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import StrEnum

from mlxpool.agent.errors import Draining, NotReady

log = logging.getLogger(__name__)


class Phase(StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class _InFlight:
    """Requests in flight, and an event set while there are none."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once none are in flight (at once if none are), False if `timeout` passes first."""
        if self.count == 0:  # asyncio.wait_for(..., 0) would time out even on a set event
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


class Lifecycle:
    def __init__(self) -> None:
        self._phase = Phase.STARTING
        self._all = _InFlight()
        self._by_model: dict[str, _InFlight] = {}
        """Per model name; an entry stays once made (names are few)."""

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def in_flight(self) -> int:
        """Requests in flight on the whole agent."""
        return self._all.count

    def in_flight_of(self, model: str) -> int:
        """Requests in flight on `model`."""
        requests = self._by_model.get(model)
        return requests.count if requests is not None else 0

    def set_phase(self, phase: Phase) -> None:
        if phase != self._phase:
            log.info("agent phase=%s previous=%s in_flight=%d", phase.value, self._phase.value, self.in_flight)
            self._phase = phase

    def check_accepting(self) -> None:
        """Raise the 503 error fitting the phase unless new work is accepted."""
        if self._phase is Phase.READY:
            return
        if self._phase in (Phase.DRAINING, Phase.STOPPED):
            raise Draining("the agent is shutting down; retry on another node")
        raise NotReady(f"the agent is not ready (phase {self._phase.value})")

    @asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[None]:
        """Count one request on `model` in flight for the duration of the block."""
        requests = self._by_model.get(model)
        if requests is None:
            requests = self._by_model[model] = _InFlight()
        requests.enter()
        self._all.enter()
        try:
            yield
        finally:
            requests.leave()
            self._all.leave()

    async def wait_idle(self, model: str, timeout: float) -> bool:
        """Wait for `model`'s requests in flight to end; False if the timeout hit first."""
        requests = self._by_model.get(model)
        return requests is None or await requests.wait_idle(timeout)

    async def drain(self, timeout: float) -> bool:
        """Stop accepting work and wait for in-flight work; False if the timeout hit."""
        self.set_phase(Phase.DRAINING)
        if await self._all.wait_idle(timeout):
            return True
        log.warning("drain timed out in_flight=%d timeout_s=%.1f", self.in_flight, timeout)
        return False
