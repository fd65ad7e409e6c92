"""Build a pool's routing table from its endpoints: pure, no I/O.

The table lists, for every pool model, the healthy endpoints serving it (ordered by
node name, so order never fakes a change), weighted by capacity (`weights`). Unhealthy endpoints are left out: the
pool status still shows them, with the probe's message. The revision goes up by one
only when the routes change; an unchanged table is returned as the same object, which
tells the caller there is nothing to write.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime

from mlxpool.operator.logic.endpoints import PlacedEndpoint
from mlxpool.operator.logic.weights import weights
from mlxpool.routing import RouteEndpoint, RoutingTable


def route_models(model_names: Collection[str], endpoints: Sequence[PlacedEndpoint]) -> dict[str, list[RouteEndpoint]]:
    """Every pool model (even one without endpoints) mapped to its healthy endpoints,
    each weighted by its capacity for the model relative to the others (`weights`)."""
    routes: dict[str, list[RouteEndpoint]] = {}
    for model in sorted(model_names):
        serving = [e for e in sorted(endpoints, key=lambda e: e.node) if e.healthy and model in e.models]
        shares = weights([dict(e.capacities).get(model) for e in serving])
        routes[model] = [RouteEndpoint(node=e.node, url=e.url, weight=w, healthy=True)
                         for e, w in zip(serving, shares, strict=True)]
    return routes


def next_table(
    *,
    pool: str,
    namespace: str,
    strategy: str,
    selectable_strategies: tuple[str, ...] = (),
    models: dict[str, list[RouteEndpoint]],
    previous: RoutingTable | None,
    revision_floor: int = 0,
    now: datetime,
) -> RoutingTable:
    """`previous` itself when the routes are unchanged, else a table with the next revision.

    `revision_floor` is the last revision known from elsewhere (the pool status), so
    the revision keeps increasing even if the ConfigMap was deleted.
    """
    candidate = RoutingTable(pool=pool, namespace=namespace, revision=0, strategy=strategy,
                             selectable_strategies=list(selectable_strategies), models=models)
    if previous is not None and candidate.same_routes(previous):
        return previous
    last = max(previous.revision if previous is not None else 0, revision_floor)
    return candidate.model_copy(update={"revision": last + 1, "updated": now})
