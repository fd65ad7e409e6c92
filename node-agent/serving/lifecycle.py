"""The agent's phase (starting → loading → ready → draining → stopped) and its in-flight work.

`/ready` reads the phase; the data plane admits generation work only while ready and
holds a lease for each request until its last byte is produced, so a drain can wait
for exactly the work already accepted. Asyncio-only: no locks, one event loop.
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


class Lifecycle:
    def __init__(self) -> None:
        self._phase = Phase.STARTING
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def set_phase(self, phase: Phase) -> None:
        if phase != self._phase:
            log.info("agent phase=%s previous=%s in_flight=%d", phase.value, self._phase.value, self._in_flight)
            self._phase = phase

    def check_accepting(self) -> None:
        """Raise the 503 error fitting the phase unless new work is accepted."""
        if self._phase is Phase.READY:
            return
        if self._phase in (Phase.DRAINING, Phase.STOPPED):
            raise Draining("the agent is shutting down; retry on another node")
        raise NotReady(f"the agent is not ready (phase {self._phase.value})")

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[None]:
        """Count one unit of in-flight work for the duration of the block."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Stop accepting work and wait for in-flight work; False if the timeout hit."""
        self.set_phase(Phase.DRAINING)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            log.warning("drain timed out in_flight=%d timeout_s=%.1f", self._in_flight, timeout)
            return False
