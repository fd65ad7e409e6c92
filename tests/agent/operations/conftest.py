"""Tests of the agent's operations API (`/v1/node`): model manager, cache staging, weights.

Real here: agent processes serving the tiny MLX model (and a second one made with
another seed), the native weight manager (mmap, mlock, mincore on real files), the
files staged, and the HTTP sources: `ModelServer` is a real HTTP server on 127.0.0.1
(a thread in the test process) that serves model directories as plain directories
(with an `index.json` manifest) and speaks the Hugging Face Hub's protocol
(`/api/models/{repo}/revision/{rev}`, `/{repo}/resolve/{sha}/{file}` redirecting to
a CDN path), since no hub is reachable from here. The apiserver for the registration
test is the real one (tests/conftest.py).
Faked here: only in the manager's unit tests (test_manager.py), `FakeEngine` stands in
for the MLX engine so phases, eviction and unload timing are tested fast and alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest

from mlxpool.agent.engine.interface import EngineError, EngineStats, GenerationRequest, ModelInfo, TokenEvent
from mlxpool.dev.components import READY_URL
from mlxpool.dev.processes import LOOPBACK, Process
from mlxpool.tinymodel import make_tiny

OPS_TOKEN = "ops-secret-token"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests_of(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- models ----


@pytest.fixture(scope="session")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny model (seed 1): same shapes, other weights."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-b", size="tiny", seed=1)


@pytest.fixture(scope="session")
def ops_token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "ops-token"
    path.write_text(OPS_TOKEN + "\n")
    return path


@pytest.fixture
def start_agent_process(tmp_path: Path) -> Iterator:
    """`start_agent_process(args, prefix=..., env=...)`: `start_ops_agent` for one test; stopped after."""
    started: list[Process] = []

    def start(args: list[str], **kwargs: Any) -> Process:
        proc = start_ops_agent(tmp_path / "logs", args, name=f"agent-{len(started)}", **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop(10)


@pytest.fixture
def ops() -> Iterator:
    """`ops(agent)`: an httpx client on an agent's URL that sends the ops token."""
    clients: list[httpx.Client] = []

    def client(agent: Any, token: str | None = OPS_TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        c = httpx.Client(base_url=agent.url, headers=headers, timeout=30)
        clients.append(c)
        return c

    yield client
    for c in clients:
        c.close()


def wait_until(check: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `check()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"{what}: not true after {timeout:.0f}s (last: {last!r})")


# ---- a local model server: plain directories and the Hub protocol ----


@dataclass
class ModelServer:
    """Serves `repos` (name → directory) over HTTP on 127.0.0.1; see the module docstring."""

    repos: dict[str, Path] = field(default_factory=dict)
    chunk_delay: float = 0.0
    """Seconds to sleep between 64 KiB chunks (to watch a download in progress)."""
    corrupt: set[str] = field(default_factory=set)
    """'repo/path' whose bytes are served altered (same length)."""
    manifest: bool = True
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def add(self, name: str, directory: Path) -> str:
        self.repos[name] = directory
        return f"{self.url}/models/{name}"

    def file_path(self, repo: str, path: str) -> Path | None:
        directory = self.repos.get(repo)
        if directory is None:
            return None
        target = (directory / path).resolve()
        return target if target.is_file() and directory.resolve() in target.parents else None


def _handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            server.requests.append((self.command, path, dict(self.headers)))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and "revision" in parts:
                i = parts.index("revision")
                return self._hub_info("/".join(parts[2:i]))
            if "resolve" in parts:
                i = parts.index("resolve")
                repo, rest = "/".join(parts[:i]), "/".join(parts[i + 2:])
                self.send_response(302)
                self.send_header("Location", f"/cdn/{repo}/{rest}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if parts[0] in ("models", "cdn") and len(parts) >= 3:
                repo_len = 1 if parts[0] == "models" else 2
                repo = "/".join(parts[1:1 + repo_len])
                rest = "/".join(parts[1 + repo_len:])
                if parts[0] == "models" and rest == "index.json" and server.manifest and repo in server.repos:
                    return self._manifest(repo)
                file = server.file_path(repo, rest)
                if file is not None:
                    return self._file(file, f"{repo}/{rest}", head)
            self._send(404, b"not found", "text/plain")
            return None

        def _hub_info(self, repo: str) -> None:
            directory = server.repos.get(repo)
            if directory is None:
                return self._send(404, b'{"error": "Repository not found"}', "application/json")
            siblings = []
            for p in sorted(directory.rglob("*")):
                if p.is_file():
                    entry: dict[str, Any] = {"rfilename": p.relative_to(directory).as_posix(), "size": p.stat().st_size}
                    if p.suffix == ".safetensors":  # LFS files carry their sha256
                        entry["lfs"] = {"sha256": sha256_file(p), "size": p.stat().st_size, "pointerSize": 134}
                    siblings.append(entry)
            body = {"id": repo, "sha": HUB_COMMIT, "siblings": [*siblings, {"rfilename": "README.md"}]}
            return self._send(200, json.dumps(body).encode(), "application/json")

        def _manifest(self, repo: str) -> None:
            directory = server.repos[repo]
            files = [{"path": p.relative_to(directory).as_posix(), "size": p.stat().st_size}
                     for p in sorted(directory.rglob("*")) if p.is_file()]
            self._send(200, json.dumps({"files": files}).encode(), "application/json")

        def _file(self, file: Path, key: str, head: bool) -> None:
            data = file.read_bytes()
            if key in server.corrupt and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if head:
                return
            for start in range(0, len(data), 65536):
                if server.chunk_delay:
                    time.sleep(server.chunk_delay)
                try:
                    self.wfile.write(data[start:start + 65536])
                except (BrokenPipeError, ConnectionResetError):
                    return

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def serve_models() -> Iterator[ModelServer]:
    state = ModelServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), name="model-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    with serve_models() as server:
        yield server


@pytest.fixture(scope="module")
def module_model_server() -> Iterator[ModelServer]:
    """One model server for a module's agent (its HF_ENDPOINT); tests reset what they change."""
    with serve_models() as server:
        yield server


@pytest.fixture(scope="module")
def multi_model_agents(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """`start(name, max_models)`: an agent on the tiny model with the ops API (OPS_TOKEN) and
    that many engine slots, shared by a module's tests; all stopped after the module."""
    from mlxpool.dev import components

    started: list[Process] = []

    def start(name: str, max_models: int) -> Process:
        workdir = tmp_path_factory.mktemp(name)
        (workdir / "token").write_text(OPS_TOKEN + "\n")
        config = workdir / "runtime.yaml"
        config.write_text(f"multi_model:\n  max_models: {max_models}\n  unload_timeout_seconds: 10\n")
        agent = components.start_agent(tiny_model, workdir / "logs", name=name, ops_token_file=workdir / "token",
                                       extra=["--config", str(config), "--max-tokens-default", "4"], timeout=90)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop(10)


# ---- agents started the way an operator-managed node runs them ----


def start_ops_agent(log_dir: Path, args: list[str], *, name: str = "agent", prefix: list[str] = (),
                    env: dict[str, str] | None = None, timeout: float = 60) -> Process:
    """`mlxpool agent --port 0 ARGS` (no --model unless ARGS has one), optionally under `prefix`
    (e.g. setpriv/prlimit) and with extra environment; returns once it is ready."""
    argv = [*prefix, sys.executable, "-m", "mlxpool", "agent", "--host", LOOPBACK, "--port", "0", *args]
    proc = Process.start(name, argv, log_dir / f"{name}.log", env=env)
    try:
        proc.url = proc.wait_for_log(READY_URL.format(name="agent"), timeout).group(1)
    except BaseException:
        proc.stop()
        raise
    return proc


# ---- a fake engine for the manager's unit tests ----


class FakeTokenizer:
    has_chat_template = False

    def __len__(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return [min(ord(c), 255) for c in text]

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> list[int]:  # pragma: no cover
        raise AssertionError


@dataclass
class FakeEngine:
    """A ManagedEngine without MLX: `start` waits for `release` (if set), then 'loads'."""

    path: str
    name: str
    warm: bool
    on_weights_loaded: Any
    fail: str | None = None
    release: asyncio.Event | None = None
    step: asyncio.Event | None = None
    """When set, each generated token waits for it (to hold a request in flight)."""
    memory_bytes: int = 1000
    tokenizer: Any = field(default_factory=FakeTokenizer)
    stats: EngineStats = field(default_factory=EngineStats)
    healthy: bool = False
    started: bool = False
    stopped: bool = False

    async def start(self) -> ModelInfo:
        self.started = True
        self.on_weights_loaded()
        if self.release is not None:
            await self.release.wait()
        if self.fail:
            raise RuntimeError(self.fail)
        self.healthy = True
        return ModelInfo(path=self.path, memory_bytes=self.memory_bytes, context_length=64)

    async def stop(self) -> None:
        self.stopped = True
        self.healthy = False
        self.parked = False

    parked: bool = False
    resumes: int = 0

    async def park(self) -> None:
        self.healthy, self.parked = False, True

    async def resume(self) -> ModelInfo:
        assert self.parked, "resume of an engine that is not parked"
        self.healthy, self.parked = True, False
        self.resumes += 1
        return ModelInfo(path=self.path, memory_bytes=self.memory_bytes, context_length=64)

    def refuse_early(self, priority: Any, terms: Any, deadline: float | None, prompt_tokens: int) -> None:
        """Refuses nothing before tokenizing (`fail_with` fails at submit)."""

    async def submit(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        if not self.healthy:
            raise EngineError("the engine is not running")
        for i in range(1, 4):
            if self.step is not None:
                await self.step.wait()
            await asyncio.sleep(0)
            yield TokenEvent("x", i, i, "length" if i == 3 else None)


@pytest.fixture
def fake_engine_type() -> type[FakeEngine]:
    """The FakeEngine class (test modules cannot import conftest under --import-mode=importlib)."""
    return FakeEngine
