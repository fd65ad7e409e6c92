"""Distributed-cache benchmark: a prompt prefilled on one node, then asked on another.

The situation the Redis-shared KV cache is for: a fleet behind a router, a long system
prompt (or a conversation so far) whose requests land on different nodes. Two pairs of
`mlxpool agent` processes serve the same bench-size model side by side in one run: one
pair shares prompt KV through a real `redis-server`, the other does not (each node
prefills for itself, as every single-node server, mlx_lm.server included, must). For
each of N distinct long system prompts, a first question goes to node A, then a second
question with the same system prompt to node B, on both pairs (alternating which pair
goes first, so machine drift hits both). Figures: time to first token on the second
node (a `max_tokens: 1` request's latency: the prefill and one step), shared vs not, and
the same on the first node (what publishing costs); their ratios; the bytes published.

Usage: python -m bench.sharedkv [--quick] [--prompt-words N]
(--quick: 4 system prompts, under a minute; the full run: 12.) One JSON line last.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import redis

from bench.serving import MODEL_NAME, blas_env
from mlxpool.dev.components import start_agent
from mlxpool.dev.processes import LOOPBACK, Process, free_port, wait_for
from mlxpool.dev.scraping import metric_total
from mlxpool.tinymodel import make_tiny

WORDS = ["the", "fleet", "of", "small", "computers", "serves", "models", "while", "kubernetes", "reconciles",
         "desired", "state", "across", "many", "nodes", "with", "routing", "tables", "health", "probes",
         "and", "careful", "schedulers"]


def start_redis(work: Path) -> Process:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (hack/install-system-deps.sh installs it)")
    port = free_port()
    proc = Process.start("redis", [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "",
                                   "--appendonly", "no", "--dir", str(work)], work / "redis.log")
    proc.url = f"redis://{LOOPBACK}:{port}/0"
    wait_for(lambda: _ping(port), 20, "redis-server", proc)
    return proc


def _ping(port: int) -> bool:
    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        return bool(client.ping())
    finally:
        client.close()


def system_prompt(rng: np.random.Generator, words: int) -> str:
    return "System: " + " ".join(rng.choice(WORDS, size=words)) + "\n"


def first_token_s(client: httpx.Client, agent: Process, prompt: str) -> float:
    started = time.perf_counter()
    r = client.post(f"{agent.url}/v1/completions",
                    json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0})
    r.raise_for_status()
    return time.perf_counter() - started


def counter(agent: Process, name: str) -> float:
    return metric_total(agent.base_url, name)


def published_at_least(agent: Process, count: int) -> bool:
    return counter(agent, "mlxpool_shared_kv_published_total") >= count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompt-words", type=int, default=700, help="words per system prompt (~2 tokens each)")
    args = parser.parse_args(argv)
    prompts = 4 if args.quick else 12
    work = Path(tempfile.mkdtemp(prefix="mlxpool-bench-sharedkv-"))
    model = make_tiny(work / MODEL_NAME, "bench", seed=0)
    os.environ.update(blas_env())
    started = time.monotonic()
    procs: list[Process] = []
    try:
        redis_proc = start_redis(work)
        procs.append(redis_proc)
        config = work / "shared.yaml"
        config.write_text(f"distributed_cache: {{redis_url: '{redis_proc.url}'}}\n")
        pairs: dict[str, list[Process]] = {}
        for pair, extra in (("shared", ["--config", str(config)]), ("plain", [])):
            pairs[pair] = []
            for node in ("a", "b"):
                proc = start_agent(model, work / "logs", name=f"{pair}-{node}", timeout=300,
                                   extra=["--model-name", MODEL_NAME, *extra])
                procs.append(proc)
                pairs[pair].append(proc)
        rng = np.random.default_rng(3)
        first: dict[str, list[float]] = {"shared": [], "plain": []}
        second: dict[str, list[float]] = {"shared": [], "plain": []}
        with httpx.Client(timeout=300, trust_env=False) as client:
            warm = system_prompt(rng, 50)
            for agents in pairs.values():
                for agent in agents:
                    first_token_s(client, agent, warm + "warm up")
            for i in range(prompts):
                system = system_prompt(rng, args.prompt_words)
                order = ["shared", "plain"] if i % 2 == 0 else ["plain", "shared"]
                for pair in order:
                    a, b = pairs[pair]
                    first[pair].append(first_token_s(client, a, system + f"Question {i}: which node answered?"))
                    if pair == "shared":  # publishing is asynchronous: B asks once A's copy is in Redis
                        wait_for(functools.partial(published_at_least, a, i + 1), 30,
                                 "the first node to publish", a)
                    second[pair].append(first_token_s(client, b, system + f"Question {i}: and which model?"))
                print(f"  prompt {i}: first node shared {first['shared'][-1]:.3f}s plain {first['plain'][-1]:.3f}s"
                      f" | second node shared {second['shared'][-1]:.3f}s plain {second['plain'][-1]:.3f}s",
                      flush=True)
        a_shared, b_shared = pairs["shared"]
        figures = {
            "bench": "sharedkv", "quick": args.quick, "prompts": prompts, "prompt_words": args.prompt_words,
            "second_node_ttft_p50_s": {p: round(statistics.median(v), 4) for p, v in second.items()},
            "first_node_ttft_p50_s": {p: round(statistics.median(v), 4) for p, v in first.items()},
            "shared_tokens_on_second_node": counter(b_shared, "mlxpool_prompt_tokens_shared_total"),
            "published_bytes": counter(a_shared, "mlxpool_shared_kv_published_bytes_total"),
            "errors": sum(counter(p, "mlxpool_shared_kv_errors_total") for p in (a_shared, b_shared)),
        }
        figures["ratio_second_node_ttft"] = round(figures["second_node_ttft_p50_s"]["shared"]
                                                  / figures["second_node_ttft_p50_s"]["plain"], 3)
        figures["ratio_first_node_ttft"] = round(figures["first_node_ttft_p50_s"]["shared"]
                                                 / figures["first_node_ttft_p50_s"]["plain"], 3)
        figures["seconds"] = round(time.monotonic() - started, 1)
        print(f"\nsecond node, time to first token p50: shared {figures['second_node_ttft_p50_s']['shared']}s vs "
              f"prefilled {figures['second_node_ttft_p50_s']['plain']}s (x{figures['ratio_second_node_ttft']}); "
              f"first node (publishing) x{figures['ratio_first_node_ttft']}")
        print(json.dumps(figures))
        return 0
    finally:
        for proc in reversed(procs):
            proc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
