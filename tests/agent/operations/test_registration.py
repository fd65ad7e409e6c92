"""The InferenceNode an agent registers follows its models: a load or unload shows in
`status.models` at once (not at the next heartbeat), against the real apiserver."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from mlxpool.dev import components
from mlxpool.dev.controlplane import ControlPlane

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def node_object(cp: ControlPlane, name: str) -> dict | None:
    out = cp.kubectl("get", "inferencenode", name, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def status_models(cp: ControlPlane, name: str) -> list[str] | None:
    node = node_object(cp, name)
    return None if node is None else sorted(m["name"] for m in node.get("status", {}).get("models", []))


def eventually(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not after {timeout}s")


def test_status_lists_models_as_they_load_and_unload(controlplane: ControlPlane, tiny_model: Path,
                                                      second_model: Path, ops_token_file: Path, ops, tmp_path):
    name = f"ops-reg-{uuid.uuid4().hex[:6]}"
    config = tmp_path / "runtime.yaml"
    config.write_text("multi_model:\n  max_models: 3\n")
    agent = components.start_agent(
        tiny_model, tmp_path / "logs", name="agent", kubeconfig=controlplane.kubeconfig("agent"), node_name=name,
        # A heartbeat far away: only the immediate write after a change can pass this test.
        extra=["--heartbeat-interval", "60", "--ops-token-file", str(ops_token_file),
               "--cache-dir", str(tmp_path / "cache"), "--config", str(config)],
    )
    try:
        eventually(lambda: status_models(controlplane, name) == ["tiny"], 20, "registered with tiny")
        assert node_object(controlplane, name)["spec"]["maxModels"] == 3
        client = ops(agent)
        client.post("/v1/node/models", json={"name": "second", "path": str(second_model)})
        eventually(lambda: status_models(controlplane, name) == ["second", "tiny"], 10, "status lists second")
        # Each with its content identity, the same the agent reports in /v1/node.
        identities = {m["name"]: m["identity"] for m in node_object(controlplane, name)["status"]["models"]}
        reported = {m["name"]: m["identity"] for m in client.get("/v1/node").json()["models"]}
        assert identities == reported and len(identities["tiny"]) == 32 and identities["tiny"] != identities["second"]
        # Where the weights are, as /v1/node measures it, to 2 significant figures (the apiserver
        # accepted the shape, so CRD schema and pydantic agree).
        from mlxpool.agent.operations.weights import two_figures

        where = {m["name"]: m["weights"] for m in node_object(controlplane, name)["status"]["models"]}
        measured = {m["name"]: m["weights"] for m in client.get("/v1/node").json()["models"]}
        for model in ("tiny", "second"):
            assert where[model]["totalBytes"] == two_figures(measured[model]["total_bytes"]) > 0
            assert 0 < where[model]["residentBytes"] <= where[model]["totalBytes"]
            assert where[model]["pinnedBytes"] == two_figures(measured[model]["pinned_bytes"])
            assert where[model]["mappedBytes"] == 0
        client.delete("/v1/node/models/second")
        eventually(lambda: status_models(controlplane, name) == ["tiny"], 10, "status drops second")
    finally:
        agent.stop(10)
        controlplane.kubectl("delete", "inferencenode", name, "--wait=false", check=False)
