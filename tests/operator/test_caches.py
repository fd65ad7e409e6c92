"""ModelCaches end to end: a real operator stages copies through simulated agents
(`bench.simagents`: they read file:// sources and download http:// ones for real and
check sha256 digests; hf:// is simulated there), reports per-node progress, warms,
serves pools from the copy, and removes the copies on deletion."""

from __future__ import annotations

import hashlib
import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mlxpool.dev.processes import LOOPBACK

pytestmark = pytest.mark.integration

TEST_LABEL = "mlxpool.dev/test-namespace"
FAST = ("--report-interval", "1", "--node-stale-seconds", "3", "--resync-interval", "2")
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\x00" * 4096}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models" / "tiny"
    root.mkdir(parents=True)
    for name, data in FILES.items():
        (root / name).write_bytes(data)
    return root


def digests(**override: str) -> dict[str, str]:
    """Both forms the CRD accepts: `sha256:<hex>` and the bare hex."""
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}
    return {"config.json": sums["config.json"], "model.safetensors": f"sha256:{sums['model.safetensors']}",
            **override}


def cache(namespace: str, source: str, name: str = "tiny", **spec) -> dict:
    return {"apiVersion": "mlxpool.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": name},
            "spec": {"model": "tiny", "source": source, "nodeSelector": {"matchLabels": {TEST_LABEL: namespace}},
                     **spec}}


def phases(cluster, name: str = "tiny") -> dict[str, str]:
    return {n["node"]: n["phase"] for n in cluster.status("mcache", name).get("nodes", [])}


def all_in(cluster, names, phase: str, name: str = "tiny") -> bool:
    return phases(cluster, name) == dict.fromkeys(names, phase)


def test_a_cache_is_staged_verified_warmed_served_and_removed(cluster, sim_agents, run_operator, model_dir):
    sims = sim_agents(2, stage_seconds=0.6)
    cluster.apply(cache(cluster.namespace, model_dir.as_uri(), digests=digests()))
    operator = run_operator(cluster.namespace, *FAST)

    cluster.eventually(lambda: all_in(cluster, sims.names, "Cached"), 20, "cached on both nodes", operator)
    status = cluster.status("mcache", "tiny")
    for node in status["nodes"]:
        assert node["progress"] == 100 and node["bytes"] == sum(map(len, FILES.values()))
    assert status["readySummary"] == "2/2" and status["cacheKey"].startswith(f"{cluster.namespace}.tiny.")
    assert cluster.conditions("mcache", "tiny") == {"Ready": ("True", "Staged"), "Progressing": ("False", "Complete"),
                                                    "Degraded": ("False", "NoFailures")}
    assert sims.calls("stage") == dict.fromkeys(sims.names, 1)
    assert "Staged" in [r for r, _ in cluster.events("ModelCache")]
    row = cluster.cp.kubectl("get", "mcache", "-n", cluster.namespace).stdout.splitlines()[1].split()
    assert row[3] == "2/2" and row[6] == "True"

    # Warm it in place: the agents are asked again, the same copy becomes Warm.
    cluster.cp.kubectl("patch", "mcache", "tiny", "-n", cluster.namespace, "--type=merge", "-p",
                       '{"spec": {"warm": true}}')
    cluster.eventually(lambda: all_in(cluster, sims.names, "Warm"), 20, "warm on both nodes", operator)
    assert sims.calls("stage") == dict.fromkeys(sims.names, 2)
    assert cluster.status("mcache", "tiny")["cacheKey"] == status["cacheKey"]

    # A pool serving the cache's model loads it from the copy.
    pool = {"apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool", "metadata": {"name": "p"},
            "spec": {"models": [{"name": "tiny"}], "replicas": 2,
                     "nodeSelector": {"matchLabels": {TEST_LABEL: cluster.namespace}}}}
    cluster.apply(pool)
    cluster.eventually(lambda: cluster.status("ipool", "p").get("readyReplicas") == 2, 20, "pool ready", operator)
    assert sorted(cluster.routed("p", "tiny")) == sorted(sims.names)

    # Deleting the cache while the pool uses the copy waits (the agents refuse); the pool goes, then the cache.
    cluster.cp.kubectl("delete", "mcache", "tiny", "-n", cluster.namespace, "--wait=false")
    cluster.eventually(lambda: "CacheRemovalPending" in [r for r, _ in cluster.events("ModelCache")], 15,
                       "removal refused while in use", operator)
    assert cluster.exists("mcache", "tiny")
    cluster.cp.kubectl("delete", "ipool", "p", "-n", cluster.namespace, "--wait=false")
    cluster.eventually(lambda: not cluster.exists("mcache", "tiny"), 20, "cache deleted", operator)
    assert all(not a["cache"] and not a["models"] for a in sims.state().values())


