"""Two operator shards on one fleet, against the real API server: each replica owns the
pools its `--pool-selector` selects, never acts on the other's, and both handle the
cluster-wide InferenceNodes sanely (both probe and place on every node; only one writes
their Ready condition). Each shard peers through its own kopf peering object."""

from __future__ import annotations

import json
import re

import pytest

from mlxpool.dev.controlplane import REPO_ROOT

pytestmark = pytest.mark.integration

TEST_LABEL = "mlxpool.dev/test-namespace"
SHARD = "mlxpool.dev/shard"


def pool(namespace: str, name: str, shard: str) -> dict:
    return {"apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": name, "namespace": namespace, "labels": {SHARD: shard}},
            "spec": {"models": [{"name": f"m-{name}", "source": f"file:///models/{name}"}], "replicas": 2,
                     "nodeSelector": {"matchLabels": {TEST_LABEL: namespace}}}}


def pools_in_metrics(text: str) -> set[str]:
    return set(re.findall(r'mlxpool_operator_pool_ready_endpoints\{[^}]*pool="([^"]+)"', text))


def test_two_shards_split_the_pools_and_share_the_nodes(cluster, sim_agents, run_operator):
    cp = cluster.cp
    cp.kubectl("apply", "-f", str(REPO_ROOT / "manifests" / "sharding" / "peering_crds.yaml"),
               "-f", str(REPO_ROOT / "manifests" / "sharding" / "peering_role.yaml"))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=30s", "crd/kopfpeerings.kopf.dev")
    for shard in "ab":  # namespaced operators peer through a KopfPeering in their namespace
        cp.kubectl("apply", "-n", cluster.namespace, "-f", "-",
                   input=f"apiVersion: kopf.dev/v1\nkind: KopfPeering\nmetadata: {{name: mlxpool-{shard}}}\n")
    sims = sim_agents(4)
    shards = {"a": ("a1", "a2"), "b": ("b1", "b2")}
    for shard, names in shards.items():
        for name in names:
            cluster.apply(pool(cluster.namespace, name, shard))
    ops = {"a": run_operator(cluster.namespace, "--pool-selector", f"{SHARD}=a", "--shard", "a",
                             "--resync-interval", "1"),
           "b": run_operator(cluster.namespace, "--pool-selector", f"{SHARD}=b", "--shard", "b",
                             "--no-node-conditions", "--resync-interval", "1")}

    def all_routed() -> bool:
        return all(len(cluster.routed(n, f"m-{n}")) == 2 for names in shards.values() for n in names)
    cluster.eventually(all_routed, 60, "every pool of both shards routed to 2 nodes", ops["a"])

    for shard, op in ops.items():
        other = "b" if shard == "a" else "a"
        assert pools_in_metrics(cluster.metrics(op)) == set(shards[shard]), f"shard {shard} saw other pools"
        log = op.log_text()
        assert all(f"pool={n}" not in log for n in shards[other]), f"shard {shard} acted on shard {other}'s pools"
        assert "Pausing" not in log and "conflicting" not in log, log[-2000:]  # no peer of another shard
        peering = json.loads(cp.kubectl("get", "kopfpeering", f"mlxpool-{shard}", "-n", cluster.namespace,
                                        "-o", "json").stdout)
        assert len(peering.get("status") or {}) == 1, peering  # this shard's one replica keeps it alive
    # Each shard's loads carry its own owner: neither takes the other's models for orphans.
    owners: dict[str, set[str]] = {}
    for state in sims.state().values():
        for model, owner in state["owners"].items():
            owners.setdefault(model, set()).add(owner)
    for shard, names in shards.items():
        for name in names:
            assert owners[f"m-{name}"] == {f"mlxpool-operator:{cluster.namespace}[{SHARD}={shard}]"}, owners
    # The nodes are both shards': every one is Ready, and only shard a wrote the condition.
    for name in sims.names:
        node = cluster.eventually(lambda n=name: cp.kubectl("get", "inferencenode", n, "-o",
                                                           "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
                                                           ).stdout == "True", 20, f"{name} Ready", ops["a"])
        assert node
    assert "node marked" in ops["a"].log_text() and "node marked" not in ops["b"].log_text()
    assert "Traceback" not in ops["a"].log_text() + ops["b"].log_text()
