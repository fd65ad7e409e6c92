"""The rules for replacing the routing table (pure)."""

from __future__ import annotations

import pytest

from mlxpool.router.settings import PoolRef
from mlxpool.router.tables.holder import Offer, TableHolder
from mlxpool.routing import RouteEndpoint, RoutingTable


def table(revision: int, url: str = "http://a", pool: str = "pool", namespace: str = "ns") -> RoutingTable:
    return RoutingTable(pool=pool, namespace=namespace, revision=revision,
                        models={"m": [RouteEndpoint(node="a", url=url)]})


@pytest.mark.parametrize(("offers", "results", "final_revision"), [
    ([(1, "x", "o")], [Offer.ACCEPTED], 1),
    ([(1, "x", "o"), (2, "y", "o")], [Offer.ACCEPTED, Offer.ACCEPTED], 2),
    ([(2, "x", "o"), (1, "y", "o")], [Offer.ACCEPTED, Offer.STALE], 2),        # never backwards
    ([(2, "x", "o"), (2, "x", "o")], [Offer.ACCEPTED, Offer.UNCHANGED], 2),
    ([(2, "x", "o"), (2, "y", "o")], [Offer.ACCEPTED, Offer.STALE], 2),        # new content needs a new revision
    ([(5, "x", "o1"), (1, "y", "o2")], [Offer.ACCEPTED, Offer.ACCEPTED], 1),   # a new object starts over
])
def test_offers(offers, results, final_revision):
    holder = TableHolder(PoolRef("ns", "pool"))
    got = [holder.offer(table(rev, f"http://{url}"), origin) for rev, url, origin in offers]
    assert got == results
    assert holder.current is not None and holder.current.revision == final_revision


def test_unparsable_table_keeps_the_last_good_one():
    holder = TableHolder()
    assert holder.offer_text(table(3).to_json(), "o") is Offer.ACCEPTED
    assert holder.offer_text("{not json", "o") is Offer.INVALID
    assert holder.offer_text('{"pool": "pool"}', "o") is Offer.INVALID
    assert holder.current == table(3)


def test_table_for_another_pool_is_refused():
    holder = TableHolder(PoolRef("ns", "pool"))
    assert holder.offer(table(1, pool="other"), "o") is Offer.FOREIGN
    assert holder.offer(table(1, namespace="other-ns"), "o") is Offer.FOREIGN
    assert holder.current is None


def test_after_the_origin_is_forgotten_any_revision_is_accepted():
    holder = TableHolder()
    holder.offer(table(9), "o")
    holder.forget_origin()
    assert holder.current == table(9)  # still served meanwhile
    assert holder.offer(table(1, "http://b"), "o") is Offer.ACCEPTED


def test_listeners_see_accepted_tables_and_every_outcome():
    holder = TableHolder()
    accepted: list[int] = []
    outcomes: list[Offer] = []
    holder.on_accept(lambda t: accepted.append(t.revision))
    holder.on_result(outcomes.append)
    holder.offer(table(1), "o")
    holder.offer(table(1), "o")
    holder.offer_text("nope", "o")
    holder.offer(table(2), "o")
    assert accepted == [1, 2]
    assert outcomes == [Offer.ACCEPTED, Offer.UNCHANGED, Offer.INVALID, Offer.ACCEPTED]


@pytest.mark.parametrize("text", ["ns", "/pool", "ns/", "ns/pool/x", ""])
def test_pool_ref_must_be_namespace_slash_name(text):
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        PoolRef.parse(text)