def test_a_digest_mismatch_fails_naming_the_file(cluster, sim_agents, run_operator, model_dir):
    sims = sim_agents(1)
    wrong = digests(**{"model.safetensors": "0" * 64})
    cluster.apply(cache(cluster.namespace, model_dir.as_uri(), digests=wrong))
    operator = run_operator(cluster.namespace, *FAST)
    cluster.eventually(lambda: all_in(cluster, sims.names, "Failed"), 20, "failed", operator)
    (node,) = cluster.status("mcache", "tiny")["nodes"]
    assert node["message"] == "model.safetensors: sha256 mismatch"
    conditions = cluster.conditions("mcache", "tiny")
    assert conditions["Ready"][0] == "False" and conditions["Degraded"] == ("True", "StagingFailed")
    assert "StagingFailed" in [r for r, _ in cluster.events("ModelCache")]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture
def http_models(model_dir: Path):
    """A real HTTP server on 127.0.0.1 serving the model directory's parent."""
    server = ThreadingHTTPServer((LOOPBACK, 0), partial(_QuietHandler, directory=str(model_dir.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOOPBACK}:{server.server_address[1]}/tiny"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_http_and_hf_sources_are_staged(cluster, sim_agents, run_operator, http_models):
    sims = sim_agents(1)
    cluster.apply(cache(cluster.namespace, http_models, digests=digests()))
    cluster.apply(cache(cluster.namespace, "hf://mlxpool/tiny-llama", name="hub", revision="main", model="hub"))
    operator = run_operator(cluster.namespace, *FAST)
    cluster.eventually(lambda: all_in(cluster, sims.names, "Cached"), 20, "http copy cached", operator)
    assert cluster.status("mcache", "tiny")["nodes"][0]["bytes"] == sum(map(len, FILES.values()))
    cluster.eventually(lambda: all_in(cluster, sims.names, "Cached", name="hub"), 20, "hf copy cached", operator)


def test_deleting_a_cache_never_hangs_on_a_dead_agent_and_follows_its_selector(
        cluster, sim_agents, run_operator, model_dir):
    zone_a = sim_agents(1, prefix="a", labels={"zone": "a"})
    zone_b = sim_agents(2, prefix="b", labels={"zone": "b"})
    (a,), (b1, b2) = zone_a.names, zone_b.names
    cluster.apply(cache(cluster.namespace, model_dir.as_uri()))
    operator = run_operator(cluster.namespace, *FAST)
    cluster.eventually(lambda: all_in(cluster, [a, b1, b2], "Cached"), 20, "cached everywhere", operator)

    # The selector narrows to zone b: the copy leaves a.
    selector = {"matchLabels": {TEST_LABEL: cluster.namespace, "zone": "b"}}
    cluster.cp.kubectl("patch", "mcache", "tiny", "-n", cluster.namespace, "--type=merge", "-p",
                       json.dumps({"spec": {"nodeSelector": selector}}))
    cluster.eventually(lambda: all_in(cluster, [b1, b2], "Cached"), 20, "only zone b listed", operator)
    cluster.eventually(lambda: zone_a.state()[a]["cache"] == {}, 10, "copy removed from a", operator)

    # One agent of zone b dies for good; deleting the cache still finishes.
    zone_b.kill(b1)
    cluster.cp.kubectl("delete", "mcache", "tiny", "-n", cluster.namespace, "--wait=false")
    cluster.eventually(lambda: not cluster.exists("mcache", "tiny"), 20, "cache deleted", operator)
    assert zone_b.state()[b2]["cache"] == {} and zone_b.calls("cache_delete")[b2] == 1
