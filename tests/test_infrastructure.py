"""The shared fixtures themselves work: a real apiserver with RBAC, a real Redis."""

from __future__ import annotations

import json

import redis

from mlxpool.dev.controlplane import ControlPlane


def test_apiserver_serves_crds_and_enforces_rbac(controlplane: ControlPlane, namespace: str):
    version = json.loads(controlplane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.")
    crds = controlplane.kubectl("get", "crd", "-o", "name").stdout.split()
    assert "customresourcedefinition.apiextensions.k8s.io/inferencepools.mlxpool.dev" in crds
    # RBAC is enforced: the agent identity cannot read secrets.
    denied = controlplane.kubectl("auth", "can-i", "get", "secrets", "-n", namespace,
                                  identity="agent", check=False)
    assert denied.stdout.strip() == "no"


def test_redis_is_real(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.set("mlxpool:test", b"value")
        assert client.get("mlxpool:test") == b"value"
        assert client.info("server")["redis_version"]
    finally:
        client.close()
