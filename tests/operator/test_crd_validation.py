"""The CRDs as the real API server enforces them: samples, invalid specs, defaults,
printer columns, categories and the scale subresource."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mlxpool.dev.controlplane import REPO_ROOT, ControlPlane

pytestmark = pytest.mark.integration

SAMPLES = sorted((REPO_ROOT / "manifests" / "samples").glob("mlxpool_*.yaml"))


def pool(name: str = "p", **spec) -> dict:
    return {"apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool", "metadata": {"name": name},
            "spec": {"models": [{"name": "tiny"}], **spec}}


def cache(**spec) -> dict:
    return {"apiVersion": "mlxpool.dev/v1alpha1", "kind": "ModelCache", "metadata": {"name": "c"},
            "spec": {"source": "file:///models/tiny", **spec}}


def node(**spec) -> dict:
    hardware = {"chip": "c", "memoryBytes": 1, "cpuCores": 1, "accelerator": "cpu", "platform": "linux"}
    return {"apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferenceNode", "metadata": {"name": "invalid-node"},
            "spec": {"endpoint": "http://127.0.0.1:8100", "hardware": hardware, **spec}}


def dry_run_create(cp: ControlPlane, obj: dict, namespace: str, check: bool = True):
    return cp.kubectl("create", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-",
                      input=json.dumps(obj), check=check)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_sample_validates_against_its_crd(controlplane: ControlPlane, sample: Path):
    result = controlplane.kubectl("apply", "--dry-run=server", "-f", str(sample))
    assert "(server dry run)" in result.stdout


INVALID = [
    ("no-models", pool(models=[]), "spec.models in body should have at least 1 items"),
    ("duplicate-model", pool(models=[{"name": "a"}, {"name": "a"}]), 'spec.models[1]: Duplicate value: {"name":"a"}'),
    ("negative-replicas", pool(replicas=-1), "spec.replicas in body should be greater than or equal to 0"),
    ("above-max", pool(replicas=5, maxReplicas=3), "spec.replicas: Invalid value: \"object\": replicas must not exceed maxReplicas"),
    ("below-min", pool(replicas=1, minReplicas=2), "replicas must not be below minReplicas"),
    ("min-above-max", pool(replicas=3, minReplicas=4, maxReplicas=3), "minReplicas must not exceed maxReplicas"),
    ("unknown-strategy", pool(routing={"strategy": "random"}), 'spec.routing.strategy: Unsupported value: "random"'),
    ("bad-model-source", pool(models=[{"name": "a", "source": "s3://bucket/a"}]),
     "source must start with file://, http://, https:// or hf://"),
    ("in-without-values", pool(nodeSelector={"matchExpressions": [{"key": "a", "operator": "In"}]}),
     "values must be non-empty for In and NotIn"),
    ("unknown-priority", pool(scheduling={"tiers": [{"priority": "urgent"}]}),
     'spec.scheduling.tiers[0].priority: Unsupported value: "urgent"'),
    ("zero-interval", pool(healthCheck={"intervalSeconds": 0}),
     "spec.healthCheck.intervalSeconds in body should be greater than or equal to 1"),
    ("unknown-field", pool(replica=2), 'unknown field "spec.replica"'),
    ("cache-bad-source", cache(source="ftp://host/model"), "source must start with file://, http://, https:// or hf://"),
    ("cache-bad-digest", cache(digests={"model.safetensors": "abc"}), "should match '^[a-f0-9]{64}$'"),
    ("node-without-endpoint", {**node(), "spec": {"hardware": node()["spec"]["hardware"]}}, "spec.endpoint: Required value"),
    ("node-bad-endpoint", node(endpoint="127.0.0.1:8100"), "spec.endpoint in body should match"),
]


@pytest.mark.parametrize(("obj", "message"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_spec_is_rejected_with_a_readable_message(controlplane: ControlPlane, namespace: str, obj, message):
    result = dry_run_create(controlplane, obj, namespace, check=False)
    assert result.returncode != 0, f"accepted: {result.stdout[:300]}"
    assert message in result.stderr


def test_defaults_are_filled_in(controlplane: ControlPlane, namespace: str):
    created = json.loads(dry_run_create(controlplane, pool(), namespace).stdout)
    assert created["spec"] == {"models": [{"name": "tiny"}], "replicas": 1,
                               "routing": {"strategy": "round-robin"}, "healthCheck": {"intervalSeconds": 1}}
    cached = json.loads(dry_run_create(controlplane, cache(), namespace).stdout)
    assert (cached["spec"]["warm"], cached["spec"]["pin"]) == (False, False)
    registered = json.loads(dry_run_create(controlplane, node(), namespace).stdout)
    assert registered["spec"]["maxModels"] == 1


def test_status_is_a_subresource(controlplane: ControlPlane, namespace: str):
    with_status = {**pool("s"), "status": {"readyReplicas": 5}}
    controlplane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(with_status))
    stored = json.loads(controlplane.kubectl("get", "ipool", "s", "-n", namespace, "-o", "json").stdout)
    assert "status" not in stored  # status written with the object is dropped


def test_scale_subresource(controlplane: ControlPlane, namespace: str):
    controlplane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pool("scaled", maxReplicas=4)))
    controlplane.kubectl("scale", "ipool", "scaled", "-n", namespace, "--replicas=3")
    spec = json.loads(controlplane.kubectl("get", "ipool", "scaled", "-n", namespace, "-o", "json").stdout)["spec"]
    assert spec["replicas"] == 3

    # Autoscalers stay within the pool's bounds: the CEL rule applies to scale writes too.
    refused = controlplane.kubectl("scale", "ipool", "scaled", "-n", namespace, "--replicas=9", check=False)
    assert refused.returncode != 0 and "replicas must not exceed maxReplicas" in refused.stderr

    # The scale subresource reads status.replicas and status.selector (written by the operator).
    status = {"status": {"replicas": 2, "selector": "mlxpool.dev/pool=scaled"}}
    controlplane.kubectl("patch", "ipool", "scaled", "-n", namespace, "--subresource=status", "--type=merge",
                         "-p", json.dumps(status))
    scale = json.loads(controlplane.kubectl(
        "get", "--raw", f"/apis/mlxpool.dev/v1alpha1/namespaces/{namespace}/inferencepools/scaled/scale").stdout)
    assert scale["kind"] == "Scale"
    assert scale["spec"] == {"replicas": 3}
    assert scale["status"] == {"replicas": 2, "selector": "mlxpool.dev/pool=scaled"}


def test_printer_columns_short_names_and_category(controlplane: ControlPlane, namespace: str):
    controlplane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pool("shown", replicas=2)))
    controlplane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(cache(warm=True)))
    header, row = controlplane.kubectl("get", "ipool", "-n", namespace).stdout.splitlines()
    assert header.split() == ["NAME", "READY", "DESIRED", "MODELS", "STRATEGY", "STATUS", "AGE"]
    assert row.split()[:4] == ["shown", "2", "tiny", "round-robin"]  # no status yet: READY, STATUS blank
    wide = controlplane.kubectl("get", "ipool", "-n", namespace, "-o", "wide").stdout.splitlines()[0]
    assert "REVISION" in wide.split()
    header = controlplane.kubectl("get", "mcache", "-n", namespace).stdout.splitlines()[0]
    assert header.split() == ["NAME", "MODEL", "SOURCE", "WARM", "PIN", "STATUS", "AGE"]
    listed = controlplane.kubectl("get", "mlxpool", "-n", namespace, "-o", "name").stdout.split()
    assert {"inferencepool.mlxpool.dev/shown", "modelcache.mlxpool.dev/c"} <= set(listed)
    header = controlplane.kubectl("get", "inode").stdout.splitlines()
    if header:  # other tests' nodes may or may not exist: check the columns only
        assert header[0].split() == ["NAME", "ENDPOINT", "CHIP", "MEMORY", "MODELS", "READY", "HEARTBEAT", "AGE"]


def test_samples_kustomization_builds(controlplane: ControlPlane):
    rendered = list(yaml.safe_load_all(controlplane.kubectl(
        "kustomize", str(REPO_ROOT / "manifests" / "samples")).stdout))
    assert {d["kind"] for d in rendered} == {"InferencePool", "ModelCache"}
