"""LoRA adapters over one loaded base, and shared tensors across separate models, against a real agent.

Real: an agent process serving the tiny MLX model, two LoRA adapters of it in mlx-lm's format
(`tinymodel.make_adapter`: seeded `lora_a`/`lora_b` on q and v), loaded over it through the
operations API and served by their own names; a fine-tune of it that changed one layer
(`tinymodel.make_variant(layers=...)`), loaded beside it; its `/v1/node`, `/metrics` and its log.
"""

from __future__ import annotations

import time

import httpx
import pytest

from mlxpool.tinymodel import make_adapter, make_variant

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


def complete(agent, name: str, prompt: str = "Hello there") -> dict:
    response = httpx.post(f"{agent.url}/v1/completions", json={
        "model": name, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 1}, timeout=60)
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


def load(agent, name: str, path) -> None:
    response = httpx.post(f"{agent.url}/v1/node/models", headers=AUTH, timeout=10,
                          json={"name": name, "path": str(path)})
    assert response.status_code == 202, response.text


def test_a_fine_tune_shares_its_equal_tensors_with_its_base_and_never_its_kv(adapter_agent, tiny_model, tmp_path):
    """Two separate models (the tiny model and a fine-tune of it whose layer 1 differs) hold
    their equal tensors as one copy; each answers as it does alone, and their identities
    (what KV state goes by) differ."""
    tuned = make_variant(tiny_model, tmp_path / "tuned", seed=5, scale=0.5, layers=[1])
    for name in list(models(adapter_agent)):  # start from an empty agent, whatever ran before
        httpx.delete(f"{adapter_agent.url}/v1/node/models/{name}", headers=AUTH, timeout=10)
    wait_models(adapter_agent, lambda m: not m, "everything unloaded")
    prompt = "Hello there, " * 12  # long enough for the prefix cache (and repeated below)
    load(adapter_agent, "tuned", tuned)
    alone = wait_models(adapter_agent, lambda m: m.get("tuned", {}).get("phase") == "ready", "tuned ready")["tuned"]
    assert alone["shared_bytes"] == 0 and node(adapter_agent)["shared_tensor_bytes_saved"] == 0
    tuned_alone = complete(adapter_agent, "tuned", prompt)["logprobs"]
    load(adapter_agent, "tiny", tiny_model)
    seen = wait_models(adapter_agent, lambda m: m.get("tiny", {}).get("phase") == "ready", "tiny ready")
    report = node(adapter_agent)
    tiny, tuned_state = seen["tiny"], seen["tuned"]
    # Everything but layer 1 (and norms equal within a model) came from the fine-tune's arrays:
    # the base's own memory is what differs; both report the shared bytes, once saved.
    saved = report["shared_tensor_bytes_saved"]
    assert saved == tiny["shared_bytes"] == tuned_state["shared_bytes"] > 0, (report, tiny)
    assert tiny["memory_bytes"] + saved == tuned_state["memory_bytes"], (tiny, tuned_state)
    assert 0.4 * tuned_state["memory_bytes"] < saved < 0.9 * tuned_state["memory_bytes"]
    assert f"mlxpool_shared_tensor_bytes_saved {float(saved)}" in httpx.get(f"{adapter_agent.url}/metrics").text
    log = adapter_agent.log_path.read_text()[adapter_agent.log_offset:]
    assert f"tensors shared path={tiny_model.resolve()} model=tiny " in log, log[-3000:]
    # Separate identities: neither is handed the other's KV; each answers as it did alone.
    assert tiny["identity"] != tuned_state["identity"]
    assert complete(adapter_agent, "tiny", prompt)["logprobs"] != tuned_alone
    assert complete(adapter_agent, "tuned", prompt)["logprobs"] == tuned_alone
    # The model that brought the tensors goes; the other keeps them (nothing saved any more).
    tiny_shared = complete(adapter_agent, "tiny", prompt)["logprobs"]
    assert httpx.delete(f"{adapter_agent.url}/v1/node/models/tuned", headers=AUTH, timeout=10).status_code == 200
    wait_models(adapter_agent, lambda m: "tuned" not in m, "tuned unloaded")
    assert node(adapter_agent)["shared_tensor_bytes_saved"] == 0
    assert complete(adapter_agent, "tiny", prompt)["logprobs"] == tiny_shared
