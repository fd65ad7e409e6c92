"""A bounded load generator for OpenAI-compatible servers, and the figures it reports.

Closed loop: `clients` concurrent clients each send `requests_per_client` streaming
completions one after another. Every request is bounded in time; the whole run is
bounded in count. Only loopback URLs are used by the benchmarks that call it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    completion_tokens: int = 0
    error: str = ""


@dataclass
class LevelResult:
    clients: int
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def summary(self) -> dict:
        ok = self.ok
        tokens = sum(r.completion_tokens for r in ok)
        return {
            "clients": self.clients,
            "requests": len(self.results),
            "errors": len(self.results) - len(ok),
            "output_tokens": tokens,
            "tok_s": round(tokens / self.wall_s, 1) if self.wall_s else 0.0,
            "ttft_p50_s": pct([r.ttft_s for r in ok], 50),
            "ttft_p99_s": pct([r.ttft_s for r in ok], 99),
            "latency_p50_s": pct([r.latency_s for r in ok], 50),
            "latency_p99_s": pct([r.latency_s for r in ok], 99),
        }


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation), rounded to ms."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return round(ordered[k], 4)


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict, timeout: float) -> RequestResult:
    start = time.perf_counter()
    ttft = None
    tokens = 0
    usage_tokens = None
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    return RequestResult(False, error=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage_tokens = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices") or []:
                        if choice.get("text"):
                            tokens += 1
                            if ttft is None:
                                ttft = time.perf_counter() - start
    except (httpx.HTTPError, TimeoutError) as exc:
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - start
    return RequestResult(True, ttft if ttft is not None else latency, latency,
                         usage_tokens if usage_tokens is not None else tokens)


async def run_level(url: str, prompts: list[str], clients: int, requests_per_client: int,
                    max_tokens: int, model: str, timeout: float = 300) -> LevelResult:
    """`clients` closed-loop clients; prompt i goes to request i (same order for every server)."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def one_client(c: int) -> list[RequestResult]:
            out = []
            for k in range(requests_per_client):
                prompt = prompts[(c * requests_per_client + k) % len(prompts)]
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}}
                out.append(await stream_completion(client, url, body, timeout))
            return out

        start = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - start
    return LevelResult(clients, wall, [r for rs in per_client for r in rs])
