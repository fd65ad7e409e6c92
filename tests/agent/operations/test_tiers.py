"""Residency tiers against a real agent: parked (engine released, weights kept), woken by a request.

Real: an agent process serving the tiny MLX model and a second one (other weights), with one
engine slot and parking on (`multi_model.park`, the default: its config leaves it out),
driven through its operations API and OpenAI endpoints; its /metrics; its `/v1/node` report
read by the operator's placement (pure), which counts only active models as slots.
"""

from __future__ import annotations

import os

import httpx
import pytest

from mlxpool.agentapi import NodeReport
from mlxpool.operator.logic.placement import AgentView, Candidate, NodeView

OPS = "ops-secret-token"


@pytest.fixture(scope="module")
def tier_agent(multi_model_agents):
    return multi_model_agents("tier-agent", 1)


def node(agent) -> dict:
    return httpx.get(f"{agent.url}/v1/node", headers={"Authorization": f"Bearer {OPS}"}, timeout=10).json()


def tiers(agent) -> dict[str, tuple[str, str]]:
    return {m["name"]: (m["phase"], m["tier"]) for m in node(agent)["models"]}


def wait_tiers(agent, want: dict[str, tuple[str, str]], timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    seen = {}
    while time.monotonic() < deadline:
        seen = tiers(agent)
        if seen == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"tiers not {want} after {timeout}s: {seen}")


def complete(agent, name: str) -> dict:
    response = httpx.post(f"{agent.url}/v1/completions", json={
        "model": name, "prompt": "Hello there", "max_tokens": 4, "temperature": 0, "logprobs": 1}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_a_model_that_loses_its_slot_is_parked_and_a_request_wakes_it(tier_agent, second_model):
    before = complete(tier_agent, "tiny")
    load = httpx.post(f"{tier_agent.url}/v1/node/models", headers={"Authorization": f"Bearer {OPS}"},
                      json={"name": "other", "path": str(second_model)}, timeout=10)
    assert load.status_code == 202, load.text
    # One engine slot: tiny is parked (still listed, still served), not unloaded.
    wait_tiers(tier_agent, {"tiny": ("ready", "parked"), "other": ("ready", "active")})
    served = {m["id"] for m in httpx.get(f"{tier_agent.url}/v1/models", timeout=10).json()["data"]}
    assert served == {"tiny", "other"}
    # The operator sees two models held and one engine slot taken (of one): parked is not a slot.
    seen = Candidate(view=NodeView(name="n", endpoint=tier_agent.url, labels={}, ready=True, heartbeat=None,
                                   free_memory_bytes=None, models=frozenset()),
                     agent=AgentView.from_report(NodeReport.model_validate(node(tier_agent))))
    assert (len(seen.agent.models), seen.model_slots_used, seen.max_models) == (2, 1, 1)
    # A request wakes tiny (other is parked in its place) and answers as before parking: same weights.
    after = complete(tier_agent, "tiny")
    assert (after["text"], after["logprobs"]) == (before["text"], before["logprobs"])
    wait_tiers(tier_agent, {"tiny": ("ready", "active"), "other": ("ready", "parked")})
    assert complete(tier_agent, "other")["text"]
    wait_tiers(tier_agent, {"tiny": ("ready", "parked"), "other": ("ready", "active")})
    metrics = httpx.get(f"{tier_agent.url}/metrics", timeout=10).text
    woken = [line for line in metrics.splitlines()
             if line.startswith('mlxpool_model_switch_seconds_count{tier="parked"}')]
    assert woken and float(woken[0].split()[-1]) >= 2
    # Each says its last switch into an engine: both were woken (other after its load).
    last = {m["name"]: (m["last_switch_from"], m["last_switch_seconds"]) for m in node(tier_agent)["models"]}
    assert {name: where for name, (where, _) in last.items()} == {"tiny": "parked", "other": "parked"}
    assert all(0 < seconds < 5 for _, seconds in last.values()), last
    assert httpx.get(f"{tier_agent.url}/ready", timeout=10).status_code == 200  # parked is not unhealthy
    gone = httpx.delete(f"{tier_agent.url}/v1/node/models/other", headers={"Authorization": f"Bearer {OPS}"},
                        timeout=10)
    assert gone.status_code == 200
    wait_tiers(tier_agent, {"tiny": ("ready", "parked")})
    assert complete(tier_agent, "tiny")["text"] == before["text"]
    wait_tiers(tier_agent, {"tiny": ("ready", "active")})


def test_a_prefetched_model_loads_from_the_page_cache(tier_agent, tmp_path):
    from mlxpool.agent.operations import filetiers
    from mlxpool.tinymodel import make_tiny

    auth = {"Authorization": f"Bearer {OPS}"}
    announced = make_tiny(tmp_path / "announced", seed=7)
    for path in filetiers.weight_files(announced):  # written pages are dirty: flush them, then drop
        with path.open("rb+") as f:
            os.fsync(f.fileno())
    filetiers.drop(announced)
    assert filetiers.tier_of(announced).value == "disk"
    refused = httpx.post(f"{tier_agent.url}/v1/node/prefetch", headers=auth, json={"path": "relative/dir"}, timeout=10)
    assert refused.status_code == 400 and "absolute" in refused.json()["error"]["message"], refused.text
    started = httpx.post(f"{tier_agent.url}/v1/node/prefetch", headers=auth, json={"path": str(announced)}, timeout=10)
    assert started.status_code == 202 and started.json()["phase"] in ("prefetching", "warm"), started.text
    import time

    deadline, state = time.monotonic() + 30, {}
    while time.monotonic() < deadline:
        state = next(p for p in node(tier_agent)["prefetches"] if p["path"] == str(announced.resolve()))
        if state["phase"] != "prefetching":
            break
        time.sleep(0.05)
    assert state["phase"] == "warm" and state["bytes"] > 0 and state["seconds"] >= 0, state
    assert filetiers.tier_of(announced).value == "page_cache"  # read, not loaded: nothing in an engine
    assert "announced" not in tiers(tier_agent)
    load = httpx.post(f"{tier_agent.url}/v1/node/models", headers=auth,
                      json={"name": "announced", "path": str(announced)}, timeout=10)
    assert load.status_code == 202, load.text
    wait_tiers(tier_agent, {"tiny": ("ready", "parked"), "announced": ("ready", "active")})
    loaded = next(m for m in node(tier_agent)["models"] if m["name"] == "announced")
    assert loaded["last_switch_from"] == "page_cache", loaded
    assert httpx.delete(f"{tier_agent.url}/v1/node/models/announced", headers=auth, timeout=10).status_code == 200
