"""Fixtures shared by every test folder.

Real here: the Kubernetes control plane (etcd + kube-apiserver built by hack/, one per
test session, a fresh namespace per test), redis-server on a free loopback port, and
the tiny MLX model made by `mlxpool.tinymodel`. Nothing in this file is a fake; folders
that fake something say so in their own conftest.py.

Set MLXPOOL_CONTROLPLANE_BIN to a directory with kube-apiserver, etcd and kubectl to
skip the build step.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import redis

from mlxpool.dev.controlplane import REPO_ROOT, SYSTEM_NAMESPACE, ControlPlane
from mlxpool.dev.processes import LOOPBACK, Process, free_port, wait_for
from mlxpool.tinymodel import make_tiny


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama model with a real tokenizer, made once per session."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory: pytest.TempPathFactory):
    """A real kube-apiserver + etcd with the CRDs and RBAC of this repo applied."""
    cp = ControlPlane(tmp_path_factory.mktemp("controlplane")).start()
    try:
        cp.kubectl("create", "namespace", SYSTEM_NAMESPACE)
        crds = sorted((REPO_ROOT / "crds").glob("*.yaml"))
        if crds:
            cp.apply(*crds)
            cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", *[f"-f={c}" for c in crds])
        rbac = REPO_ROOT / "manifests" / "rbac"
        if rbac.is_dir() and any(rbac.glob("*.yaml")):
            cp.kubectl("apply", "-k" if (rbac / "kustomization.yaml").exists() else "-f", str(rbac))
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def namespace(controlplane: ControlPlane, request: pytest.FixtureRequest) -> str:
    """A fresh namespace per test; deleted after (it stays Terminating: there is no GC)."""
    name = f"t-{request.node.name[:40].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:6]}"
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    controlplane.kubectl("create", "namespace", name)
    yield name
    controlplane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server on a free loopback port, without persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (make test installs it with apt)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = Process.start("redis", [
        binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
        "--dir", str(workdir),
    ], workdir / "redis.log")
    proc.url = f"redis://{LOOPBACK}:{port}/0"
    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        wait_for(lambda: client.ping(), 20, "redis-server", proc)
        yield proc
    finally:
        client.close()
        proc.stop()


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=True, **kwargs)
