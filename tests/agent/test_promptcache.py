"""The prompt cache's fleet-wide tier: prompt KV state shared between agents through Redis.

Pure parts alone (prefix hashes, boundaries, the local-only cache, the KV codec on real
MLX arrays), then real agent processes serving the tiny model and a real redis-server
(tests/conftest.py): what one agent prefilled, another fetches and generates the same
tokens from; with Redis gone, agents serve as if sharing were off.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlxpool.agent.config import DistributedCache
from mlxpool.agent.engine import kvcodec
from mlxpool.agent.serving.promptcache import FleetPromptCache, PromptCache, boundary_hashes
from mlxpool.dev.processes import free_port, wait_for
from mlxpool.dev.scraping import metric_total
from mlxpool.tinymodel import make_variant

# ---- pure parts ----


def test_boundary_hashes_name_prefixes_of_one_model():
    a = boundary_hashes("m", list(range(100)), 16, 100)
    b = boundary_hashes("m", [*range(40), 999, *range(41, 100)], 16, 100)
    assert len(a) == 6  # 16, 32, ..., 96
    assert a[:2] == b[:2] and a[2:] != b[2:] and not set(a[2:]) & set(b[2:])  # they part at token 40
    assert not set(a) & set(boundary_hashes("other model", list(range(100)), 16, 100))
    assert boundary_hashes("m", list(range(100)), 16, 40) == a[:2]  # never past the limit


def test_the_published_boundary_leaves_the_last_token_and_respects_min_tokens():
    share = FleetPromptCache(DistributedCache(redis_url="redis://127.0.0.1:1/0", block_tokens=16, min_tokens=32))
    assert [share.boundary(n) for n in (10, 32, 33, 48, 49, 100)] == [0, 0, 32, 32, 48, 96]


async def test_without_a_redis_url_the_prompt_cache_is_local_only():
    cache = PromptCache.from_settings(DistributedCache(), local_entries=64)
    assert type(cache) is PromptCache
    assert await cache.lookup("any-identity", list(range(1000))) is None  # no Redis, no I/O
    assert cache.publisher("any-identity", asyncio.get_running_loop()) is None and cache.collector() is None
    await cache.close()
    shared = PromptCache.from_settings(DistributedCache(redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(shared, FleetPromptCache) and shared.collector() is not None
    await shared.close()


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_the_codec_round_trips_a_prefix_of_every_layer(dtype):
    layers = []
    for _ in range(3):
        cache = KVCache()
        keys, values = (mx.random.normal((1, 4, 40, 8)).astype(dtype) for _ in range(2))
        cache.update_and_fetch(keys, values)
        layers.append(cache)
    blob = kvcodec.encode(layers, 32)
    back = kvcodec.decode(blob, 16)
    assert [c.offset for c in back] == [16, 16, 16] and back[0].keys.dtype == dtype
    for mine, theirs in zip(back, layers, strict=True):
        assert mx.array_equal(mine.keys, theirs.keys[..., :16, :]).item()
        assert mx.array_equal(mine.values, theirs.values[..., :16, :]).item()
    assert [c.offset for c in kvcodec.decode(blob)] == [32, 32, 32]


def test_the_codec_refuses_what_it_cannot_carry():
    with pytest.raises(kvcodec.KVCodecError, match="RotatingKVCache"):
        kvcodec.encode([RotatingKVCache(max_size=8)], 4)
    cache = KVCache()
    cache.update_and_fetch(mx.zeros((1, 1, 4, 2)), mx.zeros((1, 1, 4, 2)))
    with pytest.raises(kvcodec.KVCodecError, match="holds 4 tokens"):
        kvcodec.encode([cache], 8)
    blob = kvcodec.encode([cache], 4)
    for bad in (b"", b"\x00\x00\x00\x02{}", blob[:-1], blob + b"x"):
        with pytest.raises(kvcodec.KVCodecError):
            kvcodec.decode(bad)
    with pytest.raises(kvcodec.KVCodecError, match="asked for 5"):
        kvcodec.decode(blob, 5)


# ---- real agents, real Redis ----

SYSTEM = ("You are the assistant of a fleet of small computers. Answer in one short sentence, "
          "name the node that answered, never invent numbers, and keep a friendly tone. ") * 3


def counter(agent, name: str) -> float:
    return metric_total(agent.url, name)


def sharing_config(tmp_path: Path, redis_url: str) -> Path:
    path = tmp_path / f"runtime-{free_port()}.yaml"
    path.write_text(f"distributed_cache: {{redis_url: '{redis_url}', block_tokens: 16, min_tokens: 32, "
                    f"key_prefix: 'test-{path.stem}'}}\n")
    return path


def complete(agent, prompt: str) -> dict:
    r = httpx.post(f"{agent.url}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_what_one_agent_prefilled_another_fetches_and_continues_identically(
    agent_factory, tiny_model: Path, redis_server, tmp_path: Path,
):
    config = sharing_config(tmp_path, redis_server.url)
    first = agent_factory(tiny_model, ["--config", str(config)])
    second = agent_factory(tiny_model, ["--config", str(config), "--prompt-cache-bytes", "0"])
    prompt = SYSTEM + "Which node answered?"

    computed = complete(first, prompt)
    wait_for(lambda: counter(first, "mlxpool_shared_kv_published_total") >= 1, 10, "the first agent to publish")
    fetched = complete(second, prompt)

    assert fetched["choices"][0]["text"] == computed["choices"][0]["text"]  # same tokens from shared state
    prompt_tokens = fetched["usage"]["prompt_tokens"]
    shared = counter(second, "mlxpool_prompt_tokens_shared_total")
    assert prompt_tokens - 16 <= shared < prompt_tokens  # the last whole block before the last token
    assert fetched["usage"]["prompt_tokens_details"]["cached_tokens"] == shared
    assert counter(second, "mlxpool_shared_kv_hits_total") == 1
    assert counter(first, "mlxpool_prompt_tokens_shared_total") == 0

    # A different question after the same system prompt reuses the system prompt's blocks.
    other = complete(second, SYSTEM + "And which model?")
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] >= 32
    assert counter(second, "mlxpool_shared_kv_errors_total") == 0

    # The publisher itself holds the prompt in its own prefix cache: no transfer for it.
    again = complete(first, prompt)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert counter(first, "mlxpool_shared_kv_held_locally_total") == 1
    assert counter(first, "mlxpool_shared_kv_hits_total") == 0


def test_without_redis_agents_serve_as_if_sharing_were_off(agent_factory, tiny_model: Path, tmp_path: Path):
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    agent = agent_factory(tiny_model, ["--config", str(sharing_config(tmp_path, dead))])
    answer = complete(agent, SYSTEM + "Which node answered?")
    assert answer["usage"]["completion_tokens"] == 12
    wait_for(lambda: counter(agent, "mlxpool_shared_kv_errors_total") >= 1, 10, "the failure to be counted")
    assert counter(agent, "mlxpool_shared_kv_hits_total") == 0
    assert "distributed cache lookup failed" in agent.log_text()


OPS_TOKEN = "identity-test-token"


def identity_of(agent, model: str = "tiny") -> str:
    r = httpx.get(f"{agent.url}/v1/node", headers={"Authorization": f"Bearer {OPS_TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    return next(m["identity"] for m in r.json()["models"] if m["name"] == model)


def test_a_fine_tune_with_equal_config_and_sizes_never_gets_its_bases_kv(
    agent_factory, tiny_model: Path, redis_server, tmp_path: Path,
):
    """The defect: identity by config and file sizes handed a fine-tune its base's KV state.
    (That a byte-identical copy elsewhere has the same identity: tests/agent/operations/test_identity.py.)"""
    config = sharing_config(tmp_path, redis_server.url)
    token = tmp_path / "ops-token"
    token.write_text(OPS_TOKEN)
    ops = ["--ops-token-file", str(token)]
    tuned = make_variant(tiny_model, tmp_path / "models" / "tiny", seed=1)  # same dir name: same model name
    base_agent = agent_factory(tiny_model, ["--config", str(config), *ops])
    tuned_agent = agent_factory(tuned, ["--config", str(config), "--prompt-cache-bytes", "0", *ops])
    assert identity_of(base_agent) != identity_of(tuned_agent)
    prompt = SYSTEM + "Which node answered?"
    complete(base_agent, prompt)
    wait_for(lambda: counter(base_agent, "mlxpool_shared_kv_published_total") >= 1, 10, "the base to publish")

    tuned_answer = complete(tuned_agent, prompt)  # the base's KV is in Redis: not for this model
    assert counter(tuned_agent, "mlxpool_shared_kv_hits_total") == 0
    assert tuned_answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    wait_for(lambda: counter(tuned_agent, "mlxpool_shared_kv_published_total") >= 1, 10, "the fine-tune to publish")
    again = complete(tuned_agent, prompt)  # its own published KV, fetched back, gives the same answer
    assert counter(tuned_agent, "mlxpool_shared_kv_hits_total") == 1
    assert again["choices"][0]["text"] == tuned_answer["choices"][0]["text"]
