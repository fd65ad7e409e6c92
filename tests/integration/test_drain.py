"""An agent told to stop (SIGTERM) drains: it deregisters at once, so the routing table
drops it while its in-flight streams still run, the router keeps answering from the
other node, the streams finish whole, and the agent exits 0."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from mlxpool.dev.controlplane import ControlPlane
from mlxpool.dev.processes import wait_for
from mlxpool.dev.scraping import metric_total

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

LONG_TOKENS = 1900


def pool_spec(namespace: str, model: str, selector: dict[str, str]) -> dict:
    return {
        "apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "drain", "namespace": namespace},
        "spec": {"replicas": 2, "models": [{"name": model}], "nodeSelector": {"matchLabels": selector}},
    }


def node_ready(controlplane: ControlPlane, name: str) -> bool | None:
    out = controlplane.kubectl("get", "inferencenode", name, "-o", "json", check=False)
    return json.loads(out.stdout).get("status", {}).get("ready") if out.returncode == 0 else None


@pytest.mark.usefixtures("cleanup_nodes")
def test_sigterm_deregisters_at_once_and_finishes_in_flight_streams(
    controlplane: ControlPlane, namespace: str, tiny_model: Path, launched, node_label, routing_table
):
    model = tiny_model.name
    launched.operator(kubeconfig=controlplane.kubeconfig("operator"), extra=["--namespace", namespace])
    # One sequence at a time on the agent that will drain: its three long streams run one
    # after another, so the drain lasts several seconds.
    agents = [
        launched.agent(tiny_model, name=f"agent-{i}", kubeconfig=controlplane.kubeconfig("agent"),
                       node_name=f"{namespace}-agent-{i}", labels=node_label,
                       extra=["--drain-timeout", "120"] + (["--decode-concurrency", "1"] if i == 0 else []))
        for i in range(2)
    ]
    router = launched.router(pool=f"{namespace}/drain", kubeconfig=controlplane.kubeconfig("router"))
    controlplane.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool_spec(namespace, model, node_label)))
    urls = sorted(a.url for a in agents)
    wait_for(lambda: (t := routing_table(namespace, "drain")) is not None
             and sorted(e.url for e in t.endpoints_for(model)) == urls, 60, "both agents routed")

    draining, other = agents
    streams: list[dict] = [{} for _ in range(3)]

    def stream(record: dict) -> None:
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": LONG_TOKENS, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{draining.url}/v1/completions", json=body, timeout=120) as r:
            record["status"] = r.status_code
            record["payloads"] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        record["ended"] = time.monotonic()

    readers = [threading.Thread(target=stream, args=(s,)) for s in streams]
    for reader in readers:
        reader.start()
    accepted = ("mlxpool_requests_running", "mlxpool_requests_waiting")  # sequences in the engine
    wait_for(lambda: metric_total(draining.url, *accepted) == len(streams), 20, "the streams accepted")
    os.kill(draining.pid, signal.SIGTERM)

    # Deregistered at once: not ready in the cluster, then out of the routing table.
    wait_for(lambda: node_ready(controlplane, f"{namespace}-agent-0") is False, 10, "the InferenceNode not ready")
    wait_for(lambda: [e.url for e in routing_table(namespace, "drain").endpoints_for(model)] == [other.url],
             10, "the draining agent to leave the routing table")
    dropped = time.monotonic()
    assert draining.alive(), "the agent is still draining its streams"

    for _ in range(3):  # the router answers from the other node
        r = httpx.post(f"{router.url}/v1/completions", timeout=60,
                       json={"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text

    for reader in readers:
        reader.join(120)
    assert draining.popen.wait(60) == 0
    for record in streams:  # every accepted stream ended whole
        assert record["status"] == 200
        assert record["payloads"][-1] == "[DONE]"
        assert json.loads(record["payloads"][-2])["usage"]["completion_tokens"] == LONG_TOKENS
    assert max(s["ended"] for s in streams) > dropped, "the table changed while streams were still running"

