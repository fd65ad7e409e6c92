"""The router's current routing table and the rules for replacing it.

Sources (`table_files`, `table_watching`) offer tables; `TableHolder.offer` decides:
a table that does not parse or names another pool is rejected and the last good one
kept; within one origin (one ConfigMap object, one file) the revision never goes
backwards. A different origin (the ConfigMap deleted and re-created under a new uid)
starts a new revision history. No I/O here.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from pydantic import ValidationError

from mlxpool.router.settings import PoolRef
from mlxpool.routing import RoutingTable

log = logging.getLogger(__name__)


class Offer(enum.Enum):
    ACCEPTED = "accepted"
    UNCHANGED = "unchanged"
    STALE = "stale"
    INVALID = "invalid"
    FOREIGN = "foreign"


class TableHolder:
    """Holds the last good table; calls listeners with each accepted one."""

    def __init__(self, pool: PoolRef | None = None) -> None:
        self.pool = pool
        self.current: RoutingTable | None = None
        self.origin: str | None = None
        self._listeners: list[Callable[[RoutingTable], None]] = []
        self._on_result: list[Callable[[Offer], None]] = []

    def on_accept(self, listener: Callable[[RoutingTable], None]) -> None:
        self._listeners.append(listener)

    def on_result(self, listener: Callable[[Offer], None]) -> None:
        """Called with the outcome of every offer (for metrics)."""
        self._on_result.append(listener)

    def offer_text(self, text: str, origin: str) -> Offer:
        """Parse and offer a routes.json document."""
        try:
            table = RoutingTable.from_json(text)
        except ValidationError as exc:
            log.warning("routing table rejected: does not parse origin=%s errors=%s", origin, _short(exc))
            return self._result(Offer.INVALID)
        return self.offer(table, origin)

    def offer(self, table: RoutingTable, origin: str) -> Offer:
        if self.pool is not None and (table.namespace, table.pool) != (self.pool.namespace, self.pool.name):
            log.warning("routing table rejected: for another pool origin=%s table_pool=%s/%s pool=%s",
                        origin, table.namespace, table.pool, self.pool)
            return self._result(Offer.FOREIGN)
        current = self.current
        if current is not None and origin == self.origin:
            if table.revision < current.revision:
                log.warning("routing table ignored: revision went backwards origin=%s revision=%d current=%d",
                            origin, table.revision, current.revision)
                return self._result(Offer.STALE)
            if table.revision == current.revision:
                if not table.same_routes(current):
                    log.warning("routing table ignored: changed content without a new revision origin=%s revision=%d",
                                origin, table.revision)
                    return self._result(Offer.STALE)
                return self._result(Offer.UNCHANGED)
        self.current, self.origin = table, origin
        ready = ",".join(f"{m}:{len(table.endpoints_for(m))}/{len(e)}" for m, e in table.models.items())
        log.info("routing table accepted origin=%s revision=%d strategy=%s models=%s",
                 origin, table.revision, table.strategy, ready)
        for listener in self._listeners:
            listener(table)
        return self._result(Offer.ACCEPTED)

    def reject(self, origin: str, reason: str) -> Offer:
        """A source found no table where one should be (e.g. a ConfigMap without the key)."""
        log.warning("routing table rejected origin=%s reason=%s", origin, reason)
        return self._result(Offer.INVALID)

    def forget_origin(self) -> None:
        """The source object is gone: keep serving the last table, but accept any revision next."""
        self.origin = None

    def _result(self, offer: Offer) -> Offer:
        for listener in self._on_result:
            listener(offer)
        return offer


def _short(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
