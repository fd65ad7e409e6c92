"""Start the mlxpool components as child processes, the way users run them.

Each starter runs `python -m mlxpool <component> ...` with the same interpreter, waits
for the component's one "ready" log line (`<component> ready url=http://...`), and
returns a `Process` whose `url` is the bound address. Ports are chosen by the
component itself (`--port 0`), so there is no race for a free port.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from mlxpool.dev.processes import LOOPBACK, Process

READY_URL = r"{name} ready url=(https?://[0-9.]+:\d+)"


def _start(name: str, label: str, args: list[str], log_dir: Path, timeout: float,
           env: dict | None = None) -> Process:
    argv = [sys.executable, "-m", "mlxpool", name, *args]
    proc = Process.start(label, argv, log_dir / f"{label}.log", env=env)
    try:
        proc.url = proc.wait_for_log(READY_URL.format(name=name), timeout).group(1)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_agent(model: Path | None, log_dir: Path, *, name: str = "agent", kubeconfig: Path | None = None,
                node_name: str | None = None, labels: dict[str, str] | None = None,
                ops_token_file: Path | None = None, extra: Sequence[str] = (), timeout: float = 120) -> Process:
    """An agent serving `model` (or nothing, until told to load one); its cache is its own
    (`<log_dir>/<name>-cache`): agents sharing one would delete each other's files."""
    args = ["--host", LOOPBACK, "--port", "0", "--cache-dir", str(log_dir / f"{name}-cache")]
    if model is not None:
        args += ["--model", str(model)]
    if ops_token_file is not None:
        args += ["--ops-token-file", str(ops_token_file)]
    if kubeconfig is not None:
        args += ["--kubeconfig", str(kubeconfig), "--node-name", node_name or name, "--heartbeat-interval", "1"]
        for k, v in (labels or {}).items():
            args += ["--label", f"{k}={v}"]
    return _start("agent", name, [*args, *extra], log_dir, timeout)


def start_router(log_dir: Path, *, pool: str | None = None, kubeconfig: Path | None = None,
                 routes_file: Path | None = None, name: str = "router", port: int = 0,
                 extra: Sequence[str] = (), timeout: float = 60) -> Process:
    args = ["--host", LOOPBACK, "--port", str(port)]
    if pool is not None:
        args += ["--pool", pool, "--kubeconfig", str(kubeconfig)]
    if routes_file is not None:
        args += ["--routes-file", str(routes_file)]
    return _start("router", name, [*args, *extra], log_dir, timeout)


def start_operator(log_dir: Path, *, kubeconfig: Path, name: str = "operator",
                   agent_token_file: Path | None = None, extra: Sequence[str] = (), timeout: float = 60) -> Process:
    args = ["--kubeconfig", str(kubeconfig), "--metrics-port", "0"]
    if agent_token_file is not None:
        args += ["--agent-token-file", str(agent_token_file)]
    args += extra
    return _start("operator", name, args, log_dir, timeout)
