"""Child processes on loopback: free ports, readiness waits, clean stops.

Shared by the control plane, the dev stack and the test fixtures. Only 127.0.0.1 is
ever used.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], T], timeout: float, what: str, proc: Process | None = None) -> T:
    """Poll `check` until it returns something truthy, and return that; errors raised by
    `check` count as "not yet". Fails early if `proc` died, naming its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what}: process exited with {proc.popen.returncode}; log tail:\n{proc.log_tail()}")
        try:
            if value := check():
                return value
        except Exception:  # not up yet: any error means "try again"
            pass
        time.sleep(0.1)
    tail = f"; log tail:\n{proc.log_tail()}" if proc is not None else ""
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s{tail}")


@dataclass
class Process:
    """A child process whose output goes to a log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    url: str | None = None
    log_offset: int = 0
    """Where this run's output starts in the (appended) log file."""

    @classmethod
    def start(cls, name: str, argv: list[str], log_path: Path, env: dict | None = None) -> Process:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            offset = log.tell()
            popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, start_new_session=True,
                close_fds=True,
            )
        return cls(name, popen, log_path, log_offset=offset)

    @property
    def base_url(self) -> str:
        """The URL it serves at (from its ready line); an error for a process that has none."""
        if self.url is None:
            raise RuntimeError(f"{self.name} has no URL (not started as a server, or not ready)")
        return self.url

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        """This run's output only (earlier runs' stay above it in the file)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match:
        """Wait until the log matches `pattern`; returns the match."""
        found: list[re.Match] = []

        def check() -> bool:
            m = re.search(pattern, self.log_text())
            if m:
                found.append(m)
            return m is not None

        wait_for(check, timeout, f"{self.name} (waiting for /{pattern}/ in {self.log_path})", self)
        return found[0]

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the whole process group."""
        if self.alive():
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        return self.popen.returncode


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """Stop a process we did not spawn in this interpreter (dev down): TERM, then KILL."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    _signal_group(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return True
