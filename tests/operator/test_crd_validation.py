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


SHA = "ab" * 32

INVALID = [
    # InferencePool
    ("no-models", pool(models=[]), "spec.models in body should have at least 1 items"),
    ("too-many-models", pool(models=[{"name": f"m{i}"} for i in range(17)]),
     "spec.models: Too many: 17: must have at most 16 items"),
    ("duplicate-model", pool(models=[{"name": "a"}, {"name": "a"}]), 'spec.models[1]: Duplicate value: {"name":"a"}'),
    ("model-name-with-space", pool(models=[{"name": "my model"}]), "spec.models[0].name in body should match"),
    ("negative-replicas", pool(replicas=-1), "spec.replicas in body should be greater than or equal to 0"),
    ("huge-replicas", pool(replicas=5000), "spec.replicas in body should be less than or equal to 1000"),
    ("above-max", pool(replicas=5, maxReplicas=3),
     "spec.replicas: Invalid value: \"object\": replicas must not exceed maxReplicas"),
    ("below-min", pool(replicas=1, minReplicas=2), "replicas must not be below minReplicas"),
    ("min-above-max", pool(replicas=3, minReplicas=4, maxReplicas=3), "minReplicas must not exceed maxReplicas"),
    ("zero-max", pool(replicas=0, maxReplicas=0), "spec.maxReplicas in body should be greater than or equal to 1"),
    ("unknown-strategy", pool(routing={"strategy": "random"}), 'spec.routing.strategy: Unsupported value: "random"'),
    ("bad-model-source", pool(models=[{"name": "a", "source": "s3://bucket/a"}]),
     "source must start with file://, http://, https:// or hf://"),
    ("bad-hf-source", pool(models=[{"name": "a", "source": "hf://just-a-name"}]),
     "an hf:// source is hf://ORG/REPO or hf://ORG/REPO@REVISION"),
    ("adapter-of-nothing", pool(models=[{"name": "tiny"}, {"name": "tiny:a1", "base": "other"}]),
     "models[].base must name another model of this pool that is not itself an adapter"),
    ("adapter-of-an-adapter", pool(models=[{"name": "tiny"}, {"name": "a1", "base": "tiny"},
                                           {"name": "a2", "base": "a1"}]),
     "models[].base must name another model of this pool that is not itself an adapter"),
    ("adapter-of-itself", pool(models=[{"name": "a1", "base": "a1"}]),
     "models[].base must name another model of this pool that is not itself an adapter"),
    ("in-without-values", pool(nodeSelector={"matchExpressions": [{"key": "a", "operator": "In"}]}),
     "values must be non-empty for In and NotIn"),
    ("exists-with-values", pool(nodeSelector={"matchExpressions": [{"key": "a", "operator": "Exists",
                                                                    "values": ["x"]}]}),
     "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist"),
    ("unknown-selector-operator", pool(nodeSelector={"matchExpressions": [{"key": "a", "operator": "Gt",
                                                                           "values": ["1"]}]}),
     'spec.nodeSelector.matchExpressions[0].operator: Unsupported value: "Gt"'),
    ("unknown-priority", pool(scheduling={"tiers": [{"priority": "urgent"}]}),
     'spec.scheduling.tiers[0].priority: Unsupported value: "urgent"'),
    ("zero-deadline", pool(scheduling={"tiers": [{"priority": "high", "deadlineSeconds": 0}]}),
     "spec.scheduling.tiers[0].deadlineSeconds in body should be greater than 0"),
    ("duplicate-tier", pool(scheduling={"tiers": [{"priority": "high"}, {"priority": "high"}]}),
     'spec.scheduling.tiers[1]: Duplicate value: {"priority":"high"}'),
    ("zero-interval", pool(healthCheck={"intervalSeconds": 0}),
     "spec.healthCheck.intervalSeconds in body should be greater than or equal to 1"),
    ("slow-interval", pool(healthCheck={"intervalSeconds": 301}),
     "spec.healthCheck.intervalSeconds in body should be less than or equal to 300"),
    ("unknown-field", pool(replica=2), 'unknown field "spec.replica"'),
    # ModelCache
    ("cache-no-source", {**cache(), "spec": {"warm": True}}, "spec.source: Required value"),
    ("cache-bad-source", cache(source="ftp://host/model"), "source must start with file://, http://, https:// or hf://"),
    ("cache-short-digest", cache(digests={"model.safetensors": "abc"}),
     "a digest without an algorithm is sha256 and has exactly 64 hex digits"),
    ("cache-digest-wrong-length-for-algorithm", cache(digests={"model.safetensors": f"sha256:{SHA[:40]}"}),
     "a sha256 digest has exactly 64 hex digits after 'sha256:'"),
    ("cache-unknown-digest-algorithm", cache(digests={"model.safetensors": f"md5:{SHA[:32]}"}),
     "a digest is sha256:<lowercase hex> or the lowercase hex alone"),
    ("cache-uppercase-digest", cache(digests={"model.safetensors": SHA.upper()}),
     "a digest is sha256:<lowercase hex> or the lowercase hex alone"),
    ("cache-revision-on-a-file-source", cache(revision="main"),
     "revision applies to hf:// sources only"),
    ("cache-revision-twice", cache(source="hf://org/repo@v1", revision="v2"),
     "set the revision either in the source (hf://ORG/REPO@REVISION) or in spec.revision, not both"),
    ("cache-bad-node-selector", cache(nodeSelector={"matchExpressions": [{"key": "a", "operator": "NotIn"}]}),
     "values must be non-empty for In and NotIn"),
    # InferenceNode
    ("node-without-endpoint", {**node(), "spec": {"hardware": node()["spec"]["hardware"]}},
     "spec.endpoint: Required value"),
    ("node-bad-endpoint", node(endpoint="127.0.0.1:8100"), "spec.endpoint in body should match"),
    ("node-zero-max-models", node(maxModels=0), "spec.maxModels in body should be greater than or equal to 1"),
]


