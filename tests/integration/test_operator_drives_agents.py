"""The operator driving real agents through their operations API: agents start empty,
a pool names its model by source, the operator loads it on the chosen nodes, the router
serves it; a pool names a LoRA adapter of its base; a ModelCache is staged over HTTP onto
real agents and verified."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from functools import partial
from pathlib import Path

import httpx
import pytest
import yaml

from mlxpool.dev.controlplane import ControlPlane
from mlxpool.dev.processes import LOOPBACK, wait_for
from mlxpool.tinymodel import make_adapter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def visible_files(directory: Path) -> list[Path]:
    """The model's files as staging sees them: hidden ones (the content-identity cache an agent
    writes beside the files it loaded) are never staged."""
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))



@pytest.fixture
def ops_token(tmp_path: Path) -> Path:
    path = tmp_path / "ops-token"
    path.write_text("integration-ops-token")
    path.chmod(0o600)
    return path


@pytest.fixture
def model_server(tiny_model: Path):
    """A real HTTP server on loopback serving the tiny model's directory."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_model))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOOPBACK}:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _empty_agents(launched, controlplane, namespace, node_label, ops_token, n=2):
    return [
        launched.agent(None, name=f"agent-{i}", kubeconfig=controlplane.kubeconfig("agent"),
                       node_name=f"{namespace}-agent-{i}", labels=node_label, ops_token_file=ops_token)
        for i in range(n)
    ]


@pytest.mark.usefixtures("cleanup_nodes")
def test_operator_loads_pool_model_on_empty_agents(
    controlplane: ControlPlane, namespace: str, tiny_model: Path, launched, node_label, ops_token, routing_table
):
    launched.operator(kubeconfig=controlplane.kubeconfig("operator"), agent_token_file=ops_token,
                      extra=["--namespace", namespace])
    agents = _empty_agents(launched, controlplane, namespace, node_label, ops_token)
    router = launched.router(pool=f"{namespace}/pool", kubeconfig=controlplane.kubeconfig("router"))
    pool = {
        "apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "pool", "namespace": namespace},
        "spec": {"models": [{"name": "tiny", "source": f"file://{tiny_model}"}], "replicas": 2,
                 "nodeSelector": {"matchLabels": node_label}},
    }
    controlplane.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool))
    controlplane.kubectl("wait", "--for=condition=Ready", "inferencepool/pool", "-n", namespace, "--timeout=90s")

    # Each agent was told to load the model through its own ops API. Ready needs only one
    # healthy endpoint per model, so the second agent may still be warming: wait for it.
    headers = {"Authorization": f"Bearer {ops_token.read_text()}"}

    def phases(agent) -> list[tuple[str, str]]:
        report = httpx.get(f"{agent.url}/v1/node", headers=headers, timeout=10).json()
        return [(m["name"], m["phase"]) for m in report["models"]]

    for agent in agents:
        wait_for(lambda agent=agent: phases(agent) == [("tiny", "ready")], 20, f"tiny ready on {agent.url}")
    # Ready means every model has a healthy endpoint; the second one follows within a probe.
    wait_for(lambda: (t := routing_table(namespace, "pool")) is not None
             and sorted(e.url for e in t.endpoints_for("tiny")) == sorted(a.url for a in agents),
             10, "both agents in the routing table")

    def complete():
        r = httpx.post(f"{router.url}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 4})
        return r.json() if r.status_code == 200 else None

    assert wait_for(complete, 20, "a completion through the router")["usage"]["completion_tokens"] > 0

    # The agent that decoded writes its measured rate into its status: the operator's capacity weights read it.
    def measured_rates():
        rates = []
        for i in range(len(agents)):
            node = json.loads(controlplane.kubectl("get", "inferencenode", f"{namespace}-agent-{i}", "-o",
                                                   "json").stdout)
            rates += [m.get("decodeTokensPerSecond") for m in node.get("status", {}).get("models", [])]
        return [r for r in rates if r] or None

    assert all(r > 0 for r in wait_for(measured_rates, 20, "a decodeTokensPerSecond in a node's status"))

    # Scaling the pool down unloads the model the operator loaded on the node it left.
    controlplane.kubectl("scale", "inferencepool/pool", "-n", namespace, "--replicas=1")

    def loaded_counts():
        counts = [len(httpx.get(f"{a.url}/v1/node", headers=headers, timeout=10).json()["models"]) for a in agents]
        return sorted(counts) == [0, 1] and counts

    wait_for(loaded_counts, 30, "one agent to unload the model")


@pytest.mark.usefixtures("cleanup_nodes")
def test_a_pool_names_a_lora_adapter_and_the_operator_loads_it_over_its_base(
    controlplane: ControlPlane, namespace: str, tiny_model: Path, launched, node_label, ops_token, routing_table,
    tmp_path: Path,
):
    adapter = make_adapter(tiny_model, tmp_path / "a1", seed=1)
    launched.operator(kubeconfig=controlplane.kubeconfig("operator"), agent_token_file=ops_token,
                      extra=["--namespace", namespace])
    (agent,) = _empty_agents(launched, controlplane, namespace, node_label, ops_token, n=1)
    pool = {
        "apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "adapters", "namespace": namespace},
        "spec": {"models": [{"name": "tiny:a1", "source": f"file://{adapter}", "base": "tiny"},
                            {"name": "tiny", "source": f"file://{tiny_model}"}],
                 "replicas": 1, "nodeSelector": {"matchLabels": node_label}},
    }
    controlplane.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool))
    controlplane.kubectl("wait", "--for=condition=Ready", "inferencepool/adapters", "-n", namespace,
                         "--timeout=90s")
    headers = {"Authorization": f"Bearer {ops_token.read_text()}"}
    report = httpx.get(f"{agent.url}/v1/node", headers=headers, timeout=10).json()
    models = {m["name"]: m for m in report["models"]}
    assert models["tiny:a1"]["phase"] == "ready" and models["tiny:a1"]["base"] == "tiny"
    assert models["tiny:a1"]["memory_bytes"] < models["tiny"]["memory_bytes"] / 10  # the base is not copied
    table = wait_for(lambda: (t := routing_table(namespace, "adapters")) is not None
                     and t.endpoints_for("tiny:a1") and t, 10, "the adapter in the routing table")
    assert [e.url for e in table.endpoints_for("tiny:a1")] == [agent.url]
    outputs = [httpx.post(f"{agent.url}/v1/completions", timeout=60, json={
        "model": m, "prompt": "Hello there", "max_tokens": 4, "temperature": 0, "logprobs": 1}
    ).json()["choices"][0]["logprobs"] for m in ("tiny", "tiny:a1")]
    assert outputs[0] != outputs[1]  # the adapter answers, not the base under its name
    # The InferenceNode status says how long each model's switch into an engine took, and from where.
    def switches():
        body = json.loads(controlplane.kubectl("get", "inferencenode", f"{namespace}-agent-0", "-o", "json").stdout)
        seen = {m["name"]: (m.get("lastSwitchFrom"), m.get("lastSwitchSeconds")) for m in body["status"]["models"]}
        return seen if len(seen) == 2 and all(s for s, _ in seen.values()) else None

    seen = wait_for(switches, 20, "switch times in the InferenceNode status")
    assert all(where in ("page_cache", "disk") and seconds > 0 for where, seconds in seen.values()), seen


