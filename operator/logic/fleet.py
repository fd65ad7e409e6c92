"""What the operator knows about every node right now, shared by all pools: memory only.

One `Fleet` per operator process, the composition of two halves with one job each:
`observed` (`observations`: the InferenceNode views, probe results, agent reports,
what the operator's own calls taught it, the loads that failed) and `claims` (what
each pool wants on which node, what the operator loaded, the unloads it still owes,
its orphans). Callers use the half they mean: `fleet.observed.views`,
`fleet.claims.claim(...)`. The halves meet here only where one needs the other:

- every agent view the observations take goes to `Claims.adopt` (agents say who loaded
  each model, so ownership survives a restart);
- `orphans_due` reads the agent's view of a node against the claims;
- `drop_view` forgets a deleted node on both sides;
- `candidates`, what one pool's placement sees.

Nothing here is written anywhere; see the two halves for how each is rebuilt after a
restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping

from mlxpool.operator.logic.claims import Claims, PoolKey
from mlxpool.operator.logic.observations import Observations
from mlxpool.operator.logic.placement import Candidate


class Fleet:
    def __init__(self, retry_after: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 owner: str | None = None) -> None:
        self.observed = Observations(retry_after=retry_after, clock=clock)
        self.claims = Claims(owner=owner, clock=clock)
        self.observed.subscribe_agents(self.claims.adopt)

    def drop_view(self, name: str) -> None:
        """The node is gone: forget what was seen there and the unloads owed there."""
        self.observed.drop_view(name)
        self.claims.forget_node(name)

    def orphans_due(self, node: str, grace: float) -> list[str]:
        """`Claims.orphans_due` against what the node's agent last reported."""
        return self.claims.orphans_due(node, self.observed.of(node).agent, grace)

    def candidates(self, pool: PoolKey, sizes: Mapping[str, int | None],
                   only: Collection[str] | None = None) -> list[Candidate]:
        """Every known node (of `only`, when given) as `pool` sees it: other pools' pending
        loads are reserved.

        Here, not in either half, because it is the one view that needs both: the nodes,
        probes, reports and failures are observed, the reservations are other pools'
        claims less what the agent already holds (a ready model already shows in free
        memory, a loading one already takes its slot).
        """
        views = self.observed.views
        names = views.keys() if only is None else [n for n in only if n in views]
        others = self.claims.claimed_by_others(pool, None if only is None else names)
        result = []
        for name in names:
            view = views[name]
            obs = self.observed.of(name)
            pending = others.get(name)
            if not pending:  # most nodes: nothing of other pools' on its way there
                result.append(Candidate(view=view, agent=obs.agent, agent_error=obs.agent_error, probe=obs.probe,
                                        failures=self.observed.failures(name)))
                continue
            held = set(obs.agent.models) if obs.agent is not None else set(view.models)
            ready = obs.agent.ready if obs.agent is not None else view.models
            pending = pending - ready
            result.append(Candidate(
                view=view, agent=obs.agent, agent_error=obs.agent_error, probe=obs.probe,
                failures=self.observed.failures(name),
                reserved_slots=len(pending - held),
                reserved_bytes=sum(sizes.get(m) or 0 for m in pending),
            ))
        return result
