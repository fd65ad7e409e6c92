"""Fixtures for the operator tests.

Real here: the kube-apiserver with this repo's CRDs and RBAC (the session
`controlplane` fixture), the operator itself (`python -m mlxpool operator`, a real
subprocess authenticated as the operator's ServiceAccount user), and InferenceNodes
registered through the agent's own identity.

Faked here: the agents. Two stand-ins, both real HTTP servers on 127.0.0.1:
- `sim_agents` starts `python -m bench.simagents` (the control-plane benchmark's
  simulated agents): one process hosting several agents that answer `/health`,
  `/ready`, `/metrics` and the whole operations API of `mlxpool.agentapi` (load,
  unload, cache staging with real sha256 checks of file:// and http:// sources) without
  MLX, behind the same token rules, and register and heartbeat their InferenceNodes
  with the agent's own registration code and identity. A control API kills, revives,
  pauses heartbeats and reports every call each agent received.
- `HealthServer` answers only `GET /health`, for tests of probing alone.
The lead's integration tests (tests/integration) use real agents.

Unit tests in this folder (placement, fleet, sources, assignments, tables, conditions,
statuses, caches, usage, reconciling) need none of this; the reconciler's unit test
fakes the API and the agents.
"""

from __future__ import annotations

import json
import re
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlxpool.dev.controlplane import REPO_ROOT, ControlPlane
from mlxpool.dev.processes import LOOPBACK, Process, free_port
from mlxpool.resources import GROUP, NODE_PLURAL, VERSION

TEST_LABEL = "mlxpool.dev/test-namespace"


class _HealthHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
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
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
                 free_memory: int = 8 << 30, chip: str = "test", model_bytes: int | None = None) -> str:
        name = self.name(short)
        body = {
            "apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferenceNode",
            "metadata": {"name": name, "labels": {TEST_LABEL: self.namespace, **(labels or {})}},
            "spec": {"endpoint": endpoint, "hardware": {"chip": chip, "memoryBytes": 16 << 30, "cpuCores": 2,
                                                        "accelerator": "cpu", "platform": "linux-x86_64"}},
        }
        self.cp.kubectl("create", "-f", "-", input=json.dumps(body), identity="agent")
        self.created.append(name)
        loaded = [{"name": m, **({"memoryBytes": model_bytes} if model_bytes else {})} for m in models]
        self.set_status(short, ready=ready, models=loaded,
                        heartbeatTime=rfc3339(heartbeat or datetime.now(UTC)), freeMemoryBytes=free_memory)
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


OPS_TOKEN = "test-ops-token"


@pytest.fixture
def ops_token_file(tmp_path: Path) -> Path:
    """The agents' ops token, which the operator sends (--agent-token-file)."""
    path = tmp_path / "ops-token"
    path.write_text(OPS_TOKEN + "\n")
    path.chmod(0o600)
    return path


class SimAgents:
    """A `bench.simagents` process and its control API."""

    def __init__(self, proc: Process, control: str, names: list[str]) -> None:
        self.proc = proc
        self.control = control
        self.names = names

    def state(self) -> dict[str, dict]:
        return {a["name"]: a for a in httpx.get(f"{self.control}/agents", timeout=5).json()}

    def act(self, name: str, action: str, **body: Any) -> None:
        response = httpx.post(f"{self.control}/agents/{name}/{action}", json=body, timeout=10)
        assert response.status_code == 200, response.text

    def kill(self, name: str) -> None:
        self.act(name, "kill")

    def revive(self, name: str) -> None:
        self.act(name, "revive")

    def calls(self, operation: str) -> dict[str, int]:
        """Calls of `operation` (load, unload, stage, cache_delete, ...) each agent received."""
        return {n: a["calls"].get(operation, 0) for n, a in self.state().items()}

    def models(self) -> dict[str, dict[str, str]]:
        return {n: a["models"] for n, a in self.state().items()}

    def url(self, name: str) -> str:
        return self.state()[name]["url"]


