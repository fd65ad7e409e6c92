"""Admission by projected KV bytes against a real agent (real MLX engine, real HTTP).

The agent serves the tiny model (512 KV bytes per token: 2 layers x 2 KV heads x 16 x
float32, keys and values) with its memory capacity set to its weights plus 960 KiB of KV
budget plus the prompt's prefill scratch (held only while the prompt is processed) and no
headroom, so sizes are small and exact: 1792 tokens (7 of mlx-lm's 256-token steps,
896 KiB) fit, 2048 (1 MiB) do not.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # well over the prefix cache's 16 tokens


def prompt_scratch(tiny_model: Path) -> int:
    """The prefill scratch PROMPT holds while it is processed (the gate reserves it on top of the
    KV until the prompt is done): it depends only on the padded chunk, 128 tokens here."""
    from tokenizers import Tokenizer

    from mlxpool.agent.engine.memory import prefill_scratch_bytes, prefill_shape

    shape = prefill_shape(json.loads((tiny_model / "config.json").read_text()), 4)
    n = len(Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(PROMPT).ids)
    with_bos = prefill_scratch_bytes(n + 1, shape, 2048)
    assert prefill_scratch_bytes(n, shape, 2048) == with_bos > 0  # a BOS token or not: the same chunk
    return with_bos


@pytest.fixture
def small_agent(tiny_model: Path, agent_factory, tmp_path: Path):
    weights = (tiny_model / "model.safetensors").stat().st_size
    config = tmp_path / "runtime.yaml"
    config.write_text(
        "weight_management:\n"
        f"  memory_capacity_bytes: {weights + 960 * 1024 + prompt_scratch(tiny_model)}\n"
        "  memory_headroom_bytes: 0\n"
        "  memory_wait_seconds: 0\n"
        "  pin_policy: none\n"
    )
    return agent_factory(tiny_model, ["--config", str(config)])


def running(url: str) -> bool:
    metrics = httpx.get(f"{url}/metrics").text
    return any(line.startswith("vllm:num_requests_running") and float(line.split()[-1]) >= 1
               for line in metrics.splitlines())


def complete(url: str, max_tokens: int, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **extra})


def test_requests_are_admitted_by_projected_kv_bytes(small_agent, tiny_model: Path):
    url = small_agent.url
    eos = json.loads((tiny_model / "config.json").read_text())["eos_token_id"]  # banned: the first runs long
    # Projected 1984 tokens (8 steps: 1 MiB of KV): can never fit, refused at once, naming the shortfall.
    too_big = complete(url, 1900)
    assert too_big.status_code == 503, too_big.text
    error = too_big.json()["error"]
    assert error["code"] == "insufficient_memory" and error["param"] == "max_tokens"
    assert "exceeds this node's whole KV budget" in error["message"] and "short by" in error["message"]
    assert too_big.headers.get("retry-after")
    # 1500 tokens (1584 with the prompt, 7 steps: 896 KiB) fit; while they run, 600 more
    # (384 KiB) do not (memory_wait_seconds 0: refused instead of waiting).
    results: dict[str, int] = {}

    def run_first() -> None:
        response = complete(url, 1500, logit_bias={str(eos): -100})
        results["status"] = response.status_code
        results["tokens"] = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0

    runner = threading.Thread(target=run_first)
    runner.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not running(url) and runner.is_alive():
        time.sleep(0.01)
    second = complete(url, 600)
    runner.join(60)
    assert results == {"status": 200, "tokens": 1500}
    assert second.status_code == 503, second.text
    assert "more than is free" in second.json()["error"]["message"]
    # The first one's reservation went back when it ended: the same request now runs (its
    # prefix cache entry is counted in the books, and shed to make room).
    third = complete(url, 1500)
    assert third.status_code == 200, third.text
    metrics = httpx.get(f"{url}/metrics").text
    refused = [line for line in metrics.splitlines() if line.startswith("mlxpool_requests_rejected_total")
               and 'reason="memory"' in line]
    assert refused and float(refused[0].split()[-1]) == 2
    assert "memory admission on" in small_agent.log_text()


def test_memory_admission_off_lets_everything_in(tiny_model: Path, agent_factory, tmp_path: Path):
    config = tmp_path / "runtime.yaml"
    config.write_text("weight_management:\n  memory_admission: false\n  memory_capacity_bytes: 1\n"
                      "  mlx_cache_limit_bytes: 3145728\n")
    agent = agent_factory(tiny_model, ["--config", str(config)])
    response = complete(agent.url, 64)
    assert response.status_code == 200, response.text
    assert json.loads(response.text)["usage"]["completion_tokens"] >= 1
    # MLX's buffer-cache cap is applied with admission off too (it used to be set only with the books).
    assert "mlx cache limit bytes=3145728" in agent.log_text()
    assert "memory admission on" not in agent.log_text()
