"""End-to-end fixtures: everything real.

A real kube-apiserver + etcd (session), the real operator, real agents serving the real
tiny MLX model and a real router, each a `python -m mlxpool ...` subprocess on
127.0.0.1, started per test and stopped after. Nothing is faked in this folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxpool.dev.components import start_agent, start_operator, start_router
from mlxpool.dev.controlplane import ControlPlane
from mlxpool.dev.processes import Process
from mlxpool.resources import ROUTES_DATA_KEY, routes_configmap_name
from mlxpool.routing import RoutingTable


@pytest.fixture
def launched(tmp_path: Path):
    """Start components through it; all are stopped at the end of the test."""
    procs: list[Process] = []

    class Launcher:
        logs = tmp_path / "logs"

        def agent(self, model: Path, **kw) -> Process:
            procs.append(start_agent(model, self.logs, **kw))
            return procs[-1]

        def router(self, **kw) -> Process:
            procs.append(start_router(self.logs, **kw))
            return procs[-1]

        def operator(self, **kw) -> Process:
            procs.append(start_operator(self.logs, **kw))
            return procs[-1]

    yield Launcher()
    for proc in reversed(procs):
        proc.stop()


@pytest.fixture
def node_label(namespace: str) -> dict[str, str]:
    """InferenceNodes are cluster-scoped: each test selects only its own agents."""
    return {"mlxpool.dev/test": namespace}


@pytest.fixture
def cleanup_nodes(controlplane: ControlPlane, node_label: dict[str, str]):
    yield
    (key, value), = node_label.items()
    controlplane.kubectl("delete", "inferencenodes", "-l", f"{key}={value}", "--wait=false", check=False)


@pytest.fixture
def routing_table(controlplane: ControlPlane):
    """`routing_table(namespace, pool)`: the pool's table as the operator wrote it, or None."""
    def read(namespace: str, pool: str) -> RoutingTable | None:
        out = controlplane.kubectl("get", "configmap", routes_configmap_name(pool), "-n", namespace,
                                   "-o", "json", check=False)
        if out.returncode != 0:
            return None
        return RoutingTable.from_json(json.loads(out.stdout)["data"][ROUTES_DATA_KEY])

    return read
