"""Endpoint picking as pure logic: scorers, filters, the weighted picker, profiles."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxpool.router.picking.filters import (
    ConnectCooldownFilter,
    ConnectCooldownParams,
    MaxInFlightFilter,
    MaxInFlightParams,
)
from mlxpool.router.picking.picker import Pipeline, WeightedScorer
from mlxpool.router.picking.plugins import PickRequest, spread
from mlxpool.router.picking.profiles import Strategies, load_strategies
from mlxpool.router.picking.scorers import LeastInFlightScorer, LowLatencyScorer, WeightedRoundRobinScorer
from mlxpool.router.picking.signals import EndpointSignals
from mlxpool.routing import RouteEndpoint


def endpoints(*spec: str | tuple[str, int]) -> list[RouteEndpoint]:
    """("a", "b") or (("a", 2), ("b", 1)): nodes with URLs http://a, http://b, ..."""
    out = []
    for s in spec:
        node, weight = (s, 1) if isinstance(s, str) else s
        out.append(RouteEndpoint(node=node, url=f"http://{node}", weight=weight))
    return out


def signals_with(in_flight: dict[str, int] | None = None, first_byte: dict[str, list[float]] | None = None,
                 failed_at: dict[str, float] | None = None) -> EndpointSignals:
    signals = EndpointSignals(ewma_alpha=0.5)
    for node, n in (in_flight or {}).items():
        for _ in range(n):
            signals.started(f"http://{node}")
    for node, samples in (first_byte or {}).items():
        for s in samples:
            signals.observe_first_byte(f"http://{node}", s)
    for node, at in (failed_at or {}).items():
        signals.connect_failed(f"http://{node}", at)
    return signals


def picks(pipeline: Pipeline, eps: list[RouteEndpoint], n: int, signals: EndpointSignals | None = None,
          model: str = "m") -> list[str]:
    signals = signals or EndpointSignals()
    return [pipeline.rank(PickRequest(model), eps, signals)[0].node for _ in range(n)]


def only(*scorers: tuple[object, float], filters: tuple = ()) -> Pipeline:
    return Pipeline("test", filters, tuple(WeightedScorer(s, w) for s, w in scorers))  # type: ignore[arg-type]


@pytest.mark.parametrize(("values", "higher_is_better", "expected"), [
    ([], True, []),
    ([3, 3, 3], True, [1.0, 1.0, 1.0]),
    ([0, 5, 10], True, [0.0, 0.5, 1.0]),
    ([0, 5, 10], False, [1.0, 0.5, 0.0]),
])
def test_spread_normalises_into_unit_range(values, higher_is_better, expected):
    assert spread(values, higher_is_better=higher_is_better) == expected


@pytest.mark.parametrize(("spec", "n", "expected"), [
    (("a",), 3, "aaa"),
    (("a", "b", "c"), 6, "abcabc"),
    ((("a", 2), ("b", 1)), 6, "abaaba"),              # smooth: never two b's, a's spread
    ((("a", 5), ("b", 1), ("c", 1)), 7, "aabacaa"),   # nginx's documented sequence
    ((("a", 1), ("b", 3)), 8, "babbbabb"),
])
def test_weighted_round_robin_sequences(spec, n, expected):
    assert "".join(picks(only((WeightedRoundRobinScorer(), 1.0)), endpoints(*spec), n)) == expected


def test_round_robin_ranks_the_rest_in_rotation_order():
    pipeline = only((WeightedRoundRobinScorer(), 1.0))
    eps, signals = endpoints("a", "b", "c"), EndpointSignals()
    first = [e.node for e in pipeline.rank(PickRequest("m"), eps, signals)]
    second = [e.node for e in pipeline.rank(PickRequest("m"), eps, signals)]
    assert first == ["a", "b", "c"]
    assert second == ["b", "c", "a"]  # failover after b goes to c, the next in turn


def test_round_robin_keeps_one_rotation_per_model():
    pipeline = only((WeightedRoundRobinScorer(), 1.0))
    eps, signals = endpoints("a", "b"), EndpointSignals()
    order = [pipeline.rank(PickRequest(model), eps, signals)[0].node for model in ("x", "y", "x", "y")]
    assert order == ["a", "a", "b", "b"]


def test_round_robin_adapts_when_the_endpoint_set_changes():
    pipeline = only((WeightedRoundRobinScorer(), 1.0))
    signals = EndpointSignals()
    assert picks(pipeline, endpoints("a", "b"), 3, signals) == ["a", "b", "a"]
    assert sorted(picks(pipeline, endpoints("a", "b", "c"), 6, signals)) == ["a", "a", "b", "b", "c", "c"]


@pytest.mark.parametrize(("in_flight", "expected_order"), [
    ({}, ["a", "b", "c"]),
    ({"a": 3, "b": 1, "c": 2}, ["b", "c", "a"]),
    ({"a": 1, "b": 1, "c": 0}, ["c", "a", "b"]),
])
def test_least_in_flight_ranks_by_load(in_flight, expected_order):
    ranked = only((LeastInFlightScorer(), 1.0)).rank(PickRequest("m"), endpoints("a", "b", "c"),
                                                     signals_with(in_flight=in_flight))
    assert [e.node for e in ranked] == expected_order


@pytest.mark.parametrize(("first_byte", "expected_order"), [
    ({}, ["a", "b", "c"]),
    ({"a": [0.9], "b": [0.1], "c": [0.5]}, ["b", "c", "a"]),
    ({"a": [0.9], "b": [0.3]}, ["b", "c", "a"]),       # unmeasured c counts as good as the best
    ({"a": [0.1, 0.9], "b": [0.4]}, ["b", "c", "a"]),  # EWMA 0.5: a = 0.5, c = best known (0.4)
])
def test_low_latency_ranks_by_first_byte_ewma(first_byte, expected_order):
    ranked = only((LowLatencyScorer(), 1.0)).rank(PickRequest("m"), endpoints("a", "b", "c"),
                                                  signals_with(first_byte=first_byte))
    assert [e.node for e in ranked] == expected_order


