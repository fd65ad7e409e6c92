"""`mlxpool status`'s pure half: summarising objects in their wire shape, and rendering.

The objects here are hand-written dicts in the shapes the CRDs define (the real reads
run in tests/integration/test_status.py against the apiserver, operator and agents).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mlxpool import status
from mlxpool.cli import main as cli_main

NOW = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)


def ts(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pool(name: str, endpoints: list[dict], ready: int | None = None, replicas: int = 2) -> dict:
    counted = sum(1 for e in endpoints if e["healthy"] and not e.get("pending"))
    ready = counted if ready is None else ready
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": replicas, "models": [{"name": "tiny"}], "routing": {"strategy": "least-loaded"}},
        "status": {"readyReplicas": ready, "readySummary": f"{ready}/{replicas}", "routingRevision": 7,
                   "endpoints": endpoints,
                   "conditions": [{"type": "Ready", "status": "True" if ready == replicas else "False",
                                   "reason": "Degraded", "message": f"{ready} of {replicas} ready"}]},
    }


def node(name: str, verdict: str, heartbeat_ago: float = 30) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {"endpoint": f"http://{name}:8000", "hardware": {"memoryBytes": 25275990016, "memory": "23.5 GiB"}},
        "status": {"ready": verdict == "True", "models": [{"name": "tiny"}], "freeMemoryBytes": 2**33,
                   "heartbeatTime": ts(heartbeat_ago), "agentVersion": "0.1.0",
                   "conditions": [{"type": "Ready", "status": verdict}]},
    }


def endpoint(node_name: str, healthy: bool = True, pending: list[str] | None = None) -> dict:
    e = {"node": node_name, "url": f"http://{node_name}:8000", "models": ["tiny"], "healthy": healthy}
    if pending:
        e["pending"] = pending
    return e


def lease(name: str, renewed_ago: float) -> dict:
    return {"metadata": {"name": name}, "spec": {"renewTime": ts(renewed_ago)}}


def event(name: str, reason: str, ago: float, kind: str = "InferencePool", api: str = "mlxpool.dev/v1alpha1") -> dict:
    return {"involvedObject": {"apiVersion": api, "kind": kind, "name": name, "namespace": "default"},
            "type": "Normal", "reason": reason, "message": f"{reason}\n  happened", "lastTimestamp": ts(ago)}


def snapshot(**kw) -> status.Snapshot:
    return status.Snapshot(**{"pools": [], "nodes": [], "caches": [], "leases": [], "events": [], **kw})


def test_a_pool_and_its_nodes_in_one_summary():
    s = status.summarise(snapshot(
        pools=[pool("tiny", [endpoint("a"), endpoint("b")])],
        nodes=[node("b", "True"), node("a", "True")],
        leases=[lease("a", 2)],
        caches=[{"metadata": {"name": "c", "namespace": "default"}, "spec": {"model": "tiny"},
                 "status": {"readySummary": "1/1", "conditions": [{"type": "Ready", "status": "True"}]}}],
    ), NOW)
    (p,) = s.pools
    assert (p.ready, p.status, p.models, p.strategy, p.revision, p.nodes, p.message) == (
        "2/2", "True", ["tiny"], "least-loaded", 7, ["a", "b"], "")
    assert [n.name for n in s.nodes] == ["a", "b"]
    a, b = s.nodes
    assert a.memory == "23.5 GiB" and a.free == "8.0 GiB" and a.pools == ["default/tiny"]
    assert a.heartbeat_age_seconds == 2  # its Lease, renewed after its last status write
    assert b.heartbeat_age_seconds == 30  # no Lease: the status's heartbeatTime
    assert s.caches[0].ready == "1/1" and not s.disagreements


def test_the_heartbeat_is_the_later_of_lease_and_status():
    s = status.summarise(snapshot(nodes=[node("a", "True", heartbeat_ago=300)], leases=[lease("a", 3)]), NOW)
    assert s.nodes[0].heartbeat_age_seconds == 3
    s = status.summarise(snapshot(nodes=[node("a", "True", heartbeat_ago=3)], leases=[lease("a", 300)]), NOW)
    assert s.nodes[0].heartbeat_age_seconds == 3


@pytest.mark.parametrize(("endpoints", "verdicts", "expected"), [
    ([endpoint("a"), endpoint("b")], {"a": "True", "b": "True"}, []),
    ([endpoint("a"), endpoint("b", healthy=False)], {"a": "True", "b": "False"}, []),
    ([endpoint("a"), endpoint("b", pending=["tiny"])], {"a": "True", "b": "True"}, []),  # loading: not counted
    ([endpoint("a"), endpoint("b")], {"a": "True", "b": "False"},
     ["counts node b ready, but the node's READY is False"]),
    ([endpoint("a"), endpoint("b")], {"a": "True"}, ["counts node b ready, but the node's READY is missing"]),
    ([endpoint("a"), endpoint("b", healthy=False)], {"a": "True", "b": "True"},
     ["counts node b unhealthy, but the node's READY is True"]),
])
def test_a_pools_count_and_its_nodes_ready_must_agree(endpoints, verdicts, expected):
    s = status.summarise(snapshot(pools=[pool("tiny", endpoints)],
                                  nodes=[node(n, v) for n, v in verdicts.items()]), NOW)
    assert len(s.disagreements) == len(expected)
    for found, want in zip(s.disagreements, expected, strict=True):
        assert want in found and "default/tiny" in found


def test_a_ready_count_that_does_not_match_the_endpoints_is_a_disagreement():
    s = status.summarise(snapshot(pools=[pool("tiny", [endpoint("a")], ready=2)], nodes=[node("a", "True")]), NOW)
    assert s.disagreements == ["pool default/tiny reports 2 ready but lists 1 ready endpoints"]


def test_only_mlxpool_events_newest_last_and_limited():
    events = [event("tiny", f"R{i}", ago=100 - i) for i in range(5)]
    events.append(event("x", "Scheduled", ago=1, kind="Pod", api="v1"))
    s = status.summarise(snapshot(events=events), NOW, events=3)
    assert [e.reason for e in s.events] == ["R2", "R3", "R4"]
    assert s.events[-1].object == "InferencePool/default/tiny" and s.events[-1].message == "R4 happened"
    assert status.summarise(snapshot(events=events), NOW, events=0).events == []


def test_render_shows_every_block_and_the_disagreements():
    s = status.summarise(snapshot(
        pools=[pool("tiny", [endpoint("a"), endpoint("b")])],
        nodes=[node("a", "True"), node("b", "False")], events=[event("tiny", "RoutesUpdated", 65)]), NOW)
    text = status.render(s)
    lines = text.splitlines()
    assert lines[0] == "POOLS:"
    header = lines[1].split()
    assert header == ["NAMESPACE", "NAME", "READY", "STATUS", "MODELS", "STRATEGY", "REVISION", "NODES", "MESSAGE"]
    assert lines[2].split()[:8] == ["default", "tiny", "2/2", "True", "tiny", "least-loaded", "7", "a,b"]
    assert "NODES:" in text and "23.5 GiB" in text and "30s" in text
    assert "EVENTS:" in text and "65s" in text and "RoutesUpdated" in text
    assert "DISAGREEMENTS" in text and "counts node b ready" in text
    empty = status.render(status.summarise(snapshot(), NOW))
    assert "POOLS: none" in empty and "NODES: none registered" in empty and "EVENTS: none" in empty


@pytest.mark.parametrize(("seconds", "shown"), [(None, "-"), (5, "5s"), (119, "119s"), (180, "3m"),
                                                (7200, "2h"), (3 * 86400, "3d")])
def test_ages_read_like_kubectl(seconds, shown):
    assert status.age(seconds) == shown


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        cli_main(["status", "--events", "5000"])
    assert "--events must be within 0..1000" in capsys.readouterr().err


def test_an_unreachable_cluster_is_one_line(tmp_path, capsys):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
        "current-context: x\n")
    assert cli_main(["status", "--kubeconfig", str(kubeconfig)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlxpool status: cannot read the cluster:") and err.count("\n") == 1
