"""Autoscaling: the operator's per-pool load metrics, scraped from (simulated) agents'
/metrics, and the HPA/KEDA manifests that scale a pool on them."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from mlxpool.dev.controlplane import REPO_ROOT

pytestmark = pytest.mark.integration

AUTOSCALING = REPO_ROOT / "manifests" / "autoscaling"
TEST_LABEL = "mlxpool.dev/test-namespace"


def gauge(text: str, name: str, namespace: str, pool: str) -> float | None:
    pattern = rf'^{name}{{namespace="{namespace}",pool="{pool}"}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_pool_load_metrics_follow_the_agents(cluster, sim_agents, run_operator):
    sims = sim_agents(2, preload=("tiny",))
    pool = {"apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool", "metadata": {"name": "tiny"},
            "spec": {"models": [{"name": "tiny"}], "replicas": 2,
                     "nodeSelector": {"matchLabels": {TEST_LABEL: cluster.namespace}}}}
    cluster.apply(pool)
    operator = run_operator(cluster.namespace, "--scrape-interval", "0.5")
    cluster.eventually(lambda: cluster.status("ipool", "tiny").get("readyReplicas") == 2, 20, "ready", operator)
    a, b = sims.names
    sims.act(a, "usage", model="tiny", running=3, waiting=5, tokens=100)
    sims.act(b, "usage", model="tiny", running=0, waiting=2, tokens=0)

    ns = cluster.namespace
    text = cluster.eventually(
        lambda: (t := cluster.metrics(operator)) and gauge(t, "mlxpool_pool_queue_depth", ns, "tiny") == 7 and t,
        10, "queue depth 7", operator)
    assert gauge(text, "mlxpool_pool_requests_running", ns, "tiny") == 3
    assert gauge(text, "mlxpool_pool_utilization", ns, "tiny") == 0.5  # one of two endpoints busy
    assert gauge(text, "mlxpool_pool_scraped_endpoints", ns, "tiny") == 2

    sims.act(a, "usage", model="tiny", running=3, waiting=5, tokens=1100)  # 1000 more tokens
    cluster.eventually(lambda: (gauge(cluster.metrics(operator), "mlxpool_pool_generation_tokens_per_second",
                                      ns, "tiny") or 0) > 0, 10, "a token rate", operator)

    # Every metric the autoscaling manifests name is one the operator exports.
    exported = set(re.findall(r"^(mlxpool_pool_\w+)\{", text, re.MULTILINE))
    named = set(re.findall(r"mlxpool_pool_\w+", "".join(p.read_text() for p in AUTOSCALING.glob("*.yaml"))))
    named = {n for n in named if not n.endswith("_")}
    assert named and named <= exported, named - exported
    adapter = yaml.safe_load((AUTOSCALING / "prometheus-adapter-rules.yaml").read_text())
    series = re.compile(adapter["externalRules"][0]["seriesQuery"].split('"')[1])
    assert {n for n in exported if series.fullmatch(n)} >= {"mlxpool_pool_queue_depth", "mlxpool_pool_utilization"}


def test_the_hpa_targets_a_pool_through_its_scale_subresource(controlplane, namespace):
    (hpa,) = yaml.safe_load_all((AUTOSCALING / "hpa.yaml").read_text())
    hpa["metadata"]["namespace"] = namespace
    created = json.loads(controlplane.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-",
                                              input=json.dumps(hpa)).stdout)
    target = created["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("mlxpool.dev/v1alpha1", "InferencePool")

    (scaled,) = yaml.safe_load_all((AUTOSCALING / "keda-scaledobject.yaml").read_text())
    assert scaled["spec"]["scaleTargetRef"] == target | {"name": "tiny"}
    assert all(t["type"] == "prometheus" and "query" in t["metadata"] for t in scaled["spec"]["triggers"])
    rendered = controlplane.kubectl("kustomize", str(AUTOSCALING)).stdout
    assert {d["kind"] for d in yaml.safe_load_all(rendered)} == {"PodMonitor", "HorizontalPodAutoscaler"}
