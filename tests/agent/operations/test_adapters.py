"""LoRA adapters over one loaded base, against a real agent.

Real: an agent process serving the tiny MLX model, two LoRA adapters of it in mlx-lm's format
(`tinymodel.make_adapter`: seeded `lora_a`/`lora_b` on q and v), loaded over it through the
operations API and served by their own names; its `/v1/node` and its log.
"""

from __future__ import annotations

import time

import httpx
import pytest

from mlxpool.tinymodel import make_adapter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

OPS = "ops-secret-token"
AUTH = {"Authorization": f"Bearer {OPS}"}


@pytest.fixture(scope="module")
def adapter_agent(multi_model_agents):
    return multi_model_agents("adapter-agent", 4)


def node(agent) -> dict:
    return httpx.get(f"{agent.url}/v1/node", headers=AUTH, timeout=10).json()


def models(agent) -> dict[str, dict]:
    return {m["name"]: m for m in node(agent)["models"]}


def wait_models(agent, done, what: str, timeout: float = 60) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    seen: dict[str, dict] = {}
    while time.monotonic() < deadline:
        seen = models(agent)
        if done(seen):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"not {what} after {timeout}s: {seen}")


def complete(agent, name: str) -> dict:
    response = httpx.post(f"{agent.url}/v1/completions", json={
        "model": name, "prompt": "Hello there", "max_tokens": 4, "temperature": 0, "logprobs": 1}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_adapters_share_one_loaded_base_and_never_reload_it(adapter_agent, tiny_model, tmp_path):
    first, second = make_adapter(tiny_model, tmp_path / "a1", seed=1), make_adapter(tiny_model, tmp_path / "a2", seed=2)
    base = complete(adapter_agent, "tiny")
    # A base that is not loaded is named in a 400.
    refused = httpx.post(f"{adapter_agent.url}/v1/node/models", headers=AUTH, timeout=10,
                         json={"name": "x:a1", "path": str(first), "base": "nope"})
    assert refused.status_code == 400 and "nope" in refused.json()["error"]["message"], refused.text
    for name, path in (("tiny:a1", first), ("tiny:a2", second)):
        load = httpx.post(f"{adapter_agent.url}/v1/node/models", headers=AUTH, timeout=10,
                          json={"name": name, "path": str(path), "base": "tiny"})
        assert load.status_code == 202, load.text
    seen = wait_models(adapter_agent,
                       lambda m: all(m.get(n, {}).get("phase") == "ready" for n in ("tiny:a1", "tiny:a2")),
                       "both adapters ready")
    # Each adapter changes the output; the base answers as before.
    outputs = [complete(adapter_agent, n)["logprobs"] for n in ("tiny", "tiny:a1", "tiny:a2", "tiny:a1")]
    assert outputs[0] == base["logprobs"] and outputs[1] == outputs[3]
    assert len({repr(o) for o in outputs[:3]}) == 3
    # Only the adapters' tensors are new memory; the identity is the base's and the adapter's.
    tiny = seen["tiny"]
    for name in ("tiny:a1", "tiny:a2"):
        adapter = seen[name]
        assert adapter["base"] == "tiny" and adapter["tier"] == "active"
        assert 0 < adapter["memory_bytes"] < tiny["memory_bytes"] / 10, (adapter, tiny)
        assert adapter["identity"] not in (None, tiny["identity"])
    assert seen["tiny:a1"]["identity"] != seen["tiny:a2"]["identity"] and seen["tiny"]["base"] is None
    # The base was read once: one load line for it in the agent's log, two adapter lines over it.
    log = adapter_agent.log_path.read_text()[adapter_agent.log_offset:]
    assert log.count(f"model loaded path={tiny_model.resolve()} ") == 1, log[-3000:]
    assert log.count(f"base={tiny_model.resolve()} ") == 2
    # Unloading the base unloads its adapters first.
    assert httpx.delete(f"{adapter_agent.url}/v1/node/models/tiny", headers=AUTH, timeout=10).status_code == 200
    wait_models(adapter_agent, lambda m: not m, "everything unloaded")
