"""Reliability and security suites: hostile input, limits, staging faults, access.

Real here, all of it: agent processes (`python -m mlxpool agent`) serving the tiny MLX
model made by `mlxpool.tinymodel`, and router processes (`python -m mlxpool router`)
following a routes file that lists them, each on 127.0.0.1 on a port it picked, stopped
after. Nothing is faked: these suites exist to show what users would see.

One `stack` per session (an agent with an API key and an ops token, and a router over it)
for the suites that leave it as they found it keeps them inside their share of `make test`;
suites that kill or restart processes start their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mlxpool.dev import components
from mlxpool.dev.processes import Process
from mlxpool.routing import RouteEndpoint, RoutingTable

API_KEY = "sk-test-reliability-0123456789"
OPS_TOKEN = "ops-test-reliability-9876543210"
MODEL = "tiny"


@dataclass
class Stack:
    agent: Process
    router: Process
    routes: Path
    log_dir: Path
    model: str = MODEL

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {API_KEY}"}

    @property
    def ops(self) -> dict[str, str]:
        return {"authorization": f"Bearer {OPS_TOKEN}"}

    revision: int = 1

    def set_routes(self, urls: list[str]) -> None:
        """Rewrite the router's table (a pool scaled to len(urls) endpoints)."""
        self.revision += 1
        write_routes(self.routes, urls, self.revision)


def write_routes(path: Path, urls: list[str], revision: int) -> None:
    table = RoutingTable(pool="reliability", namespace="default", revision=revision, models={
        MODEL: [RouteEndpoint(node=f"node-{i}", url=url) for i, url in enumerate(urls)],
    })
    tmp = path.with_suffix(".tmp")
    tmp.write_text(table.to_json())
    tmp.replace(path)  # the router never reads half a file


def wait_routed(router_url: str, headers: dict[str, str], timeout: float = 15.0) -> None:
    """Until the router forwards a completion (its table is loaded and lists the agents)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        reply = httpx.post(router_url + "/v1/completions", headers=headers, timeout=10,
                           json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
        if reply.status_code == 200:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"router never routed: {reply.status_code} {reply.text}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("reliability")
    keys, ops = log_dir / "api-keys", log_dir / "ops-token"
    keys.write_text(API_KEY + "\n")
    ops.write_text(OPS_TOKEN + "\n")
    agent = components.start_agent(tiny_model, log_dir, ops_token_file=ops,
                                   extra=["--api-key-file", str(keys), "--max-tokens-default", "4"])
    routes = log_dir / "routes.json"
    try:
        write_routes(routes, [agent.url], 1)
        router = components.start_router(log_dir, routes_file=routes)
    except BaseException:
        agent.stop()
        raise
    try:
        stack = Stack(agent, router, routes, log_dir)
        wait_routed(router.url, stack.auth)
        yield stack
    finally:
        router.stop(10)
        agent.stop(10)
    # Everything the suites made these processes write: no secret in it.
    produced = "".join(p.read_text(errors="replace") for p in log_dir.rglob("*.log"))
    for secret in (API_KEY, OPS_TOKEN):
        assert secret not in produced, "a secret leaked into the agent's or the router's log"
