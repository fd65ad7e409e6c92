"""Placement: label selectors, node eligibility and the choice of replicas (pure)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from mlxpool.operator.placement import NodeView, choose, eligible_nodes, exclusion_reason, selector_matches
from mlxpool.operator.specs import LabelSelector, PoolSpec

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def node(name: str, *, labels: dict | None = None, ready: bool = True, age: float | None = 1.0,
         models: tuple[str, ...] = ("tiny",), free: int | None = 0) -> NodeView:
    return NodeView(
        name=name, endpoint=f"http://127.0.0.1/{name}", labels=labels or {"role": "inference"}, ready=ready,
        heartbeat=None if age is None else NOW - timedelta(seconds=age), free_memory_bytes=free,
        models=frozenset(models),
    )


def pool(**spec) -> PoolSpec:
    return PoolSpec.model_validate({"models": [{"name": "tiny"}], **spec})


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    (None, {}, True),
    ({}, {"a": "1"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({"matchLabels": {"a": "1"}}, {}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"b": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": "1"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "1"}, False),
    ({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]}, {"a": "1"}, False),
])
def test_label_selector_semantics(selector, labels, expected):
    parsed = None if selector is None else LabelSelector.model_validate(selector)
    assert selector_matches(parsed, labels) is expected


@pytest.mark.parametrize(("view", "reason"), [
    (node("a"), None),
    (node("a", labels={"role": "batch"}), "does not match the pool's nodeSelector"),
    (node("a", ready=False), "not ready"),
    (node("a", age=None), "has no heartbeat"),
    (node("a", age=31), "heartbeat is stale (31s old)"),
    (node("a", models=("other",)), "serves none of the pool's models"),
    (node("a", models=("other", "tiny")), None),
])
def test_exclusion_reasons(view, reason):
    spec = pool(nodeSelector={"matchLabels": {"role": "inference"}})
    assert exclusion_reason(view, spec, NOW, stale_after=30) == reason


def test_eligible_nodes_are_sorted_by_name_and_filtered():
    nodes = [node("c"), node("a", ready=False), node("b"), node("d", age=100)]
    assert [n.name for n in eligible_nodes(nodes, pool(), NOW, stale_after=30)] == ["b", "c"]


def names(chosen: list[NodeView]) -> list[str]:
    return [n.name for n in chosen]


def test_choose_takes_at_most_replicas_preferring_free_memory_then_name():
    nodes = [node("a", free=1), node("b", free=5), node("c", free=5), node("d", free=9)]
    healthy = dict.fromkeys("abcd", True)
    assert names(choose(nodes, 2, ["tiny"], current=(), healthy=healthy)) == ["b", "d"]
    assert names(choose(nodes, 3, ["tiny"], current=(), healthy=healthy)) == ["b", "c", "d"]
    assert names(choose(nodes, 0, ["tiny"], current=(), healthy=healthy)) == []
    assert names(choose(nodes, 10, ["tiny"], current=(), healthy=healthy)) == ["a", "b", "c", "d"]


def test_choose_sticks_to_current_healthy_nodes():
    nodes = [node("a", free=1), node("b", free=9)]
    assert names(choose(nodes, 1, ["tiny"], current={"a"}, healthy={"a": True, "b": True})) == ["a"]


def test_choose_replaces_an_unhealthy_node_with_a_healthy_spare():
    nodes = [node("a", free=9), node("b", free=1)]
    assert names(choose(nodes, 1, ["tiny"], current={"a"}, healthy={"a": False, "b": True})) == ["b"]


def test_choose_keeps_an_unhealthy_node_when_no_healthy_one_can_take_its_slot():
    nodes = [node("a"), node("b")]
    assert names(choose(nodes, 2, ["tiny"], current={"a", "b"}, healthy={"a": True, "b": False})) == ["a", "b"]


def test_choose_prefers_nodes_serving_more_of_the_pools_models():
    nodes = [node("a", models=("x",), free=9), node("b", models=("x", "y"), free=1)]
    assert names(choose(nodes, 1, ["x", "y"], current=(), healthy={"a": True, "b": True})) == ["b"]


def test_scale_down_keeps_the_preferred_nodes():
    nodes = [node("a", free=1), node("b", free=2), node("c", free=3)]
    healthy = dict.fromkeys("abc", True)
    assert names(choose(nodes, 1, ["tiny"], current={"a", "b", "c"}, healthy=healthy)) == ["c"]


def test_node_view_parses_an_inference_node_object():
    body = {
        "metadata": {"name": "mac-1", "labels": {"role": "inference"}},
        "spec": {"endpoint": "http://10.0.0.5:8101/", "hardware": {
            "chip": "Apple M2 Ultra", "memoryBytes": 1 << 30, "cpuCores": 24, "accelerator": "metal",
            "platform": "darwin-arm64"}},
        "status": {"ready": True, "models": [{"name": "tiny", "memoryBytes": 10}],
                   "heartbeatTime": "2026-01-01T12:00:00Z", "freeMemoryBytes": 42},
    }
    view = NodeView.from_body(body)
    assert view.endpoint == "http://10.0.0.5:8101"
    assert view.models == {"tiny"} and view.ready and view.free_memory_bytes == 42
    assert view.heartbeat == NOW


def test_node_view_without_status_is_not_ready():
    body = {"metadata": {"name": "mac-1"}, "spec": {"endpoint": "http://x", "hardware": {
        "chip": "c", "memoryBytes": 1, "cpuCores": 1, "accelerator": "cpu", "platform": "p"}}}
    view = NodeView.from_body(body)
    assert not view.ready and view.heartbeat is None and view.models == frozenset()


def test_malformed_node_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="'broken'"):
        NodeView.from_body({"metadata": {"name": "broken"}, "spec": {"endpoint": "http://x"}})


def test_routing_key_ignores_heartbeats_and_free_memory():
    a = node("a", age=1, free=1)
    b = node("a", age=5, free=2)
    assert a.routing_key() == b.routing_key()
    assert a.routing_key() != node("a", ready=False).routing_key()