@pytest.mark.usefixtures("cleanup_nodes")
def test_a_restarted_operator_unloads_what_it_loaded_for_a_pool_deleted_meanwhile(
    controlplane: ControlPlane, namespace: str, tiny_model: Path, launched, node_label, ops_token
):
    """The unload decision is lost with the operator (the pool went while it was down, its
    finalizer removed): the agents still say who loaded what, and the new operator
    unloads its own orphan, never a model it did not load."""
    operator_args = {"kubeconfig": controlplane.kubeconfig("operator"), "agent_token_file": ops_token,
                     "extra": ["--namespace", namespace, "--orphan-grace-seconds", "1", "--report-interval", "0.5"]}
    operator = launched.operator(**operator_args)
    empty = _empty_agents(launched, controlplane, namespace, node_label, ops_token, n=1)[0]
    serving = launched.agent(tiny_model, name="agent-cli", kubeconfig=controlplane.kubeconfig("agent"),
                             node_name=f"{namespace}-agent-cli", labels=node_label, ops_token_file=ops_token)
    pool = {
        "apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "gone", "namespace": namespace},
        "spec": {"models": [{"name": "second", "source": f"file://{tiny_model}"}], "replicas": 1,
                 "nodeSelector": {"matchLabels": {**node_label, "role": "empty"}}},
    }
    controlplane.kubectl("label", "inferencenode", f"{namespace}-agent-0", "role=empty")
    controlplane.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool))
    controlplane.kubectl("wait", "--for=condition=Ready", "inferencepool/gone", "-n", namespace, "--timeout=90s")
    headers = {"Authorization": f"Bearer {ops_token.read_text()}"}

    def models(agent) -> dict[str, str | None]:
        report = httpx.get(f"{agent.url}/v1/node", headers=headers, timeout=10).json()
        return {m["name"]: m.get("owner") for m in report["models"]}

    owner = f"mlxpool-operator:{namespace}"
    assert models(empty) == {"second": owner}
    assert models(serving) == {"tiny": None}  # loaded by --model: nobody's to unload

    operator.stop()
    controlplane.kubectl("patch", "inferencepool", "gone", "-n", namespace, "--type=merge",
                         "-p", '{"metadata":{"finalizers":null}}')
    controlplane.kubectl("delete", "inferencepool", "gone", "-n", namespace, "--wait=true", "--timeout=30s")
    assert models(empty) == {"second": owner}  # nobody was there to unload it

    restarted = launched.operator(**operator_args)
    wait_for(lambda: models(empty) == {}, 30, "the orphan to be unloaded", restarted)
    assert models(serving) == {"tiny": None}
    assert "unloading orphans" in restarted.log_text()


