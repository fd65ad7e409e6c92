"""A pool's `spec.scheduling` reaches its agents: through the real apiserver, the real
operator and a real agent's operations API, and changes apply to the next request."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mlxpool.dev.controlplane import ControlPlane
from mlxpool.dev.processes import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
def ops_token(tmp_path: Path) -> Path:
    path = tmp_path / "ops-token"
    path.write_text("integration-ops-token")
    path.chmod(0o600)
    return path


def requests_by_tier(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "mlxpool_requests_total":
                counts[s.labels["priority"]] = counts.get(s.labels["priority"], 0) + s.value
    return counts


@pytest.mark.usefixtures("cleanup_nodes")
def test_pool_scheduling_is_applied_by_its_agents_and_follows_the_spec(
    controlplane: ControlPlane, namespace: str, tiny_model: Path, launched, node_label, ops_token
):
    launched.operator(kubeconfig=controlplane.kubeconfig("operator"), agent_token_file=ops_token,
                      extra=["--namespace", namespace, "--report-interval", "0.5"])
    agent = launched.agent(None, name="agent-0", kubeconfig=controlplane.kubeconfig("agent"),
                           node_name=f"{namespace}-agent-0", labels=node_label, ops_token_file=ops_token)
    pool = {
        "apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "tiers", "namespace": namespace},
        "spec": {"models": [{"name": "tiny", "source": f"file://{tiny_model}"}], "replicas": 1,
                 "nodeSelector": {"matchLabels": node_label},
                 "scheduling": {"defaultPriority": "high", "tiers": [
                     {"priority": "critical", "ttftTargetMs": 750, "preempt": True},
                     {"priority": "low", "maxQueueDepth": 3, "deadlineSeconds": 20, "sheddable": False}]}},
    }
    controlplane.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool))
    controlplane.kubectl("wait", "--for=condition=Ready", "inferencepool/tiers", "-n", namespace, "--timeout=90s")
    headers = {"Authorization": f"Bearer {ops_token.read_text()}"}

    def applied() -> dict | None:
        return httpx.get(f"{agent.url}/v1/node", headers=headers, timeout=10).json()["scheduling"].get("tiny")

    policy = wait_for(lambda: applied(), 30, "the pool's policy on the agent")
    assert policy["default_priority"] == "high"
    assert {t["priority"]: t for t in policy["tiers"]} == {
        "critical": {"priority": "critical", "ttft_target_ms": 750.0, "deadline_seconds": None,
                     "max_queue_depth": None, "preempt": True, "sheddable": None},
        "low": {"priority": "low", "ttft_target_ms": None, "deadline_seconds": 20.0, "max_queue_depth": 3,
                "preempt": None, "sheddable": False},
    }

    # The policy is in force: a request naming no tier is served as the pool's default tier.
    r = httpx.post(f"{agent.url}/v1/completions", timeout=60, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert requests_by_tier(agent.url) == {"high": 1}

    # A change of the spec (kubectl, GitOps) reaches the agent at the operator's next pass.
    controlplane.kubectl("patch", "inferencepool", "tiers", "-n", namespace, "--type=merge",
                         "-p", json.dumps({"spec": {"scheduling": {"defaultPriority": "background", "tiers": []}}}))
    wait_for(lambda: (p := applied()) is not None and p["default_priority"] == "background" and p["tiers"] == [],
             30, "the changed policy on the agent")
    r = httpx.post(f"{agent.url}/v1/completions", timeout=60, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert requests_by_tier(agent.url) == {"high": 1, "background": 1}

    # An unknown tier never gets that far: the CRD refuses it, naming the allowed values.
    bad = controlplane.kubectl("patch", "inferencepool", "tiers", "-n", namespace, "--type=merge", "-p",
                               json.dumps({"spec": {"scheduling": {"tiers": [{"priority": "urgent"}]}}}), check=False)
    assert bad.returncode != 0
    assert "urgent" in bad.stderr and "critical" in bad.stderr
