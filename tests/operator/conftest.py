"""Fixtures for the operator tests.

Real here: the kube-apiserver with this repo's CRDs and RBAC (the session
`controlplane` fixture), the operator itself (`python -m mlxpool operator`, a real
subprocess authenticated as the operator's ServiceAccount user), and InferenceNodes
registered through the agent's own identity.

Faked here: the agents. `HealthServer` is a small real HTTP server on 127.0.0.1 that
answers `GET /health` and stands in for an agent's liveness endpoint; the operator
only probes that. The lead's integration tests (tests/integration) use real agents.

Unit tests in this folder (placement, tables, conditions, statuses, reconciling)
need none of this; the reconciler's unit test fakes the API and the prober.
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlxpool.dev.controlplane import ControlPlane
from mlxpool.dev.processes import LOOPBACK, Process, free_port
from mlxpool.resources import GROUP, NODE_PLURAL, VERSION

TEST_LABEL = "mlxpool.dev/test-namespace"


class _HealthHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        status, body = (200, b'{"status":"ok"}') if self.path == "/health" else (404, b"{}")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HealthServer:
    """Stands in for an agent: `GET /health` -> 200 on a loopback port, until stopped.
    `start()` again reuses the same port, as a restarted agent would."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HealthServer:
        self._server = ThreadingHTTPServer((LOOPBACK, self.port), _HealthHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"health-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = self._thread = None


@pytest.fixture
def health_servers() -> Iterator[Callable[[], HealthServer]]:
    started: list[HealthServer] = []

    def start() -> HealthServer:
        server = HealthServer().start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Nodes:
    """InferenceNodes registered the way an agent does: create, then status patch,
    both with the agent's identity (so its RBAC is exercised too)."""

    label = TEST_LABEL
    """Every node carries `label: <namespace>`: select on it to see only this test's nodes."""

    def __init__(self, controlplane: ControlPlane, namespace: str) -> None:
        self.cp = controlplane
        self.namespace = namespace
        self.created: list[str] = []

    def name(self, short: str) -> str:
        return f"{self.namespace}-{short}"

    def register(self, short: str, endpoint: str, *, models: tuple[str, ...] = ("tiny",), ready: bool = True,
                 labels: dict[str, str] | None = None, heartbeat: datetime | None = None,
                 free_memory: int = 8 << 30) -> str:
        name = self.name(short)
        body = {
            "apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferenceNode",
            "metadata": {"name": name, "labels": {TEST_LABEL: self.namespace, **(labels or {})}},
            "spec": {"endpoint": endpoint, "hardware": {"chip": "test", "memoryBytes": 16 << 30, "cpuCores": 2,
                                                        "accelerator": "cpu", "platform": "linux-x86_64"}},
        }
        self.cp.kubectl("create", "-f", "-", input=json.dumps(body), identity="agent")
        self.created.append(name)
        self.set_status(short, ready=ready, models=[{"name": m} for m in models],
                        heartbeatTime=rfc3339(heartbeat or datetime.now(timezone.utc)), freeMemoryBytes=free_memory)
        return name

    def set_status(self, short: str, **fields: Any) -> None:
        """A JSON merge patch of the status subresource, as the agent's heartbeat sends it
        (not `kubectl patch`, which reads the object first: the agent may not `get` status)."""
        url = f"{self.cp.server}/apis/{GROUP}/{VERSION}/{NODE_PLURAL}/{self.name(short)}/status"
        response = httpx.patch(
            url, content=json.dumps({"status": fields}), timeout=10,
            headers={"Authorization": f"Bearer {self.cp.tokens['agent']}",
                     "Content-Type": "application/merge-patch+json"},
            verify=ssl.create_default_context(cafile=str(self.cp.workdir / "certs" / "apiserver.crt")),
        )
        assert response.status_code == 200, response.text

    def delete_all(self) -> None:
        for name in self.created:
            self.cp.kubectl("delete", "inferencenode", name, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture
def nodes(controlplane: ControlPlane, namespace: str) -> Iterator[Nodes]:
    """InferenceNodes for this test (cluster-scoped: labelled with the test's namespace and
    deleted after, so they never match another test's pools)."""
    registry = Nodes(controlplane, namespace)
    yield registry
    registry.delete_all()


@pytest.fixture
def run_operator(controlplane: ControlPlane, tmp_path: Path) -> Iterator[Callable[..., Process]]:
    """Start `mlxpool operator` for one namespace as the operator identity; stopped after.
    At teardown the logs must hold no traceback."""
    started: list[Process] = []

    def start(namespace: str, *extra: str) -> Process:
        argv = [sys.executable, "-m", "mlxpool", "operator", "--kubeconfig", str(controlplane.kubeconfig("operator")),
                "--namespace", namespace, *extra]
        proc = Process.start("operator", argv, tmp_path / f"operator-{len(started)}.log")
        started.append(proc)
        proc.wait_for_log(r"operator ready", 30)
        return proc

    yield start
    for proc in started:
        proc.stop()
    for proc in started:
        assert "Traceback" not in proc.log_text(), proc.log_tail(80)