def test_weights_combine_scores():
    # least-in-flight prefers b (a busy); low-latency prefers a. The heavier weight wins.
    signals = signals_with(in_flight={"a": 4}, first_byte={"a": [0.1], "b": [1.0]})
    eps = endpoints("a", "b")
    latency_heavy = only((LowLatencyScorer(), 2.0), (LeastInFlightScorer(), 1.0))
    load_heavy = only((LowLatencyScorer(), 1.0), (LeastInFlightScorer(), 2.0))
    assert latency_heavy.rank(PickRequest("m"), eps, signals)[0].node == "a"
    assert load_heavy.rank(PickRequest("m"), eps, signals)[0].node == "b"


@pytest.mark.parametrize(("failed_at", "now", "expected"), [
    ({}, 10.0, ["a", "b"]),
    ({"a": 8.0}, 10.0, ["b"]),               # failed 2 s ago: cooling down
    ({"a": 4.0}, 10.0, ["a", "b"]),          # failed 6 s ago: back
    ({"a": 9.0, "b": 9.5}, 10.0, ["a", "b"]),  # all cooling: keep all, the table decides
])
def test_connect_cooldown_filter(failed_at, now, expected):
    kept = ConnectCooldownFilter(ConnectCooldownParams(seconds=5)).filter(
        PickRequest("m", now=now), endpoints("a", "b"), signals_with(failed_at=failed_at))
    assert [e.node for e in kept] == expected


def test_a_success_ends_the_cooldown():
    signals = signals_with(failed_at={"a": 9.0})
    signals.connected("http://a")
    kept = ConnectCooldownFilter().filter(PickRequest("m", now=10.0), endpoints("a", "b"), signals)
    assert [e.node for e in kept] == ["a", "b"]


def test_max_in_flight_filter_can_empty_the_list():
    pipeline = only((WeightedRoundRobinScorer(), 1.0), filters=(MaxInFlightFilter(MaxInFlightParams(limit=2)),))
    signals = signals_with(in_flight={"a": 2, "b": 1})
    assert [e.node for e in pipeline.rank(PickRequest("m"), endpoints("a", "b"), signals)] == ["b"]
    signals.started("http://b")
    assert pipeline.rank(PickRequest("m"), endpoints("a", "b"), signals) == []


def test_in_flight_never_goes_negative_and_retain_keeps_busy_endpoints():
    signals = EndpointSignals()
    signals.finished("http://a")
    assert signals.get("http://a").in_flight == 0
    signals.started("http://b")
    signals.observe_first_byte("http://c", 1.0)
    signals.retain(["http://a"])
    assert signals.get("http://b").in_flight == 1
    assert signals.get("http://c").first_byte_ewma is None


def test_builtin_profiles():
    strategies = Strategies(load_strategies())
    assert set(strategies.pipelines) >= {"round-robin", "least-loaded", "latency-aware"}
    eps = endpoints("a", "b", "c")
    assert picks(strategies.for_name("round-robin"), eps, 4) == ["a", "b", "c", "a"]
    busy = signals_with(in_flight={"a": 2, "b": 2})
    assert picks(strategies.for_name("least-loaded"), eps, 1, busy) == ["c"]
    # With equal load, least-loaded still rotates (its tie-breaking round-robin scorer).
    assert picks(Strategies(load_strategies()).for_name("least-loaded"), eps, 3) == ["a", "b", "c"]


def test_unknown_strategy_uses_the_default(caplog):
    strategies = Strategies(load_strategies())
    assert strategies.for_name("quantum") is strategies.pipelines["round-robin"]
    assert "unknown routing strategy" in caplog.text


def test_strategies_file_adds_and_replaces_profiles(tmp_path: Path):
    path = tmp_path / "strategies.yaml"
    path.write_text("""
default: capped
profiles:
  capped:
    filters: [{type: max-in-flight, params: {limit: 4}}]
    scorers: [{type: least-in-flight}]
  round-robin:
    scorers: [{type: weighted-round-robin, weight: 2}]
""")
    strategies = Strategies(load_strategies(path))
    assert strategies.default == "capped"
    assert strategies.pipelines["capped"].filters[0].params.limit == 4  # type: ignore[attr-defined]
    assert strategies.pipelines["round-robin"].filters == ()
    assert "least-loaded" in strategies.pipelines


@pytest.mark.parametrize(("yaml_text", "needle"), [
    ("profiles: {x: {scorers: [{type: telepathy}]}}", "unknown plugin type 'telepathy'"),
    ("profiles: {x: {scorers: [{type: connect-cooldown}]}}", "'connect-cooldown' is not a scorer"),
    ("profiles: {x: {filters: [{type: max-in-flight}], scorers: [{type: least-in-flight}]}}", "limit"),
    ("profiles: {x: {filters: [{type: connect-cooldown, params: {secs: 1}}], scorers: [{type: least-in-flight}]}}",
     "secs"),
    ("profiles: {x: {scorers: []}}", "scorers"),
    ("profiles: {x: {scorers: [{type: least-in-flight, weight: -1}]}}", "weight"),
    ("default: nope", "default strategy 'nope'"),
    ("colour: blue", "colour"),
])
def test_bad_strategies_file_names_the_problem(tmp_path: Path, yaml_text, needle):
    path = tmp_path / "strategies.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError) as info:
        Strategies(load_strategies(path))
    assert needle in str(info.value)