@pytest.fixture
def sim_agents(controlplane: ControlPlane, namespace: str, tmp_path: Path,
               ops_token_file: Path) -> Iterator[Callable[..., SimAgents]]:
    """Start simulated agents named `<namespace>-<prefix>-NNN`, labelled with the test's
    namespace, registered as the agent identity with 1 s heartbeats; stopped and their
    InferenceNodes deleted after."""
    started: list[tuple[Process, list[str]]] = []

    def start(count: int = 2, *, prefix: str = "a", labels: dict[str, str] | None = None,
              preload: tuple[str, ...] = (), load_seconds: float = 0.3, stage_seconds: float = 0.3,
              max_models: int = 4, memory_gib: float = 64, model_gib: float = 1, token: bool = True,
              heartbeat: float = 1.0) -> SimAgents:
        full_prefix = f"{namespace}-{prefix}"
        argv = [sys.executable, "-m", "bench.simagents", "--count", str(count), "--prefix", full_prefix,
                "--kubeconfig", str(controlplane.kubeconfig("agent")), "--heartbeat-interval", str(heartbeat),
                "--label", f"{TEST_LABEL}={namespace}", "--load-seconds", str(load_seconds),
                "--stage-seconds", str(stage_seconds), "--max-models", str(max_models),
                "--memory-gib", str(memory_gib), "--model-gib", str(model_gib)]
        for k, v in (labels or {}).items():
            argv += ["--label", f"{k}={v}"]
        for model in preload:
            argv += ["--preload", model]
        if token:
            argv += ["--ops-token-file", str(ops_token_file)]
        proc = Process.start("simagents", argv, tmp_path / f"simagents-{len(started)}.log",
                             env={"PYTHONPATH": str(REPO_ROOT)})
        names = [f"{full_prefix}-{i:03d}" for i in range(count)]
        started.append((proc, names))
        control = proc.wait_for_log(r"simagents ready url=(http://\S+)", 60).group(1)
        return SimAgents(proc, control, names)

    yield start
    for proc, names in started:
        proc.stop()
        for name in names:
            controlplane.kubectl("delete", "inferencenode", name, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture
def run_operator(controlplane: ControlPlane, tmp_path: Path, ops_token_file: Path) -> Iterator[Callable[..., Process]]:
    """Start `mlxpool operator` for one namespace as the operator identity, with the agents'
    token; stopped after. At teardown the logs must hold no traceback."""
    started: list[Process] = []

    def start(namespace: str, *extra: str) -> Process:
        argv = [sys.executable, "-m", "mlxpool", "operator", "--kubeconfig", str(controlplane.kubeconfig("operator")),
                "--namespace", namespace, "--agent-token-file", str(ops_token_file), "--metrics-port", "0", *extra]
        proc = Process.start("operator", argv, tmp_path / f"operator-{len(started)}.log")
        started.append(proc)
        proc.wait_for_log(r"operator ready", 30)
        return proc

    yield start
    for proc in started:
        proc.stop()
    for proc in started:
        assert "Traceback" not in proc.log_text(), proc.log_tail(80)


class Cluster:
    """kubectl reads of this test's namespace, and polling with a readable failure."""

    def __init__(self, controlplane: ControlPlane, namespace: str) -> None:
        self.cp = controlplane
        self.namespace = namespace

    def apply(self, obj: dict) -> None:
        self.cp.kubectl("apply", "-n", self.namespace, "-f", "-", input=json.dumps(obj))

    def get(self, kind: str, name: str) -> dict:
        return json.loads(self.cp.kubectl("get", kind, name, "-n", self.namespace, "-o", "json").stdout)

    def exists(self, kind: str, name: str) -> bool:
        return bool(self.cp.kubectl("get", kind, name, "-n", self.namespace, "--ignore-not-found", "-o",
                                    "name").stdout.strip())

    def status(self, kind: str, name: str) -> dict:
        return self.get(kind, name).get("status") or {}

    def conditions(self, kind: str, name: str) -> dict[str, tuple[str, str]]:
        return {c["type"]: (c["status"], c["reason"]) for c in self.status(kind, name).get("conditions", [])}

    def routed(self, pool: str, model: str) -> list[str]:
        """Nodes the pool's routing table lists for `model` (none when there is no table yet)."""
        from mlxpool.resources import ROUTES_DATA_KEY
        from mlxpool.routing import RoutingTable

        if not self.exists("configmap", f"{pool}-routes"):
            return []
        cm = self.get("configmap", f"{pool}-routes")
        return [e.node for e in RoutingTable.from_json(cm["data"][ROUTES_DATA_KEY]).endpoints_for(model)]

    def events(self, kind: str) -> list[tuple[str, str]]:
        items = json.loads(self.cp.kubectl("get", "events", "-n", self.namespace, "-o", "json").stdout)["items"]
        return [(e["reason"], e["message"]) for e in items if e["involvedObject"]["kind"] == kind]

    @staticmethod
    def metrics(operator: Process) -> str:
        """The operator's /metrics text."""
        url = re.search(r"operator ready url=(http://[0-9.]+:\d+)", operator.log_text()).group(1)
        return httpx.get(f"{url}/metrics", timeout=5).text

    @staticmethod
    def eventually(check: Callable[[], Any], timeout: float, what: str, proc: Process | None = None,
                   interval: float = 0.2) -> Any:
        """Poll `check` until it returns a truthy value, which is returned; on timeout fail
        naming `what`, the last value or error, and the operator's log tail."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                value = check()
                if value:
                    return value
                last = value
            except (AssertionError, KeyError, IndexError, ValueError, RuntimeError, StopIteration) as exc:
                last = exc
            if time.monotonic() > deadline:
                tail = f"\noperator log:\n{proc.log_tail(60)}" if proc is not None else ""
                raise AssertionError(f"{what}: not within {timeout}s (last: {last!r}){tail}")
            time.sleep(interval)


@pytest.fixture
def cluster(controlplane: ControlPlane, namespace: str) -> Cluster:
    return Cluster(controlplane, namespace)
