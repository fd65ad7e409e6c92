"""A router restarted under load, real processes: clients keep asking one port while the
router behind it is replaced.

Handover (`--reuse-port`): the new router joins the port (it listens only once its
routing table is loaded), then the old one gets SIGTERM and drains; the clients see at
most a second of errors (here: none expected, a reset in the old one's accept queue at
worst). A plain restart (stop, then start) is measured too: for as long as the new
process takes to start, connections are refused, never answered wrongly, and service
comes back by itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from mlxpool.dev import components
from mlxpool.dev.processes import free_port

pytestmark = pytest.mark.integration

CLIENTS = 3
MAX_PER_CLIENT = 3000  # the loop is bounded in count as well as in time


@dataclass
class Load:
    """Clients asking `url` for completions in a loop until stopped, each outcome recorded."""

    url: str
    headers: dict[str, str]
    model: str
    outcomes: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, "200" | error)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        self.threads = [threading.Thread(target=self._client, args=(deadline,)) for _ in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def _client(self, deadline: float) -> None:
        body = {"model": self.model, "prompt": "hi", "max_tokens": 2}
        with httpx.Client(timeout=10) as client:  # keep-alive, as real clients do
            for _ in range(MAX_PER_CLIENT):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                start = time.monotonic()
                try:
                    kind = str(client.post(self.url + "/v1/completions", headers=self.headers, json=body).status_code)
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                self.outcomes.append((start, time.monotonic(), kind))
                if kind != "200":
                    time.sleep(0.02)  # a refused port answers at once: do not spin

    def ok_after(self, when: float) -> int:
        return sum(1 for start, _, kind in list(self.outcomes) if start > when and kind == "200")

    def wait_ok_after(self, when: float, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.ok_after(when) < count:
            assert time.monotonic() < deadline, f"no service: last outcomes {self.outcomes[-5:]}"
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)
        assert not any(t.is_alive() for t in self.threads), "a client hung"

    def errors(self, since: float = float("-inf"), until: float = float("inf")) -> list[tuple[float, float, str]]:
        return [o for o in self.outcomes if o[2] != "200" and since <= o[0] <= until]


def error_span(errors: list[tuple[float, float, str]]) -> float:
    """Seconds from the first failed request's start to the last one's end (0: none failed)."""
    return max(e[1] for e in errors) - min(e[0] for e in errors) if errors else 0.0


def test_router_restarted_under_load(stack):
    port = free_port()
    logs = stack.log_dir
    old = components.start_router(logs, routes_file=stack.routes, name="router-old", port=port,
                                  extra=["--reuse-port"])
    new = restarted = None
    load = Load(f"http://127.0.0.1:{port}", stack.auth, stack.model)
    try:
        load.start(seconds=90)
        load.wait_ok_after(0, 10, 20)

        # Handover: the new router joins the port, then the old one drains and exits.
        handover = time.monotonic()
        new = components.start_router(logs, routes_file=stack.routes, name="router-new", port=port,
                                      extra=["--reuse-port"])
        old.stop(10)
        old_gone = time.monotonic()
        load.wait_ok_after(old_gone, 10, 20)
        handover_errors = load.errors(handover)
        assert error_span(handover_errors) <= 1.0, handover_errors

        # A plain restart: nobody holds the port until the new process listens.
        new.stop(10)
        stopped = time.monotonic()
        restarted = components.start_router(logs, routes_file=stack.routes, name="router-restarted", port=port)
        load.wait_ok_after(time.monotonic(), 10, 20)
        cold_errors = load.errors(stopped)
        # What users see meanwhile: refused connections (or a 503 before the table loads),
        # never a hang or a wrong answer; and it comes back by itself.
        assert {e[2] for e in cold_errors} <= {"ConnectError", "RemoteProtocolError", "ReadError", "503"}, cold_errors
        load.finish()
    finally:
        load.stop.set()
        for proc in (old, new, restarted):
            if proc is not None:
                proc.stop(10)
    served = sum(1 for o in load.outcomes if o[2] == "200")
    print(f"router handover (--reuse-port): {len(handover_errors)} failed request(s) over "
          f"{error_span(handover_errors):.2f}s; plain restart: {len(cold_errors)} failed over "
          f"{error_span(cold_errors):.2f}s ({sorted({e[2] for e in cold_errors})}); {served} served in all")
