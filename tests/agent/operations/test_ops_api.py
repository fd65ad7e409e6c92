"""The operations API against real agent processes serving the tiny MLX models.

One agent is shared by the module (`tiny` from the command line, `max_models: 2`, parking
off so a model that loses its slot is unloaded (test_tiers.py has parking on), its
own cache directory, HF_ENDPOINT at the module's model server); every test leaves it
as it found it: only `tiny` loaded, the cache empty.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

JSON = {"Content-Type": "application/json"}


def visible_files(directory: Path) -> list[Path]:
    """The model's files as staging sees them: hidden ones (the content-identity cache an agent
    writes beside the files it loaded) are never staged."""
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))



@pytest.fixture(scope="module")
def ops_agent(tiny_model: Path, ops_token_file: Path, module_model_server, tmp_path_factory) -> Iterator:
    workdir = tmp_path_factory.mktemp("ops-agent")
    config = workdir / "runtime.yaml"
    config.write_text("multi_model:\n  max_models: 2\n  park: false\n  unload_timeout_seconds: 10\n")
    with pytest.MonkeyPatch.context() as env:  # the agent inherits the environment it starts with
        env.setenv("HF_ENDPOINT", module_model_server.url)
        env.setenv("HF_TOKEN", "hf_module_token")
        from mlxpool.dev import components

        agent = components.start_agent(tiny_model, workdir / "logs", name="ops-agent", extra=[
            "--ops-token-file", str(ops_token_file), "--cache-dir", str(workdir / "cache"),
            "--config", str(config), "--max-tokens-default", "8",
        ], timeout=60)
    yield agent
    agent.stop(10)


@pytest.fixture
def client(ops_agent, ops) -> Iterator[httpx.Client]:
    c = ops(ops_agent)
    yield c
    # Leave the agent as the next test expects it: `tiny` only (unpinned), the cache empty.
    for model in c.get("/v1/node").json()["models"]:
        if model["name"] != "tiny":
            c.delete(f"/v1/node/models/{model['name']}")
    c.post("/v1/node/models", json={"name": "tiny", "path": _tiny_path(c), "pin": False})
    wait_for(c, lambda node: [m["name"] for m in node["models"]] == ["tiny"], "only tiny loaded")
    for entry in c.get("/v1/node/cache").json():
        c.delete(f"/v1/node/cache/{entry['key']}")


def _tiny_path(c: httpx.Client) -> str:
    return next(m["path"] for m in c.get("/v1/node").json()["models"] if m["name"] == "tiny")


def wait_for(c: httpx.Client, check, what: str, timeout: float = 30) -> dict:
    import time

    deadline = time.monotonic() + timeout
    node = {}
    while time.monotonic() < deadline:
        node = c.get("/v1/node").json()
        if check(node):
            return node
        time.sleep(0.05)
    raise AssertionError(f"{what}: not after {timeout}s; node: {node}")


def model(node: dict, name: str) -> dict | None:
    return next((m for m in node["models"] if m["name"] == name), None)


def entry_of(c: httpx.Client, key: str) -> dict:
    return c.get(f"/v1/node/cache/{key}").json()


def wait_entry(c: httpx.Client, key: str, phases: tuple[str, ...], timeout: float = 30) -> dict:
    import time

    deadline = time.monotonic() + timeout
    entry = {}
    while time.monotonic() < deadline:
        entry = entry_of(c, key)
        if entry.get("phase") in phases:
            return entry
        time.sleep(0.05)
    raise AssertionError(f"cache entry {key} not {phases} after {timeout}s: {entry}")


def complete(agent, name: str) -> httpx.Response:
    return httpx.post(f"{agent.url}/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 4,
                                                            "temperature": 0, "logprobs": 1}, timeout=30)


# ---- auth ----


def test_the_ops_api_needs_the_token(ops_agent, ops):
    for token in (None, "wrong-token"):
        response = ops(ops_agent, token=token).get("/v1/node")
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    # Unauthenticated callers learn nothing, not even whether their body was valid.
    assert ops(ops_agent, token=None).post("/v1/node/models", content=b"{not json").status_code == 401
    assert httpx.get(f"{ops_agent.url}/health").status_code == 200


def test_the_ops_api_is_off_without_a_token(start_agent_process, ops, tmp_path):
    env = dict.fromkeys(("MLXPOOL_OPS_TOKEN",), "")
    agent = start_agent_process(["--cache-dir", str(tmp_path / "cache")], env=env)
    response = ops(agent).get("/v1/node")
    assert response.status_code == 403
    assert "--ops-token-file" in response.json()["error"]["message"]


# ---- the node report ----


def test_the_node_report_says_who_the_node_is_and_what_it_holds(ops_agent, client):
    node = client.get("/v1/node").json()
    assert node["endpoint"] == ops_agent.url and node["name"]
    assert node["hardware"]["cpu_cores"] >= 1 and node["hardware"]["memory_bytes"] > 0
    assert node["hardware"]["accelerator"] in ("cpu", "metal")
    assert node["max_models"] == 2 and node["free_memory_bytes"] > 0
    (tiny,) = node["models"]
    assert tiny["name"] == "tiny" and tiny["phase"] == "ready" and tiny["memory_bytes"] > 0
    assert tiny["load_time_seconds"] > 0 and tiny["pinned"] is False
    assert node["cache"] == [] and node["queue"] == {"running": 0, "waiting": 0}
    assert node["agent_version"] and node["scheduling"] == {}
    # How the weights came in (the native reader, copied once) and where they are now.
    weights = tiny["weights"]
    assert weights["reader"] == "native" and weights["transfer"] == "copy" and weights["files"] == 1
    assert weights["load_bytes"] == tiny["memory_bytes"] and weights["load_gbps"] > 0
    assert weights["pin_policy"] == "critical" and weights["prefetch_threads"] == 2
    assert weights["total_bytes"] == tiny["memory_bytes"] and weights["mapped_bytes"] == 0
    assert 0 < weights["resident_bytes"] <= weights["total_bytes"]
    if weights["pin_message"] is None:  # this host let us lock (tiny's 2 layers are all critical)
        assert weights["pinned_bytes"] >= weights["total_bytes"]  # whole pages
    metrics = httpx.get(f"{ops_agent.url}/metrics").text
    assert 'mlxpool_model_weight_bytes{model_name="tiny",state="resident"}' in metrics
    assert 'mlxpool_model_load_gbps{model_name="tiny",reader="native",transfer="copy"}' in metrics


# ---- scheduling policies (a pool's spec.scheduling) ----


def test_a_scheduling_policy_is_applied_reported_and_removed(ops_agent, client):
    policy = {"default_priority": "low", "tiers": [{"priority": "critical", "ttft_target_ms": 400, "preempt": True}]}
    r = client.put("/v1/node/scheduling/tiny", json=policy)
    assert r.status_code == 200, r.text
    applied = client.get("/v1/node").json()["scheduling"]["tiny"]
    assert applied["default_priority"] == "low" and applied["tiers"][0]["ttft_target_ms"] == 400
    assert client.get("/v1/node/scheduling/tiny").json() == applied
    # In force for the next request: one that names no tier runs as `low`.
    assert complete(ops_agent, "tiny").status_code == 200
    metrics = httpx.get(f"{ops_agent.url}/metrics", timeout=10).text
    assert 'mlxpool_requests_total{model_name="tiny",outcome="length",priority="low"}' in metrics
    # A policy may name a model that is not loaded yet: kept for when it is.
    assert client.put("/v1/node/scheduling/later", json={"default_priority": "high"}).status_code == 200
    assert client.delete("/v1/node/scheduling/later").status_code == 200
    assert client.delete("/v1/node/scheduling/tiny").status_code == 200
    assert client.get("/v1/node").json()["scheduling"] == {}
    r = client.get("/v1/node/scheduling/tiny")
    assert r.status_code == 404 and r.json()["error"]["code"] == "scheduling_policy_not_found"


@pytest.mark.parametrize(("policy", "needle"), [
    ({"tiers": [{"priority": "urgent"}]}, "'critical', 'high', 'normal', 'low' or 'background'"),
    ({"default_priority": "vip"}, "'critical', 'high', 'normal', 'low' or 'background'"),
    ({"tiers": [{"priority": "low"}, {"priority": "low"}]}, "each priority may be listed once"),
    ({"tiers": [{"priority": "low", "ttft_target_ms": 0}]}, "ttft_target_ms"),
    ({"tiers": [{"priority": "low", "max_queue_depth": -1}]}, "max_queue_depth"),
    ({"tiers": [{"priority": "low", "speed": 1}]}, "speed"),
])
def test_a_bad_scheduling_policy_is_a_400_naming_what_is_wrong(client, policy, needle):
    r = client.put("/v1/node/scheduling/tiny", json=policy)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"], r.json()
    assert client.get("/v1/node").json()["scheduling"] == {}


# ---- models ----


def test_load_serve_and_unload_a_second_model(ops_agent, client, second_model):
    response = client.post("/v1/node/models", json={"name": "other", "path": str(second_model)})
    assert response.status_code == 202, response.text
    assert response.json()["phase"] in ("loading", "warming", "ready")
    wait_for(client, lambda n: (model(n, "other") or {}).get("phase") == "ready", "other ready")
    first, second = complete(ops_agent, "tiny"), complete(ops_agent, "other")
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json()["model"] == "tiny" and second.json()["model"] == "other"
    # Other weights: other log-probabilities for the same prompt.
    assert first.json()["choices"][0]["logprobs"] != second.json()["choices"][0]["logprobs"]
    served = {m["id"] for m in httpx.get(f"{ops_agent.url}/v1/models").json()["data"]}
    assert served == {"tiny", "other"}
    again = client.post("/v1/node/models", json={"name": "other", "path": str(second_model)})
    assert again.status_code == 200 and again.json()["phase"] == "ready"  # repeating is safe
    gone = client.delete("/v1/node/models/other")
    assert gone.status_code == 200 and gone.json()["phase"] == "unloading"
    wait_for(client, lambda n: model(n, "other") is None, "other unloaded")
    response = complete(ops_agent, "other")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert complete(ops_agent, "tiny").status_code == 200
    assert client.delete("/v1/node/models/other").status_code == 404


def test_a_full_node_evicts_the_least_recently_used_model_or_refuses(ops_agent, client, second_model):
    client.post("/v1/node/models", json={"name": "b", "path": str(second_model)})
    wait_for(client, lambda n: (model(n, "b") or {}).get("phase") == "ready", "b ready")
    assert complete(ops_agent, "tiny").status_code == 200  # tiny used last: b is the LRU one
    response = client.post("/v1/node/models", json={"name": "c", "path": str(second_model)})
    assert response.status_code == 202, response.text
    node = wait_for(client, lambda n: (model(n, "c") or {}).get("phase") == "ready" and model(n, "b") is None,
                    "c loaded in b's place")
    assert sorted(m["name"] for m in node["models"]) == ["c", "tiny"]
    # Pin both: nothing can be evicted, so a third model is refused, naming why.
    client.post("/v1/node/models", json={"name": "c", "path": str(second_model), "pin": True})
    pinned = client.post("/v1/node/models", json={"name": "tiny", "path": _tiny_path(client), "pin": True})
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    refused = client.post("/v1/node/models", json={"name": "d", "path": str(second_model)})
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "max_models_reached" and "pinned: c, tiny" in error["message"]


# ---- the cache ----


def test_stage_over_http_warm_load_from_the_cache_then_delete(ops_agent, client, module_model_server,
                                                              tiny_model):
    url = module_model_server.add("tiny", tiny_model)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in visible_files(tiny_model)}
    module_model_server.chunk_delay = 0.05
    try:
        staged = client.put("/v1/node/cache/tiny-http", json={"source": url, "digests": digests, "warm": True})
        assert staged.status_code == 202 and staged.json()["phase"] == "Pending"
        seen = []
        while (entry := entry_of(client, "tiny-http"))["phase"] not in ("Warm", "Failed"):
            seen.append(entry)
        assert entry["phase"] == "Warm", entry
    finally:
        module_model_server.chunk_delay = 0
    assert any(e["phase"] == "Downloading" and 0 < e["progress"] < 1 for e in seen), seen
    assert entry["bytes_done"] == entry["bytes_total"] == sum(p.stat().st_size for p in visible_files(tiny_model))
    assert entry["load_time_seconds"] is not None and entry["progress"] == 1.0
    assert client.put("/v1/node/cache/tiny-http", json={"source": url, "digests": digests, "warm": True}
                      ).json()["phase"] == "Warm"  # idempotent
    listed = client.get("/v1/node").json()["cache"]
    assert [e["key"] for e in listed] == ["tiny-http"]

    loaded = client.post("/v1/node/models", json={"name": "cached", "cache_key": "tiny-http"})
    assert loaded.status_code == 202, loaded.text
    wait_for(client, lambda n: (model(n, "cached") or {}).get("phase") == "ready", "cached ready")
    assert complete(ops_agent, "cached").status_code == 200
    refused = client.delete("/v1/node/cache/tiny-http")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "cache_in_use"
    assert "cached" in refused.json()["error"]["message"]
    client.delete("/v1/node/models/cached")
    wait_for(client, lambda n: model(n, "cached") is None, "cached unloaded")
    deleted = client.delete("/v1/node/cache/tiny-http")
    assert deleted.status_code == 200 and deleted.json()["key"] == "tiny-http"
    assert not Path(entry["path"]).exists()
    assert client.get("/v1/node/cache/tiny-http").status_code == 404
    assert client.delete("/v1/node/cache/tiny-http").status_code == 404


def test_stage_from_the_hub_protocol(ops_agent, client, module_model_server, tiny_model):
    module_model_server.add("org/tiny", tiny_model)
    client.put("/v1/node/cache/hub-tiny", json={"source": "hf://org/tiny", "revision": "main"})
    entry = wait_entry(client, "hub-tiny", ("Cached", "Failed"))
    assert entry["phase"] == "Cached", entry
    names = sorted(p.name for p in visible_files(tiny_model))
    assert sorted(p.name for p in visible_files(Path(entry["path"]))) == names
    hub_calls = [(p, h) for _, p, h in module_model_server.requests if p.startswith("/api/models/org/tiny")]
    assert hub_calls and hub_calls[-1][0] == "/api/models/org/tiny/revision/main"
    assert hub_calls[-1][1].get("Authorization") == "Bearer hf_module_token"


def test_a_digest_mismatch_fails_naming_the_file(ops_agent, client, tiny_model):
    digests = {"model.safetensors": "f" * 64}
    client.put("/v1/node/cache/bad-digest", json={"source": f"file://{tiny_model}", "digests": digests})
    entry = wait_entry(client, "bad-digest", ("Cached", "Failed"))
    assert entry["phase"] == "Failed" and "sha256 mismatch for model.safetensors" in entry["message"]
    refused = client.post("/v1/node/models", json={"name": "x", "cache_key": "bad-digest"})
    assert refused.status_code == 409 and refused.json()["error"]["param"] == "cache_key"


@pytest.mark.parametrize(("method", "path", "body", "status", "param", "words"), [
    ("POST", "/v1/node/models", {"name": "x"}, 400, None, "exactly one of path and cache_key"),
    ("POST", "/v1/node/models", {"name": "x", "path": "/m", "cache_key": "k"}, 400, None, "exactly one"),
    ("POST", "/v1/node/models", {"name": "", "path": "/m"}, 400, "name", "at least 1 character"),
    ("POST", "/v1/node/models", {"name": "x", "path": "relative"}, 400, "path", "absolute"),
    ("POST", "/v1/node/models", {"name": "x", "path": "/nonexistent"}, 400, "path", "not a directory"),
    ("POST", "/v1/node/models", {"name": "x", "path": "/m", "warm": "maybe"}, 400, "warm", "boolean"),
    ("POST", "/v1/node/models", {"name": "x", "cache_key": "absent"}, 404, "cache_key", "no cache entry"),
    ("POST", "/v1/node/models", {"name": "x", "path": "/m", "extra": 1}, 400, "extra", "not permitted"),
    ("POST", "/v1/node/models", b"{oops", 400, None, "not valid JSON"),
    ("POST", "/v1/node/models", {"name": "x", "path": "/m", "owner": ""}, 400, "owner", "at least 1 character"),
    ("PUT", "/v1/node/cache/Bad_Key", {"source": "file:///m"}, 400, "key", "not a cache key"),
    ("PUT", "/v1/node/cache/k", {"source": "s3://bucket/m"}, 400, "source", "should match pattern"),
    ("PUT", "/v1/node/cache/k", {"source": "file:///m", "revision": "main"}, 400, "revision", "hf:// sources"),
    ("PUT", "/v1/node/cache/k", {"source": "hf://org/a/b"}, 400, "source", "hf://org/repo"),
    ("PUT", "/v1/node/cache/k", {"source": "hf://o/m", "digests": {"w": "123"}}, 400, "digests.w", "64 hex"),
    ("PUT", "/v1/node/cache/k", {"source": "hf://o/m", "digests": {"../x": "a" * 64}}, 400, "digests.../x",
     "inside the model directory"),
    ("PUT", "/v1/node/cache/k", {}, 400, "source", "Field required"),
    ("GET", "/v1/node/cache/absent", None, 404, "key", "no cache entry"),
    ("DELETE", "/v1/node/cache/absent", None, 404, "key", "no cache entry"),
    ("DELETE", "/v1/node/models/absent", None, 404, "name", "not on this node"),
])
def test_bad_requests_answer_4xx_naming_the_field(client, method, path, body, status, param, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    response = client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert complete_ok(client)


def complete_ok(client: httpx.Client) -> bool:
    """The agent keeps serving after a bad request."""
    return client.get("/v1/node").status_code == 200


# ---- an empty agent, under a memory-lock limit ----


def memlock_forbidden_prefix() -> list[str]:
    prefix = ["prlimit", "--memlock=4096:4096"]
    if os.geteuid() == 0:  # root ignores RLIMIT_MEMLOCK unless CAP_IPC_LOCK is gone
        prefix = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", *prefix]
    return prefix


@pytest.mark.skipif(not (sys.platform == "linux" and shutil.which("prlimit") and shutil.which("setpriv")),
                    reason="needs Linux prlimit and setpriv to forbid mlock")
def test_an_empty_agent_is_told_what_to_serve_and_says_when_it_cannot_pin(
        start_agent_process, ops, ops_token_file, tiny_model, tmp_path):
    agent = start_agent_process(["--ops-token-file", str(ops_token_file), "--cache-dir", str(tmp_path / "cache")],
                                prefix=memlock_forbidden_prefix())
    c = ops(agent)
    assert c.get("/v1/node").json()["models"] == []
    assert httpx.get(f"{agent.url}/ready").status_code == 200  # nothing to load: ready for orders
    c.put("/v1/node/cache/tiny", json={"source": f"file://{tiny_model}", "pin": True})
    entry = wait_entry(c, "tiny", ("Warm", "Pinned", "Failed"))
    assert entry["phase"] == "Warm", entry  # not Pinned: the OS refused, and the entry says so
    assert "RLIMIT_MEMLOCK is 4096 bytes" in entry["message"] and "CAP_IPC_LOCK" in entry["message"]
    c.post("/v1/node/models", json={"name": "tiny", "cache_key": "tiny", "warm": False})
    wait_for(c, lambda n: (model(n, "tiny") or {}).get("phase") == "ready", "tiny ready")
    assert complete(agent, "tiny").status_code == 200
