"""The CRDs agree with the code that reads and writes them (YAML only, no apiserver).

A field renamed in `mlxpool/nodes.py` but not in the CRD would be pruned silently by
the API server; an enum that drifts from `Priority` or the strategies would reject
valid pools. These tests catch both before any cluster does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from mlxpool.dev.controlplane import REPO_ROOT
from mlxpool.nodes import Hardware, LoadedModel, NodeSpec, NodeStatus
from mlxpool.operator.logic.specs import STRATEGIES, PoolSpec
from mlxpool.priorities import Priority
from mlxpool.resources import CACHE_PLURAL, GROUP, NODE_PLURAL, POOL_PLURAL, VERSION

CRDS = REPO_ROOT / "crds"
SAMPLES = REPO_ROOT / "manifests" / "samples"


def crd(plural: str) -> dict:
    return yaml.safe_load((CRDS / f"{GROUP}_{plural}.yaml").read_text())


def schema(plural: str) -> dict:
    versions = crd(plural)["spec"]["versions"]
    (version,) = [v for v in versions if v["name"] == VERSION]
    return version["schema"]["openAPIV3Schema"]


def wire_names(model: type[BaseModel], computed: bool = True) -> set[str]:
    """The keys `model` writes: its fields and (unless not `computed`) its human copies."""
    names = {field.alias or name for name, field in model.model_fields.items()}
    if computed:
        names |= {field.alias or name for name, field in model.model_computed_fields.items()}
    return names


def test_every_kind_has_one_file_named_like_kubebuilder():
    assert sorted(p.name for p in CRDS.glob("*.yaml")) == sorted(
        f"{GROUP}_{p}.yaml" for p in (CACHE_PLURAL, POOL_PLURAL, NODE_PLURAL))


@pytest.mark.parametrize(("plural", "short", "scope"), [
    (POOL_PLURAL, "ipool", "Namespaced"), (CACHE_PLURAL, "mcache", "Namespaced"), (NODE_PLURAL, "inode", "Cluster"),
])
def test_names_scope_and_status_subresource(plural, short, scope):
    spec = crd(plural)["spec"]
    assert spec["group"] == GROUP and spec["names"]["plural"] == plural and spec["scope"] == scope
    assert spec["names"]["shortNames"] == [short] and spec["names"]["categories"] == ["mlxpool"]
    (version,) = spec["versions"]
    assert version["served"] and version["storage"] and "status" in version["subresources"]
    assert version["additionalPrinterColumns"][-1]["name"] == "Age"


def test_inference_node_schema_has_exactly_the_fields_of_mlxpool_nodes():
    s = schema(NODE_PLURAL)["properties"]
    assert set(s["spec"]["properties"]) == wire_names(NodeSpec)
    assert set(s["spec"]["properties"]["hardware"]["properties"]) == wire_names(Hardware)
    required = {f.alias or n for n, f in Hardware.model_fields.items() if f.is_required()}
    assert set(s["spec"]["properties"]["hardware"]["required"]) == required
    assert set(s["status"]["properties"]) == wire_names(NodeStatus) | {"conditions"}
    assert set(s["status"]["properties"]["models"]["items"]["properties"]) == wire_names(LoadedModel)


def test_printer_columns_show_memory_in_gib_not_bytes():
    columns = {c["name"]: c for c in crd(NODE_PLURAL)["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Memory"]["jsonPath"] == ".spec.hardware.memory" and columns["Memory"]["type"] == "string"
    assert columns["Free"]["jsonPath"] == ".status.freeMemory"
    # Not "Heartbeat": beats renew the Lease; heartbeatTime moves only when status is written.
    assert "Heartbeat" not in columns and columns["Reported"]["jsonPath"] == ".status.heartbeatTime"
    assert columns["Reported"]["type"] == "date"  # kubectl prints it as an age: 3s
    hw = Hardware(chip="Apple M2 Ultra", memory_bytes=25275990016, cpu_cores=24, accelerator="metal",
                  platform="darwin-arm64")
    assert hw.to_wire()["memory"] == "23.5 GiB"
    assert NodeStatus(free_memory_bytes=3 * 2**30).to_wire()["freeMemory"] == "3.0 GiB"
    assert "freeMemory" not in NodeStatus().to_wire()
    # Read back, the human copy is recomputed, never trusted from the object.
    assert Hardware.model_validate({**hw.to_wire(), "memory": "1 TiB"}).memory == "23.5 GiB"


def test_pool_enums_match_the_code():
    spec = schema(POOL_PLURAL)["properties"]["spec"]["properties"]
    assert tuple(spec["routing"]["properties"]["strategy"]["enum"]) == STRATEGIES
    priorities = [p.value for p in Priority]
    assert spec["scheduling"]["properties"]["defaultPriority"]["enum"] == priorities
    assert spec["scheduling"]["properties"]["tiers"]["items"]["properties"]["priority"]["enum"] == priorities


def test_pool_spec_model_knows_every_crd_field():
    spec = schema(POOL_PLURAL)["properties"]["spec"]["properties"]
    assert set(spec) == wire_names(PoolSpec)


def test_pool_scale_subresource_points_at_real_fields():
    (version,) = crd(POOL_PLURAL)["spec"]["versions"]
    scale = version["subresources"]["scale"]
    props = version["schema"]["openAPIV3Schema"]["properties"]
    assert scale == {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                     "labelSelectorPath": ".status.selector"}
    assert {"replicas", "selector"} <= set(props["status"]["properties"])


@pytest.mark.parametrize("plural", [POOL_PLURAL, CACHE_PLURAL, NODE_PLURAL])
def test_conditions_have_the_metav1_condition_shape(plural):
    conditions = schema(plural)["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) == {"type", "status", "lastTransitionTime", "reason", "message"}
    assert set(item["properties"]) == {"type", "status", "observedGeneration", "lastTransitionTime", "reason",
                                       "message"}


def test_sample_pool_parses_as_a_pool_spec():
    sample = yaml.safe_load((SAMPLES / "mlxpool_v1alpha1_inferencepool.yaml").read_text())
    spec = PoolSpec.from_body(sample)
    assert spec.model_names == ("tiny",) and spec.replicas == 2
    assert spec.node_selector.match_labels == {"mlxpool.dev/role": "inference"}


def test_samples_cover_every_kind():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in SAMPLES.glob("mlxpool_*.yaml")}
    assert kinds == {"InferencePool", "ModelCache", "InferenceNode"}


def test_samples_kustomization_lists_the_namespaced_samples():
    kustomization = yaml.safe_load((SAMPLES / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert all((SAMPLES / name).exists() for name in listed)
    assert listed == {p.name for p in Path(SAMPLES).glob("mlxpool_*.yaml")} - {"mlxpool_v1alpha1_inferencenode.yaml"}
