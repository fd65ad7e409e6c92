"""Heartbeats as node Leases, against the real API server: agents (`bench.simagents`,
with the agent's own registration code and identity) renew a Lease per node and write
their InferenceNode's status only when it changes; the operator reads the Leases."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from mlxpool.dev.controlplane import SYSTEM_NAMESPACE
from mlxpool.resources import LABEL_NODE_LEASE

pytestmark = pytest.mark.integration

TEST_LABEL = "mlxpool.dev/test-namespace"


def lease(cluster, name: str) -> dict | None:
    out = cluster.cp.kubectl("get", "lease", name, "-n", SYSTEM_NAMESPACE, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def node(cluster, name: str) -> dict:
    return json.loads(cluster.cp.kubectl("get", "inferencenode", name, "-o", "json").stdout)


def test_agents_renew_a_lease_and_write_their_status_only_on_change(cluster, sim_agents):
    sims = sim_agents(1, heartbeat=0.5)
    name = sims.names[0]
    first = cluster.eventually(lambda: lease(cluster, name), 20, "the node's lease")
    assert first["spec"]["holderIdentity"] == name
    assert first["metadata"]["labels"] == {LABEL_NODE_LEASE: "true"}
    assert first["spec"]["leaseDurationSeconds"] == 2
    version = node(cluster, name)["metadata"]["resourceVersion"]

    time.sleep(2.0)  # four beats
    later = lease(cluster, name)
    assert later is not None and later["spec"]["renewTime"] > first["spec"]["renewTime"]
    assert node(cluster, name)["metadata"]["resourceVersion"] == version, "an unchanged status was written"

    sims.act(name, "ready", ready=False)  # a change goes out at once
    cluster.eventually(lambda: node(cluster, name)["status"]["ready"] is False, 10, "status says not ready")


def test_the_operator_takes_the_heartbeat_from_the_lease(cluster, sim_agents, run_operator):
    sims = sim_agents(1, heartbeat=0.5)
    name = sims.names[0]
    cluster.apply({"apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
                   "metadata": {"name": "chat", "namespace": cluster.namespace},
                   "spec": {"models": [{"name": "m1", "source": "file:///models/m1"}], "replicas": 1,
                            "nodeSelector": {"matchLabels": {TEST_LABEL: cluster.namespace}}}})
    operator = run_operator(cluster.namespace, "--node-stale-seconds", "2", "--resync-interval", "1")
    cluster.eventually(lambda: cluster.routed("chat", "m1") == [name], 30, "routed", operator)
    loaded = datetime.fromisoformat(node(cluster, name)["status"]["heartbeatTime"])

    time.sleep(4.0)  # twice the stale bound, and nothing changed on the node
    beat = datetime.fromisoformat(node(cluster, name)["status"]["heartbeatTime"])
    assert beat == loaded and (datetime.now(UTC) - beat).total_seconds() > 3, "the status was rewritten"
    assert cluster.routed("chat", "m1") == [name], operator.log_tail(30)

    sims.act(name, "heartbeat", paused=True)  # the lease runs out: the node goes stale
    cluster.eventually(lambda: cluster.routed("chat", "m1") == [], 15, "unrouted once stale", operator)