@pytest.mark.usefixtures("cleanup_nodes")
def test_modelcache_stages_over_http_on_real_agents(
    controlplane: ControlPlane, namespace: str, tiny_model: Path, launched, node_label, ops_token, model_server
):
    launched.operator(kubeconfig=controlplane.kubeconfig("operator"), agent_token_file=ops_token,
                      extra=["--namespace", namespace])
    _empty_agents(launched, controlplane, namespace, node_label, ops_token)
    files = sorted(p.name for p in visible_files(tiny_model) if p.is_file())
    digests = {name: hashlib.sha256((tiny_model / name).read_bytes()).hexdigest() for name in files}
    cache = {
        "apiVersion": "mlxpool.dev/v1alpha1", "kind": "ModelCache",
        "metadata": {"name": "tiny", "namespace": namespace},
        "spec": {"source": model_server, "digests": digests, "warm": True,
                 "nodeSelector": {"matchLabels": node_label}},
    }
    controlplane.kubectl("apply", "-f", "-", input=yaml.safe_dump(cache))

    def phases():
        obj = json.loads(controlplane.kubectl("get", "modelcache", "tiny", "-n", namespace, "-o", "json").stdout)
        nodes = (obj.get("status") or {}).get("nodes") or []
        done = [n for n in nodes if n.get("phase") in ("Warm", "Cached", "Pinned")]
        return nodes if len(done) == 2 else None

    nodes = wait_for(phases, 60, "both nodes to hold a verified copy")
    total = sum((tiny_model / f).stat().st_size for f in files)
    assert all(n["phase"] == "Warm" and n.get("bytes") == total for n in nodes), nodes

    # A pool loads the model from the copy on one node: that node's entry says where its weights
    # are (the agent's InferenceNode models[].weights), the other's does not.
    pool = {"apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": "from-cache", "namespace": namespace},
            "spec": {"models": [{"name": "tiny"}], "replicas": 1, "nodeSelector": {"matchLabels": node_label}}}
    controlplane.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool))

    def residency():
        obj = json.loads(controlplane.kubectl("get", "modelcache", "tiny", "-n", namespace, "-o", "json").stdout)
        weights = [n["weights"] for n in obj["status"]["nodes"] if n.get("weights")]
        return (weights, obj["status"]) if weights else None

    (weights,), status = wait_for(residency, 60, "the loading node's residency in the ModelCache status")
    assert weights["models"] == ["tiny"] and weights["mappedBytes"] == 0, weights
    assert 0 < weights["residentBytes"] <= weights["totalBytes"] and weights["pinnedBytes"] <= weights["totalBytes"]
    assert status["resident"].endswith(" GiB")

    # A wrong digest is reported per node, naming the file.
    bad = dict(cache, metadata={"name": "bad", "namespace": namespace},
               spec=dict(cache["spec"], digests={**digests, "config.json": "0" * 64}))
    controlplane.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad))

    def failed():
        obj = json.loads(controlplane.kubectl("get", "modelcache", "bad", "-n", namespace, "-o", "json").stdout)
        nodes = (obj.get("status") or {}).get("nodes") or []
        return nodes if len(nodes) == 2 and all(n.get("phase") == "Failed" for n in nodes) else None

    for node in wait_for(failed, 60, "the bad digest to fail on both nodes"):
        assert "config.json" in node.get("message", "")
