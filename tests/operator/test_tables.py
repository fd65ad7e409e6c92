"""Routing-table building and revision bumping (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

from mlxpool.operator.logic.endpoints import PlacedEndpoint, ProbeResult
from mlxpool.operator.logic.tables import next_table, route_models
from mlxpool.routing import RoutingTable

NOW = datetime(2026, 1, 1, tzinfo=UTC)
OK, DOWN = ProbeResult(True), ProbeResult(False, "cannot connect")


def ep(node: str, probe: ProbeResult = OK, models: tuple[str, ...] = ("tiny",)) -> PlacedEndpoint:
    return PlacedEndpoint(node=node, url=f"http://{node}:8101", models=models, probe=probe)


def table(endpoints: list[PlacedEndpoint], previous: RoutingTable | None = None, models=("tiny",),
          strategy: str = "round-robin", floor: int = 0) -> RoutingTable:
    return next_table(pool="p", namespace="ns", strategy=strategy, models=route_models(models, endpoints),
                      previous=previous, revision_floor=floor, now=NOW)


def test_only_healthy_endpoints_are_routed_and_every_model_is_listed():
    routes = route_models(["a", "b"], [ep("n2", models=("a",)), ep("n1", models=("a",)), ep("n3", DOWN, ("b",))])
    assert [e.node for e in routes["a"]] == ["n1", "n2"]
    assert routes["b"] == []
    assert all(e.healthy and e.weight == 1 for e in routes["a"])


def test_first_table_has_revision_one_and_a_timestamp():
    first = table([ep("n1")])
    assert first.revision == 1 and first.updated == NOW
    assert first.endpoints_for("tiny")[0].url == "http://n1:8101"


def test_unchanged_routes_return_the_previous_table_itself():
    first = table([ep("n1"), ep("n2")])
    assert table([ep("n2"), ep("n1")], previous=first) is first


def test_revision_increases_by_one_on_each_change():
    first = table([ep("n1"), ep("n2")])
    second = table([ep("n1"), ep("n2", DOWN)], previous=first)
    third = table([ep("n1"), ep("n2")], previous=second)
    assert (second.revision, third.revision) == (2, 3)
    assert second.endpoints_for("tiny")[0].node == "n1" and len(second.models["tiny"]) == 1


def test_strategy_change_is_a_change():
    first = table([ep("n1")])
    assert table([ep("n1")], previous=first, strategy="least-loaded").revision == 2


def test_revision_floor_keeps_revisions_increasing_when_the_configmap_was_lost():
    assert table([ep("n1")], previous=None, floor=7).revision == 8


def test_table_round_trips_through_json():
    first = table([ep("n1")])
    assert RoutingTable.from_json(first.to_json()) == first


def test_selectable_strategies_are_written_and_a_change_is_a_change():
    first = table([ep("n1")])
    second = next_table(pool="p", namespace="ns", strategy="round-robin", selectable_strategies=("sticky-prefix",),
                        models=route_models(("tiny",), [ep("n1")]), previous=first, now=NOW)
    assert second.revision == 2 and second.selectable_strategies == ["sticky-prefix"]
    assert RoutingTable.from_json(second.to_json()).selectable_strategies == ["sticky-prefix"]


def test_weights_follow_each_models_capacities_and_a_change_is_a_new_revision():
    big = PlacedEndpoint(node="big", url="http://big", models=("a", "b"), probe=OK,
                         capacities=(("a", 400.0), ("b", 10.0)))
    small = PlacedEndpoint(node="small", url="http://small", models=("a", "b"), probe=OK,
                           capacities=(("a", 100.0), ("b", None)))
    routes = route_models(["a", "b"], [small, big])
    assert [(e.node, e.weight) for e in routes["a"]] == [("big", 10), ("small", 3)]
    assert [(e.node, e.weight) for e in routes["b"]] == [("big", 10), ("small", 10)]  # unknown: the mean
    first = table([big, small], models=("a", "b"))
    faster = PlacedEndpoint(node="small", url="http://small", models=("a", "b"), probe=OK,
                            capacities=(("a", 400.0), ("b", None)))
    second = table([big, faster], previous=first, models=("a", "b"))
    assert second.revision == first.revision + 1
    assert [e.weight for e in second.endpoints_for("a")] == [10, 10]
