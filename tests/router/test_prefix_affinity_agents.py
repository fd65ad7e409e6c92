"""Prefix affinity against real agents: their prefix caches are what it is for.

Unlike the rest of this folder nothing is faked here: two `mlxpool agent` processes
serving the tiny model and one `mlxpool router` process following a routes file, all on
127.0.0.1, started and stopped by the test. The agents' own /metrics count the prefix
cache hits; the router names the answering node in `x-mlxpool-endpoint`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from mlxpool.dev.components import start_agent, start_router
from mlxpool.dev.processes import Process, wait_for
from mlxpool.dev.scraping import metric_total
from mlxpool.routing import RouteEndpoint, RoutingTable

from .conftest import write_atomically

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GROUPS, ROUNDS = 4, 4


def system_prompt(tag: str) -> str:
    """Several hundred characters, far over the 16 tokens an agent reuses; `tag` opens it, so prompts of
    different tags share fewer than 16 tokens and never hit each other's cache."""
    return f"{tag}: " + " ".join(f"rule {i} of {tag} says keep answers short and kind." for i in range(14))


def cache_hits(agent: Process) -> float:
    return metric_total(agent.url, "mlxpool_prompt_cache_hits_total")


def send_traffic(router: Process, model: str, tag: str) -> dict[int, list[str]]:
    """GROUPS x ROUNDS sequential completions, groups interleaved; the nodes that answered each group.

    Round r sends the groups rotated by r, so round-robin over two agents alternates every
    group's agent (position parity changes per round) instead of pinning it by accident.
    """
    systems = [system_prompt(f"group {g} ({tag})") for g in range(GROUPS)]
    answered: dict[int, list[str]] = defaultdict(list)
    with httpx.Client(base_url=router.url, timeout=60, trust_env=False) as client:
        for r in range(ROUNDS):
            for k in range(GROUPS):
                g = (k + r) % GROUPS
                response = client.post("/v1/completions", json={
                    "model": model, "prompt": f"{systems[g]}\nQuestion {r}: what is rule {r}?",
                    "max_tokens": 2, "temperature": 0})
                assert response.status_code == 200, response.text
                answered[g].append(response.headers["x-mlxpool-endpoint"])
    return answered


def use_strategy(routes: Path, router: Process, model: str, agents: dict[str, Process], strategy: str,
                 revision: int) -> None:
    table = RoutingTable(pool="pool", namespace="ns", revision=revision, strategy=strategy, models={
        model: [RouteEndpoint(node=node, url=agent.url) for node, agent in agents.items()]})
    write_atomically(routes, table.to_json())
    wait_for(lambda: httpx.get(f"{router.url}/ready", timeout=5).json() == {
        "status": "ready", "revision": revision, "strategy": strategy}, 20, f"router on revision {revision}", router)


def test_prefix_affinity_turns_shared_prefixes_into_cache_hits(tiny_model: Path, tmp_path: Path):
    logs, routes, model = tmp_path / "logs", tmp_path / "routes.json", tiny_model.name
    with contextlib.ExitStack() as stack:
        def started(proc: Process) -> Process:
            stack.callback(proc.stop)
            return proc

        agents = {n: started(start_agent(tiny_model, logs, name=f"agent-{n}")) for n in ("a", "b")}
        router = started(start_router(logs, routes_file=routes))

        use_strategy(routes, router, model, agents, "prefix-affinity", revision=1)
        before = sum(cache_hits(a) for a in agents.values())
        answered = send_traffic(router, model, "affinity")
        affinity_hits = sum(cache_hits(a) for a in agents.values()) - before

        assert all(len(set(nodes)) == 1 for nodes in answered.values()), answered
        assert {nodes[0] for nodes in answered.values()} == {"a", "b"}, "new prefixes spread over both agents"
        assert affinity_hits >= GROUPS * (ROUNDS - 1)  # every request after a group's first

        # The same traffic (new prefixes, so nothing is cached yet) under round-robin.
        use_strategy(routes, router, model, agents, "round-robin", revision=2)
        before = sum(cache_hits(a) for a in agents.values())
        answered = send_traffic(router, model, "round-robin")
        round_robin_hits = sum(cache_hits(a) for a in agents.values()) - before

        assert all(set(nodes) == {"a", "b"} for nodes in answered.values()), answered
        assert round_robin_hits < affinity_hits