def test_the_invalid_table_is_long_enough():
    assert len(INVALID) >= 20


@pytest.mark.parametrize(("obj", "message"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_spec_is_rejected_with_a_readable_message(controlplane: ControlPlane, namespace: str, obj, message):
    result = dry_run_create(controlplane, obj, namespace, check=False)
    assert result.returncode != 0, f"accepted: {result.stdout[:300]}"
    assert message in result.stderr


@pytest.mark.parametrize("obj", [
    cache(digests={"a": SHA, "b": f"sha256:{SHA}"}),
    cache(source="hf://org/repo", revision="0123abc"),
    cache(source="hf://org/repo@main"),
    cache(source="https://models.example.com/tiny", digests={"model.safetensors": SHA}),
    pool(models=[{"name": "org/model:q4@v1", "source": "hf://org/model@v1"}], replicas=0, minReplicas=0,
         maxReplicas=1000),
    pool(models=[{"name": "tiny", "source": "file:///m/tiny"},
                 {"name": "tiny:a1", "source": "file:///m/a1", "base": "tiny"}, {"name": "tiny:a2", "base": "tiny"}]),
], ids=["both-digest-forms", "hf-revision", "hf-at-revision", "https", "edge-pool", "adapters"])
def test_valid_edge_cases_are_accepted(controlplane: ControlPlane, namespace: str, obj):
    dry_run_create(controlplane, obj, namespace)


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
    assert header.split() == ["NAME", "READY", "MODELS", "STRATEGY", "STATUS", "AGE"]
    assert row.split()[:3] == ["shown", "tiny", "round-robin"]  # no status yet: READY, STATUS blank
    wide = controlplane.kubectl("get", "ipool", "-n", namespace, "-o", "wide").stdout.splitlines()[0]
    assert {"DESIRED", "REVISION"} <= set(wide.split())
    header = controlplane.kubectl("get", "mcache", "-n", namespace).stdout.splitlines()[0]
    assert header.split() == ["NAME", "MODEL", "SOURCE", "READY", "WARM", "PIN", "STATUS", "RESIDENT", "AGE"]
    listed = controlplane.kubectl("get", "mlxpool", "-n", namespace, "-o", "name").stdout.split()
    assert {"inferencepool.mlxpool.dev/shown", "modelcache.mlxpool.dev/c"} <= set(listed)
    header = controlplane.kubectl("get", "inode").stdout.splitlines()
    if header:  # other tests' nodes may or may not exist: check the columns only
        assert header[0].split() == ["NAME", "ENDPOINT", "CHIP", "MEMORY", "MODELS", "READY", "REPORTED", "AGE"]


def test_samples_kustomization_builds(controlplane: ControlPlane):
    rendered = list(yaml.safe_load_all(controlplane.kubectl(
        "kustomize", str(REPO_ROOT / "manifests" / "samples")).stdout))
    assert {d["kind"] for d in rendered} == {"InferencePool", "ModelCache"}
