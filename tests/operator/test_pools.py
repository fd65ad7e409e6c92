"""InferencePools end to end with agents that load and unload: a real `mlxpool operator`
process against the real API server, driving simulated agents (`bench.simagents`, see
conftest.py) through their operations API."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.integration

POOL = "chat"
TEST_LABEL = "mlxpool.dev/test-namespace"
FAST = ("--report-interval", "1", "--node-stale-seconds", "3", "--scrape-interval", "1", "--resync-interval", "2")


def model(name: str) -> dict:
    return {"name": name, "source": f"file:///models/{name}"}


def pool(namespace: str, replicas: int = 2, models: list | None = None, selector: dict | None = None) -> dict:
    return {"apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": POOL, "namespace": namespace},
            "spec": {"models": models or [model("m1")], "replicas": replicas,
                     "nodeSelector": {"matchLabels": {TEST_LABEL: namespace, **(selector or {})}}}}


def patch_pool(cluster, spec: dict) -> None:
    cluster.cp.kubectl("patch", "ipool", POOL, "-n", cluster.namespace, "--type=merge", "-p",
                       json.dumps({"spec": spec}))


def ready(cluster, replicas: int):
    status = cluster.status("ipool", POOL)
    return (status.get("readyReplicas") == replicas and status.get("observedGeneration") ==
            cluster.get("ipool", POOL)["metadata"]["generation"] and status)


def test_models_are_loaded_on_chosen_agents_and_failures_move_them(cluster, sim_agents, run_operator):
    sims = sim_agents(3, load_seconds=0.5)
    cluster.apply(pool(cluster.namespace, replicas=2))
    operator = run_operator(cluster.namespace, *FAST)

    status = cluster.eventually(lambda: ready(cluster, 2), 30, "two replicas serving m1", operator)
    placed = [e["node"] for e in status["endpoints"]]
    assert cluster.routed(POOL, "m1") == placed
    assert status["readySummary"] == "2/2" and all(e["managedModels"] == ["m1"] for e in status["endpoints"])
    assert cluster.conditions("ipool", POOL)["Ready"] == ("True", "EndpointsReady")
    loads = sims.calls("load")
    assert {n: loads[n] for n in placed} == dict.fromkeys(placed, 1) and sum(loads.values()) == 2
    reasons = [r for r, _ in cluster.events("InferencePool")]
    assert reasons.count("LoadingModel") == 2 and "ModelReady" in reasons
    header, *rows = cluster.cp.kubectl("get", "ipool", "-n", cluster.namespace).stdout.splitlines()
    assert rows[0].split()[:4] == [POOL, "2/2", "m1", "round-robin"]

    # An agent dies: it leaves the table, the spare loads the model and takes its place.
    dead = placed[0]
    sims.kill(dead)
    cluster.eventually(lambda: dead not in cluster.routed(POOL, "m1"), 5, "dead agent out of the table", operator)
    status = cluster.eventually(lambda: ready(cluster, 2), 30, "two replicas again", operator)
    spare = next(n for n in sims.names if n not in placed)
    assert sorted(e["node"] for e in status["endpoints"]) == sorted([placed[1], spare])
    assert sims.calls("load")[spare] == 1
    moved = [m for r, m in cluster.events("InferencePool") if r == "PlacementChanged" and f"removed {dead}" in m]
    assert moved and "fails its health probe: cannot connect" in moved[0]

    # The dead node is marked: first its probe, then its heartbeat.
    def node_reason() -> str:
        node = json.loads(cluster.cp.kubectl("get", "inode", dead, "-o", "json").stdout)
        return next(c["reason"] for c in node["status"]["conditions"] if c["type"] == "Ready")

    cluster.eventually(lambda: node_reason() == "HeartbeatStale", 15, "node marked HeartbeatStale", operator)
    header, *rows = cluster.cp.kubectl("get", "inode", dead).stdout.splitlines()
    row = next(r for r in rows if r.startswith(dead))
    # The READY column (the operator's verdict), read by position: an empty MODELS cell
    # (the sim may not have reported its models yet) would shift a whitespace split.
    assert row[header.index("READY"):header.index("REPORTED")].strip() == "False", (header, row)


def test_a_restarted_operator_repeats_no_load(cluster, sim_agents, run_operator):
    sims = sim_agents(2, load_seconds=3.0)
    cluster.apply(pool(cluster.namespace, replicas=2))
    operator = run_operator(cluster.namespace, *FAST)
    cluster.eventually(lambda: sum(sims.calls("load").values()) == 2, 20, "both loads sent", operator)
    operator.stop()  # mid-way: both models still loading

    operator = run_operator(cluster.namespace, *FAST)
    cluster.eventually(lambda: ready(cluster, 2), 30, "ready after the restart", operator)
    assert sims.calls("load") == dict.fromkeys(sims.names, 1)
    assert sum(sims.calls("unload").values()) == 0


def test_spec_changes_are_applied_in_place(cluster, sim_agents, run_operator):
    zone_a = sim_agents(1, prefix="a", labels={"zone": "a"})
    zone_b = sim_agents(1, prefix="b", labels={"zone": "b"})
    (a,), (b,) = zone_a.names, zone_b.names
    cluster.apply(pool(cluster.namespace, replicas=1, selector={"zone": "a"}))
    operator = run_operator(cluster.namespace, *FAST)
    cluster.eventually(lambda: ready(cluster, 1), 30, "m1 on a", operator)

    # A second model: loaded beside the first, on the same node.
    patch_pool(cluster, {"models": [model("m1"), model("m2")]})
    cluster.eventually(lambda: ready(cluster, 1) and cluster.routed(POOL, "m2") == [a], 20, "m2 on a", operator)
    assert zone_a.calls("load")[a] == 2

    # The first model removed: unloaded there.
    patch_pool(cluster, {"models": [model("m2")]})
    cluster.eventually(lambda: set(zone_a.models()[a]) == {"m2"}, 20, "m1 unloaded from a", operator)

    # Another strategy: the table says so.
    patch_pool(cluster, {"routing": {"strategy": "least-loaded"}})
    cluster.eventually(lambda: json.loads(cluster.get("configmap", f"{POOL}-routes")["data"]["routes.json"])[
        "strategy"] == "least-loaded", 10, "strategy in the table", operator)

    # Another zone: the model moves to b and leaves a.
    patch_pool(cluster, {"nodeSelector": {"matchLabels": {TEST_LABEL: cluster.namespace, "zone": "b"}}})
    cluster.eventually(lambda: ready(cluster, 1) and cluster.routed(POOL, "m2") == [b], 20, "m2 on b", operator)
    cluster.eventually(lambda: zone_a.models()[a] == {}, 10, "m2 unloaded from a", operator)


def test_a_stale_node_is_marked_and_its_load_moves_away(cluster, sim_agents, run_operator):
    sims = sim_agents(2)
    cluster.apply(pool(cluster.namespace, replicas=1))
    operator = run_operator(cluster.namespace, *FAST)
    status = cluster.eventually(lambda: ready(cluster, 1), 30, "one replica", operator)
    first = status["endpoints"][0]["node"]
    other = next(n for n in sims.names if n != first)

    sims.act(first, "heartbeat", paused=True)  # answers probes, but the API server hears nothing
    cluster.eventually(lambda: cluster.routed(POOL, "m1") == [other], 20, "load moved to the other node", operator)
    node = json.loads(cluster.cp.kubectl("get", "inode", first, "-o", "json").stdout)
    (condition,) = node["status"]["conditions"]
    assert (condition["status"], condition["reason"]) == ("False", "HeartbeatStale")
    assert node["status"]["ready"] is True  # the agent's own fields are left alone
    removed = [m for r, m in cluster.events("InferencePool") if r == "PlacementChanged" and first in m]
    assert any("heartbeat is stale" in m for m in removed)


def test_deleting_a_pool_unloads_its_models_and_never_hangs_on_a_dead_agent(cluster, sim_agents, run_operator):
    sims = sim_agents(2)
    cluster.apply(pool(cluster.namespace, replicas=2))
    operator = run_operator(cluster.namespace, *FAST)
    cluster.eventually(lambda: ready(cluster, 2), 30, "two replicas", operator)
    dead, alive = sims.names
    sims.kill(dead)

    started = time.monotonic()
    cluster.cp.kubectl("delete", "ipool", POOL, "-n", cluster.namespace, "--wait=false")
    cluster.eventually(lambda: not cluster.exists("ipool", POOL), 20, "pool deleted", operator)
    assert time.monotonic() - started < 20
    assert sims.calls("unload")[alive] == 1 and sims.models()[alive] == {}


def test_a_remote_source_is_staged_on_the_node_then_loaded(cluster, sim_agents, run_operator):
    sims = sim_agents(1, stage_seconds=0.5)
    cluster.apply(pool(cluster.namespace, replicas=1, models=[{"name": "hub", "source": "hf://org/hub-model"}]))
    operator = run_operator(cluster.namespace, *FAST)
    cluster.eventually(lambda: ready(cluster, 1), 30, "staged and loaded", operator)
    (node,) = sims.names
    assert (sims.calls("stage")[node], sims.calls("load")[node]) == (1, 1)
    assert list(sims.state()[node]["cache"].values()) == ["Cached"]
    reasons = {r for r, _ in cluster.events("InferencePool")}
    assert {"StagingModel", "LoadingModel", "ModelReady"} <= reasons
