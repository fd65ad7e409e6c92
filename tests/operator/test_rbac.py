"""RBAC (manifests/rbac) as the real API server authorizes it: each identity can do
what its component needs and nothing else we can think of asking for."""

from __future__ import annotations

import pytest

from mlxpool.dev.controlplane import ControlPlane

pytestmark = pytest.mark.integration

# (identity, verb, resource, namespaced?, allowed)
CASES = [
    # The operator: pools and caches with status and finalizers, nodes read-only but for their
    # status (the Ready condition), routing-table configmaps, events. Every integration test in
    # this folder runs the operator as this identity, which proves the allowed list suffices.
    ("operator", "list", "inferencepools.mlxpool.dev", True, True),
    ("operator", "watch", "inferencepools.mlxpool.dev", True, True),
    ("operator", "patch", "inferencepools.mlxpool.dev", True, True),
    ("operator", "patch", "inferencepools.mlxpool.dev/status", True, True),
    ("operator", "update", "inferencepools.mlxpool.dev/finalizers", True, True),
    ("operator", "watch", "modelcaches.mlxpool.dev", True, True),
    ("operator", "patch", "modelcaches.mlxpool.dev", True, True),
    ("operator", "patch", "modelcaches.mlxpool.dev/status", True, True),
    ("operator", "watch", "inferencenodes.mlxpool.dev", False, True),
    ("operator", "patch", "inferencenodes.mlxpool.dev/status", False, True),
    ("operator", "create", "configmaps", True, True),
    ("operator", "patch", "configmaps", True, True),
    ("operator", "watch", "configmaps", True, True),
    ("operator", "create", "events", True, True),
    ("operator", "create", "events.events.k8s.io", True, True),
    ("operator", "watch", "customresourcedefinitions.apiextensions.k8s.io", False, True),
    ("operator", "watch", "namespaces", False, True),
    # ... and nothing more.
    ("operator", "create", "inferencepools.mlxpool.dev", True, False),
    ("operator", "delete", "inferencepools.mlxpool.dev", True, False),
    ("operator", "update", "inferencepools.mlxpool.dev", True, False),
    ("operator", "create", "modelcaches.mlxpool.dev", True, False),
    ("operator", "delete", "modelcaches.mlxpool.dev", True, False),
    ("operator", "update", "modelcaches.mlxpool.dev/finalizers", True, False),
    ("operator", "create", "inferencenodes.mlxpool.dev", False, False),
    ("operator", "patch", "inferencenodes.mlxpool.dev", False, False),
    ("operator", "delete", "inferencenodes.mlxpool.dev", False, False),
    ("operator", "update", "inferencenodes.mlxpool.dev/status", False, False),
    ("operator", "delete", "configmaps", True, False),
    ("operator", "update", "configmaps", True, False),
    ("operator", "delete", "events", True, False),
    ("operator", "get", "secrets", True, False),
    ("operator", "list", "secrets", True, False),
    ("operator", "create", "leases.coordination.k8s.io", True, False),
    ("operator", "list", "pods", True, False),
    ("operator", "create", "deployments.apps", True, False),
    ("operator", "create", "serviceaccounts/token", True, False),
    ("operator", "impersonate", "users", False, False),
    ("operator", "delete", "customresourcedefinitions.apiextensions.k8s.io", False, False),
    ("operator", "create", "clusterrolebindings.rbac.authorization.k8s.io", False, False),
    ("operator", "escalate", "clusterroles.rbac.authorization.k8s.io", False, False),
    # The agent: its own InferenceNode (and its Lease: LEASE_CASES), nothing else.
    ("agent", "create", "inferencenodes.mlxpool.dev", False, True),
    ("agent", "get", "inferencenodes.mlxpool.dev", False, True),
    ("agent", "patch", "inferencenodes.mlxpool.dev", False, True),
    ("agent", "patch", "inferencenodes.mlxpool.dev/status", False, True),
    ("agent", "delete", "inferencenodes.mlxpool.dev", False, False),
    ("agent", "list", "inferencenodes.mlxpool.dev", False, False),
    ("agent", "get", "inferencepools.mlxpool.dev", True, False),
    ("agent", "get", "configmaps", True, False),
    ("agent", "get", "secrets", True, False),
    # The router: follows routing-table ConfigMaps.
    ("router", "get", "configmaps", True, True),
    ("router", "list", "configmaps", True, True),
    ("router", "watch", "configmaps", True, True),
    ("router", "patch", "configmaps", True, False),
    ("router", "list", "inferencepools.mlxpool.dev", True, False),
    ("router", "get", "secrets", True, False),
]


# Node Leases: (identity, verb, namespace, allowed). Agents renew theirs in mlxpool-system,
# the operator follows them there; neither may touch a Lease anywhere else.
LEASE_CASES = [
    ("agent", "create", "mlxpool-system", True),
    ("agent", "get", "mlxpool-system", True),
    ("agent", "patch", "mlxpool-system", True),
    ("agent", "update", "mlxpool-system", True),
    ("agent", "delete", "mlxpool-system", False),
    ("agent", "list", "mlxpool-system", False),
    ("agent", "watch", "mlxpool-system", False),
    ("agent", "create", "default", False),
    ("agent", "patch", "kube-node-lease", False),
    ("operator", "list", "mlxpool-system", True),
    ("operator", "watch", "mlxpool-system", True),
    ("operator", "create", "mlxpool-system", False),
    ("operator", "patch", "mlxpool-system", False),
    ("operator", "update", "mlxpool-system", False),
    ("operator", "delete", "mlxpool-system", False),
    ("operator", "list", "default", False),
    ("router", "list", "mlxpool-system", False),
]


@pytest.mark.parametrize(("identity", "verb", "namespace", "allowed"), LEASE_CASES,
                         ids=[f"{c[0]}-{c[1]}-leases-{c[2]}" for c in LEASE_CASES])
def test_can_i_leases(controlplane: ControlPlane, identity, verb, namespace, allowed):
    result = controlplane.kubectl("auth", "can-i", verb, "leases.coordination.k8s.io", "-n", namespace,
                                  identity=identity, check=False)
    assert result.stdout.strip() == ("yes" if allowed else "no"), result.stderr


@pytest.mark.parametrize(("identity", "verb", "resource", "namespaced", "allowed"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2].split('.')[0]}{'/' + c[2].split('/')[1] if '/' in c[2] else ''}"
                              for c in CASES])
def test_can_i(controlplane: ControlPlane, identity, verb, resource, namespaced, allowed):
    scope = ["-n", "default"] if namespaced else []
    resource, _, subresource = resource.partition("/")  # kubectl reads "res/x" as a name, not a subresource
    if subresource:
        scope.append(f"--subresource={subresource}")
    result = controlplane.kubectl("auth", "can-i", verb, resource, *scope, identity=identity, check=False)
    assert result.stdout.strip() == ("yes" if allowed else "no"), result.stderr


def test_aggregated_roles_exist_per_kind(controlplane: ControlPlane):
    names = set(controlplane.kubectl("get", "clusterroles", "-l", "app.kubernetes.io/name=mlxpool",
                                     "-o", "name").stdout.split())
    for kind in ("inferencepool", "modelcache", "inferencenode"):
        for level in ("admin", "editor", "viewer"):
            assert f"clusterrole.rbac.authorization.k8s.io/mlxpool-{kind}-{level}" in names
    viewers = controlplane.kubectl("get", "clusterroles", "-l", "rbac.authorization.k8s.io/aggregate-to-view=true",
                                   "-o", "name").stdout.split()
    assert "clusterrole.rbac.authorization.k8s.io/mlxpool-inferencepool-viewer" in viewers
