"""What the running daemons share: one runtime per pool and per cache, and who to wake.

A runtime holds a daemon's memory between passes (its state), its wake-up call, and
the nodes it cares about, so that a change on one node wakes only the daemons it
concerns (`Runtimes.node_changed`, a listener of the fleet's observations). No kopf
here: `handlers` owns the daemons; this is their shared bookkeeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from mlxpool.operator.logic.claims import PoolKey
from mlxpool.operator.logic.observations import HEALTH, NodeChange
from mlxpool.operator.logic.sources import CacheRef
from mlxpool.operator.reconcilers.caches import CacheState
from mlxpool.operator.reconcilers.pools import PoolState


class Stopped(Protocol):
    """kopf's DaemonStopped, as far as napping needs it."""

    def wait(self) -> Awaitable[object]: ...


@dataclass
class Runtime:
    """A running daemon's wake-up call and what it cares about."""

    woken: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when its daemon has finished its last pass (deletion handlers wait for it)."""
    interest: frozenset[str] = frozenset()
    """Nodes whose changes may change this object while it is not settled."""
    holds: frozenset[str] = frozenset()
    """Nodes it uses now (a pool's endpoints, a cache's copies): their changes always matter."""
    seen: frozenset[str] = frozenset()
    """Every node its last pass looked at: any other node is new to it."""
    settled: bool = False

    candidates_matter_when_settled: ClassVar[bool] = False
    """A settled pool needs no other node; a cache must reach every node that can take it."""

    def concerned_by(self, node: str) -> bool:
        """The nodes it uses always; the nodes it could use (and new ones) while unsettled."""
        if node in self.holds:
            return True
        could_use = node in self.interest or node not in self.seen
        return could_use and (not self.settled or self.candidates_matter_when_settled)

    async def nap(self, seconds: float, stopped: Stopped) -> None:
        """Sleep `seconds`, or less if woken or stopped."""
        waiters = [asyncio.ensure_future(self.woken.wait()), asyncio.ensure_future(stopped.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        self.woken.clear()


@dataclass
class PoolRuntime(Runtime):
    state: PoolState = field(default_factory=PoolState)


@dataclass
class CacheRuntime(Runtime):
    state: CacheState = field(default_factory=CacheState)
    candidates_matter_when_settled: ClassVar[bool] = True


@dataclass
class Runtimes:
    """Shared by all handlers through the operator's services (`services.OperatorServices`)."""

    pools: dict[PoolKey, PoolRuntime] = field(default_factory=dict)
    caches: dict[tuple[str, str], CacheRuntime] = field(default_factory=dict)
    cache_refs: dict[tuple[str, str], CacheRef] = field(default_factory=dict)

    def wake(self, namespace: str, name: str) -> None:
        if (runtime := self.pools.get((namespace, name))) is not None:
            runtime.woken.set()

    def wake_namespace(self, namespace: str) -> None:
        for (ns, _), runtime in self.pools.items():
            if ns == namespace:
                runtime.woken.set()

    def node_changed(self, node: str, what: NodeChange = HEALTH) -> None:
        """A node's object, probe result (`health`) or agent report (`agent`) changed: wake
        the daemons it concerns, whatever the change."""
        for runtime in (*self.pools.values(), *self.caches.values()):
            if runtime.concerned_by(node):
                runtime.woken.set()

    def residency_changed(self, node: str) -> None:
        """Where a node's weights are changed (nothing placement reads): wake the caches
        holding a copy there, whose status says it."""
        for runtime in self.caches.values():
            if node in runtime.holds:
                runtime.woken.set()

    def caches_by_model(self, namespace: str) -> dict[str, CacheRef]:
        """The namespace's ModelCaches by model name (the first by name if two name one model)."""
        found: dict[str, CacheRef] = {}
        for (ns, _), ref in sorted(self.cache_refs.items(), reverse=True):
            if ns == namespace:
                found[ref.model] = ref
        return found
