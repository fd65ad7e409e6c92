"""The foundation end to end: `kubectl apply` a sample pool, get completions through the
router from real agents, and see an agent's death leave the routing table."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from mlxpool.dev.controlplane import REPO_ROOT, ControlPlane
from mlxpool.dev.processes import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def sample_pool(namespace: str, selector: dict[str, str]) -> dict:
    """The InferencePool of manifests/samples, moved into the test's namespace and nodes."""
    for path in sorted((REPO_ROOT / "manifests" / "samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "InferencePool":
                doc["metadata"]["namespace"] = namespace
                doc["spec"]["nodeSelector"] = {"matchLabels": selector}
                return doc
    raise AssertionError("manifests/samples has no InferencePool")


@pytest.mark.usefixtures("cleanup_nodes")
def test_apply_sample_pool_and_complete_through_router(
    controlplane: ControlPlane, namespace: str, tiny_model: Path, launched, node_label, routing_table
):
    pool = sample_pool(namespace, node_label)
    name, model = pool["metadata"]["name"], pool["spec"]["models"][0]["name"]
    assert model == tiny_model.name, "the sample pool serves the tiny model"
    pool["spec"]["replicas"] = 2

    launched.operator(kubeconfig=controlplane.kubeconfig("operator"), extra=["--namespace", namespace])
    agents = [
        launched.agent(tiny_model, name=f"agent-{i}", kubeconfig=controlplane.kubeconfig("agent"),
                       node_name=f"{namespace}-agent-{i}", labels=node_label)
        for i in range(2)
    ]
    router = launched.router(pool=f"{namespace}/{name}", kubeconfig=controlplane.kubeconfig("router"))

    controlplane.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool))
    controlplane.kubectl("wait", "--for=condition=Ready", f"inferencepool/{name}", "-n", namespace,
                         "--timeout=60s")
    pool = controlplane.kubectl("get", "inferencepool", name, "-n", namespace, "-o", "json").stdout
    status = json.loads(pool)["status"]
    assert status["readyReplicas"] == 2
    assert sorted(e["url"] for e in status["endpoints"]) == sorted(a.url for a in agents)

    table = wait_for(lambda: routing_table(namespace, name), 10, "routing table")
    assert sorted(e.url for e in table.endpoints_for(model)) == sorted(a.url for a in agents)

    # Completions through the router, plain and streamed, answered by real agents.
    def complete() -> dict:
        r = httpx.post(f"{router.url}/v1/completions", timeout=60,
                       json={"model": model, "prompt": "Hello", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    first = wait_for(lambda: _try(complete), 20, "a completion through the router")
    assert first["choices"][0]["text"] and first["usage"]["completion_tokens"] > 0
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True,
    }) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3

    # Kill one agent: the routing table drops it, and requests keep succeeding.
    agents[0].popen.kill()
    agents[0].popen.wait()
    wait_for(lambda: (t := routing_table(namespace, name)) is not None
               and [e.url for e in t.endpoints_for(model)] == [agents[1].url], 10, "the dead agent to leave the table")
    for _ in range(4):
        assert complete()["choices"][0]["text"]


def _try(fn):
    try:
        return fn()
    except (AssertionError, httpx.HTTPError):
        return None
