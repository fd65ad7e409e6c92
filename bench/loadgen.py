"""A bounded load generator for OpenAI-compatible servers, and the figures it reports.

Closed loop: `clients` concurrent clients each send `requests_per_client` streaming
completions one after another. Every request is bounded in time; the whole run is
bounded in count. Only loopback URLs are used by the benchmarks that call it.

Time to first token is the time to the first chunk carrying text. A response whose
text arrives all in one chunk, at its end, has no such moment: its tokens decoded to
nothing printable until then (with a random-weight model, a run of lone UTF-8 bytes
the detokenizer must hold back). Its "TTFT" would just be its latency, so such
requests are left out of the TTFT percentiles and counted in `ttft_excluded`;
servers that stream the same tokens leave out the same requests.

Connections that fail before any response (a server whose accept queue overflows
under a burst of connections) are tried again, up to `CONNECT_RETRIES` times, as
OpenAI's own client does; the lost time counts in the request's latency and the
retries are reported.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

CONNECT_RETRIES = 2


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    completion_tokens: int = 0
    error: str = ""
    streamed: bool = True
    """Text arrived in more than one chunk (else `ttft_s` is only the latency)."""
    retries: int = 0
    """Connection attempts that failed before any response (then tried again)."""


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
        streamed = [r for r in ok if r.streamed]
        return {
            "clients": self.clients,
            "requests": len(self.results),
            "errors": len(self.results) - len(ok),
            "output_tokens": tokens,
            "tok_s": round(tokens / self.wall_s, 1) if self.wall_s else 0.0,
            "ttft_p50_s": pct([r.ttft_s for r in streamed], 50),
            "ttft_p99_s": pct([r.ttft_s for r in streamed], 99),
            "ttft_excluded": len(ok) - len(streamed),
            "retries": sum(r.retries for r in self.results),
            "latency_p50_s": pct([r.latency_s for r in ok], 50),
            "latency_p99_s": pct([r.latency_s for r in ok], 99),
        }


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation), rounded to ms."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[k], 4)


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict, timeout: float) -> RequestResult:
    """One streamed completion. A connection that fails before any response arrives is tried
    again (up to `CONNECT_RETRIES` times, as OpenAI's client does); the time lost counts."""
    start = time.perf_counter()
    retries = 0
    while True:
        try:
            async with asyncio.timeout(timeout - (time.perf_counter() - start)):
                result = await _read_stream(client, url, body, start)
        except _NotConnected as exc:
            if retries < CONNECT_RETRIES:
                retries += 1
                continue
            result = RequestResult(False, error=f"{type(exc.__cause__).__name__}: {exc.__cause__}")
        except (httpx.HTTPError, TimeoutError) as exc:
            result = RequestResult(False, error=f"{type(exc).__name__}: {exc}")
        result.retries = retries
        return result


class _NotConnected(Exception):
    """The request failed before the server sent any response."""


async def _read_stream(client: httpx.AsyncClient, url: str, body: dict, start: float) -> RequestResult:
    ttft = None
    text_chunks = 0
    usage_tokens = None
    try:
        response = client.stream("POST", f"{url}/v1/completions", json=body)
        resp = await response.__aenter__()
    except httpx.TransportError as exc:
        raise _NotConnected() from exc
    try:
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
                    text_chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
    finally:
        await response.__aexit__(None, None, None)
    latency = time.perf_counter() - start
    return RequestResult(True, ttft if ttft is not None else latency, latency,
                         usage_tokens if usage_tokens is not None else text_chunks, streamed=text_chunks > 1)


def http_client(max_clients: int, timeout: float = 300) -> httpx.AsyncClient:
    """A client with a keep-alive connection for each of up to `max_clients` concurrent requests."""
    limits = httpx.Limits(max_connections=max_clients + 4, max_keepalive_connections=max_clients + 4)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


async def run_level(url: str, prompts: list[str], clients: int, requests_per_client: int,
                    max_tokens: int, model: str, timeout: float = 300,
                    client: httpx.AsyncClient | None = None) -> LevelResult:
    """`clients` closed-loop clients; prompt i goes to request i (same order for every server).

    Pass a `client` to keep its connections across runs (as a gateway would); otherwise a
    fresh one is made and closed.
    """
    if client is None:
        async with http_client(clients, timeout) as own:
            return await run_level(url, prompts, clients, requests_per_client, max_tokens, model, timeout, own)

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
