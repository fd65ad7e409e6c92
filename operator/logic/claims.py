"""What the operator has claimed on every node, shared by all pools: memory only.

One `Claims` per operator process (inside the `fleet`) holds which models each pool
wants on which node, the (node, model) pairs the operator loaded (`managed`: the only
models it ever unloads), the unloads it decided while an agent did not answer
(deferred, done by that node's monitor later) and how long each model of its own has
been claimed by no pool (orphans). From these it derives which models to unload: one
the operator loaded that no pool claims any more.

Rebuilt after a restart from the pools' statuses (`seed`) before any pool acts, and
from the agents' reports (`adopt`: agents say who loaded each model). What an unload
decision lost to a restart would leave behind (a model this operator loaded that no
pool wants any more) is found again that way: a model of ours that no pool has
claimed for a grace period is an orphan to unload (`orphans_due`). Only once every
pool is seeded: before that, an unclaimed model may just belong to a pool not read yet.

What is on the nodes (views, probes, reports, failures) is `observations`; claims read
an agent's view only when it is handed to them. Nothing here is written anywhere.

Everything a node monitor or a pool pass asks about one node (`claimed_on`,
`probe_interval`, `managed_on`, `claimed_by_others`) is answered from indexes by node,
not by scanning every pool: at 1,000 nodes and 500 pools those scans, once per monitor
tick and per pass, were most of the operator's CPU (docs/fleet-scale.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from mlxpool.agentapi import ModelPhase
from mlxpool.operator.logic.placement import AgentView

PoolKey = tuple[str, str]
Pair = tuple[str, str]


class PairSet:
    """A set of (node, model) pairs that also knows each node's models: `on(node)` is asked
    for every node a pool pass chooses, and scanning every pair of a 1,000-node fleet each
    time was 4% of the operator's CPU at rest. Compares equal to a set of the same pairs."""

    def __init__(self) -> None:
        self._by_node: dict[str, set[str]] = {}

    def on(self, node: str) -> set[str]:
        return set(self._by_node.get(node, ()))

    def add(self, pair: Pair) -> None:
        self._by_node.setdefault(pair[0], set()).add(pair[1])

    def discard(self, pair: Pair) -> None:
        models = self._by_node.get(pair[0])
        if models is not None:
            models.discard(pair[1])
            if not models:
                del self._by_node[pair[0]]

    def update(self, pairs: Iterable[Pair]) -> None:
        for pair in pairs:
            self.add(pair)

    def difference_update(self, pairs: Iterable[Pair]) -> None:
        for pair in list(pairs):
            self.discard(pair)

    def __contains__(self, pair: object) -> bool:
        return (isinstance(pair, tuple) and len(pair) == 2
                and pair[1] in self._by_node.get(pair[0], ()))

    def __iter__(self) -> Iterator[Pair]:
        return ((node, model) for node, models in self._by_node.items() for model in models)

    def __len__(self) -> int:
        return sum(map(len, self._by_node.values()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PairSet):
            return self._by_node == other._by_node
        if isinstance(other, (set, frozenset)):
            return set(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like a set

    def __repr__(self) -> str:
        return f"PairSet({set(self)!r})"
"""(node, model)."""
_LIVE = frozenset({ModelPhase.LOADING, ModelPhase.WARMING, ModelPhase.READY})


@dataclass
class Claim:
    nodes: dict[str, frozenset[str]] = field(default_factory=dict)
    """Node name -> the pool's models wanted there."""
    probe_interval: float | None = None


class Claims:
    def __init__(self, owner: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.pools: dict[PoolKey, Claim] = {}
        self.managed = PairSet()
        """(node, model) pairs the operator loaded: the only models it ever unloads."""
        self.owner = owner
        """Who this operator is on the agents (`LoadModelRequest.owner`); None: no orphan cleanup."""
        self.seeded = False
        """Every pool's claims are known (set once the startup listing succeeded)."""
        self._deferred: set[Pair] = set()
        self._unclaimed_since: dict[Pair, float] = {}
        self._clock = clock
        self._by_node: dict[str, dict[PoolKey, frozenset[str]]] = {}
        """Node -> the pools claiming something there and what (an index of `pools`)."""

    def _set_claim(self, pool: PoolKey, claim: Claim | None) -> Claim | None:
        """Replace `pool`'s claim (None: drop it), keeping the node index; returns the old one."""
        old = self.pools.pop(pool, None) if claim is None else self.pools.get(pool)
        for node in (old.nodes if old is not None else ()):
            claimants = self._by_node.get(node)
            if claimants is not None:
                claimants.pop(pool, None)
                if not claimants:
                    del self._by_node[node]
        if claim is not None:
            self.pools[pool] = claim
            for node, models in claim.nodes.items():
                self._by_node.setdefault(node, {})[pool] = models
        return old

    # -- what pools want ---------------------------------------------------------------------
    def seed(self, pool: PoolKey, nodes: Mapping[str, Iterable[str]], managed: Iterable[Pair] = (),
             probe_interval: float | None = None) -> None:
        """What a pool held before a restart (from its status), before any pool acts."""
        self._set_claim(pool, Claim({n: frozenset(ms) for n, ms in nodes.items()}, probe_interval))
        self.managed.update(managed)

    def claim(self, pool: PoolKey, nodes: Mapping[str, Collection[str]],
              probe_interval: float | None = None) -> list[Pair]:
        """Set what `pool` wants where; returns the (node, model) pairs to unload now:
        ones the pool gave up, that the operator loaded, and that no other pool claims."""
        before = self.pools.get(pool, Claim()).nodes
        after = {n: frozenset(ms) for n, ms in nodes.items() if ms}
        self._set_claim(pool, Claim(after, probe_interval))
        released = {(n, m) for n, ms in before.items() for m in ms if m not in after.get(n, ())}
        return self._unloadable(released)

    def release(self, pool: PoolKey) -> list[Pair]:
        """The pool is gone: forget its claims; returns the pairs to unload."""
        claim = self._set_claim(pool, None)
        if claim is None:
            return []
        return self._unloadable({(n, m) for n, ms in claim.nodes.items() for m in ms})

    def _unloadable(self, released: set[Pair]) -> list[Pair]:
        due = sorted(p for p in released if p in self.managed and p[1] not in self.claimed_on(p[0]))
        self.managed.difference_update(due)
        return due

    def claimed_on(self, node: str) -> set[str]:
        """The models any pool claims on `node`."""
        return {m for models in self._by_node.get(node, {}).values() for m in models}

    def claimed_by_others(self, pool: PoolKey, nodes: Iterable[str] | None = None) -> dict[str, set[str]]:
        """Node -> the models pools other than `pool` claim there (of `nodes`, else of all)."""
        others: dict[str, set[str]] = {}
        for node in self._by_node if nodes is None else nodes:
            claimants = self._by_node.get(node)
            if claimants:
                models = {m for key, ms in claimants.items() if key != pool for m in ms}
                if models:
                    others[node] = models
        return others

    def nodes(self) -> set[str]:
        """Every node some pool claims."""
        return set(self._by_node)

    def probe_interval(self, node: str, default: float) -> float:
        """The shortest interval of the pools claiming the node, else `default`."""
        intervals = [interval for key in self._by_node.get(node, ())
                     if (interval := self.pools[key].probe_interval)]
        return min(intervals, default=default)

    # -- what the operator loaded ------------------------------------------------------------
    def mark_managed(self, node: str, model: str) -> None:
        self.managed.add((node, model))

    def unmark_managed(self, node: str, model: str) -> None:
        """A load the agent refused: nothing of ours is there after all."""
        self.managed.discard((node, model))

    def managed_on(self, node: str) -> set[str]:
        return self.managed.on(node)

    def adopt(self, node: str, agent: AgentView) -> None:
        """What the agent says we loaded (and still holds) is ours to unload, even if we
        restarted since. An `Observations` agent listener."""
        if self.owner is None:
            return
        self.managed.update((node, m) for m, o in agent.owners.items()
                            if o == self.owner and agent.models.get(m) in _LIVE)

    # -- unloads still owed ------------------------------------------------------------------
    def defer_unload(self, node: str, model: str) -> None:
        """An unload decided while the node did not answer: its monitor does it later."""
        self._deferred.add((node, model))

    def deferred_unloads(self, node: str) -> list[str]:
        """Deferred unloads for `node` that no pool has claimed again since."""
        claimed = self.claimed_on(node)
        for model in [m for n, m in self._deferred if n == node and m in claimed]:
            self._deferred.discard((node, model))
        return sorted(m for n, m in self._deferred if n == node)

    def forget_deferred(self, node: str, model: str) -> None:
        self._deferred.discard((node, model))

    def orphans_due(self, node: str, agent: AgentView | None, grace: float) -> list[str]:
        """Models of ours, ready on `node` (as `agent` reports it), that no pool has claimed
        for `grace` seconds: to unload now (they leave `managed`). Deferred unloads are left
        to their own path."""
        if not self.seeded or self.owner is None or agent is None:
            return []
        claimed = self.claimed_on(node)
        unclaimed = {m for m, o in agent.owners.items()
                     if o == self.owner and agent.models.get(m) is ModelPhase.READY
                     and m not in claimed and (node, m) not in self._deferred}
        now = self._clock()
        for pair in [p for p in self._unclaimed_since if p[0] == node and p[1] not in unclaimed]:
            del self._unclaimed_since[pair]
        due = []
        for model in sorted(unclaimed):
            since = self._unclaimed_since.setdefault((node, model), now)
            if now - since >= grace:
                due.append(model)
                del self._unclaimed_since[node, model]
                self.managed.discard((node, model))
        return due

    def forget_node(self, node: str) -> None:
        """The node is gone: no unload is owed there any more (its claims stay with their pools)."""
        self._deferred = {p for p in self._deferred if p[0] != node}
        self._unclaimed_since = {p: t for p, t in self._unclaimed_since.items() if p[0] != node}
