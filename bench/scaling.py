"""Horizontal scaling: our router over 1..32 simulated agents, its overhead, replicas, strategies.

Sections (each prints a table; one JSON line last):
- efficiency: N simulated agents of fixed capacity (`bench.simagent_engine`) behind one
  router, offered load proportional to N (N x slots closed-loop streaming clients):
  aggregate tok/s, and efficiency = tok/s at N / (N x tok/s at 1). A direct run at the
  largest N (clients spread over the agents, no router) shows what the host itself allows.
- overhead: open-loop non-streamed chat requests of ~1 ms service time at 200 and 500
  req/s, direct to the agents (spread round-robin by the client) and through the router,
  alternating turns: added p50/p99 = through-router minus direct. Side by side, LiteLLM's
  proxy (`litellm[proxy]`, routing_strategy least-busy, same agents, same requests) at a
  rate it sustains and in a closed loop for its maximum; `vs_litellm_p50_ratio` is our
  added p50 / LiteLLM's added p50 at that rate (below 1: ours adds less).
- max: the router's maximum req/s (closed loop, 64 clients), and the same loop direct.
- replicas: 3 router replicas vs 1 on the same agents (clients spread over the
  replicas): req/s, and the prefix-cache hit rate of a shared-prefix workload under
  `sticky-prefix`, with the replicas' prefix indexes shared through a real redis-server
  (`--prefix-redis`) and, for comparison, each replica's own.
- skewed: 4 agents, one at half speed, 70% short / 30% long prompts, open loop at about
  70% of the pool's capacity: p99 latency and TTFT p90 per strategy.
- prefix: 150 groups of long system prompts over 4 agents whose prefix caches hold about
  40 groups each: TTFT p90 per strategy and for an oracle (the client sends each group
  straight to one agent); every strategy gets its own model name, so its own cold caches.
- kill: 4 agents under streaming load, one killed midway: requests that fail before
  their first byte must be 0 (the router fails over); streams cut midway end with an
  error event.
- real: two real MLX agents (a tiny model) direct and through the router: tok/s and TTFT.

Usage: python -m bench.scaling [--quick] [--litellm PATH-TO-litellm] [--skip real,litellm,...]
`--quick` fits in under 5 minutes. Run it under `flock /tmp/mlxpool-heavy.lock`.
Every figure depends on the machine: it is printed with the load average.
"""

# ruff: noqa: B023 - every request-making lambda built in a loop is awaited within the same iteration

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from bench.loadgen import pct
from mlxpool.dev import components
from mlxpool.dev.processes import LOOPBACK, Process, free_port, wait_for
from mlxpool.routing import RouteEndpoint, RoutingTable

MODEL = "sim"
REQUEST_TIMEOUT = 60.0
SKIPPABLE = ("efficiency", "overhead", "litellm", "max", "replicas", "skewed", "prefix", "kill", "real")
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


# ---------------------------------------------------------------------------------------------
# One request, and loops of them


@dataclass
class Result:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    started_streaming: bool = False
    error: str = ""
    status: int = 0


@dataclass
class Body:
    url: str
    """Full URL (a router's or an agent's)."""
    payload: dict
    headers: dict[str, str] = field(default_factory=dict)


async def send(session: aiohttp.ClientSession, body: Body) -> Result:
    """One chat request; streamed ones count tokens and time the first content event."""
    started = time.perf_counter()
    stream = bool(body.payload.get("stream"))
    try:
        async with session.post(body.url, json=body.payload, headers=body.headers) as response:
            if response.status != 200:
                text = await response.text()
                return Result(False, time.perf_counter() - started, status=response.status, error=text[:200])
            if not stream:
                data = await response.json()
                tokens = data.get("usage", {}).get("completion_tokens", 0)
                return Result(True, time.perf_counter() - started, tokens=tokens, status=200)
            ttft = None
            tokens = 0
            tail = b""
            async for chunk in response.content.iter_any():
                if ttft is None and b'"content"' in chunk:
                    ttft = time.perf_counter() - started
                tail = (tail + chunk)[-4096:]
            ok = b"data: [DONE]" in tail and b'"error"' not in tail
            for line in tail.split(b"\n"):
                if line.startswith(b"data: {") and b'"usage"' in line:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        usage = json.loads(line[6:])["usage"]
                        if usage:
                            tokens = usage["completion_tokens"]
            return Result(ok, time.perf_counter() - started, ttft, tokens, started_streaming=ttft is not None,
                          status=200, error="" if ok else tail[-200:].decode(errors="replace"))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Result(False, time.perf_counter() - started, error=f"{exc.__class__.__name__}: {exc}")


def session(limit: int = 2000) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit),
                                 timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))


async def closed_loop(make: Callable[[int], Body], clients: int, seconds: float) -> tuple[list[Result], float]:
    """`clients` clients each sending one request after another for `seconds`."""
    results: list[Result] = []
    counter = itertools.count()
    async with session() as s:
        started = time.perf_counter()
        deadline = started + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                results.append(await send(s, make(next(counter))))

        await asyncio.gather(*(client() for _ in range(clients)))
        return results, time.perf_counter() - started


async def open_loop(make: Callable[[int], Body], rate: float, seconds: float) -> tuple[list[Result], float]:
    """Requests at a fixed `rate` for `seconds`, whatever the answers (bounded: rate x seconds)."""
    count = max(1, int(rate * seconds))
    async with session() as s:
        started = time.perf_counter()

        async def one(i: int) -> Result:
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            return await send(s, make(i))

        results = await asyncio.gather(*(one(i) for i in range(count)))
        return list(results), time.perf_counter() - started


def chat(url: str, model: str, prompt: str, max_tokens: int, stream: bool, **headers: str) -> Body:
    payload: dict = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    if stream:
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
    return Body(url, payload, dict(headers))


def ms(seconds: float | None) -> float | None:
    return None if seconds is None or seconds != seconds else round(seconds * 1000, 2)


def latencies(results: Sequence[Result]) -> list[float]:
    return [r.latency for r in results if r.ok]


# ---------------------------------------------------------------------------------------------
# Processes: simulated agents, routers, LiteLLM


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[Process] = []
        self._revision = itertools.count(1)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()

    def stop(self, proc: Process) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def sims(self, name: str, count: int, models: Sequence[str], **timing: object) -> tuple[Process, list[str]]:
        """`count` simulated agents in one process; their URLs."""
        argv = [sys.executable, "-m", "bench.simagents", "--count", str(count), "--prefix", name, "--inference",
                "--max-models", str(len(models) + 1)]
        for model in models:
            argv += ["--preload", model]
        for key, value in timing.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        proc = Process.start(name, argv, self.logs / f"{name}.log")
        self.procs.append(proc)
        proc.url = proc.wait_for_log(r"simagents ready url=(http://[0-9.]+:\d+)", 60).group(1)
        agents = httpx.get(f"{proc.url}/agents", timeout=10, trust_env=False).json()
        return proc, [a["url"] for a in agents]

    def engines(self, sims: Process) -> list[dict]:
        return httpx.get(f"{sims.url}/agents", timeout=10, trust_env=False).json()

    def routes(self, path: Path, models: dict[str, list[str]], strategy: str = "round-robin",
               selectable: Sequence[str] = ()) -> int:
        revision = next(self._revision)
        table = RoutingTable(pool="bench", namespace="bench", revision=revision, strategy=strategy,
                             selectable_strategies=list(selectable),
                             models={m: [RouteEndpoint(node=f"a{i}", url=u) for i, u in enumerate(urls)]
                                     for m, urls in models.items()})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(table.to_json())
        tmp.replace(path)
        return revision

    def router(self, name: str, routes: Path, extra: Sequence[str] = ()) -> Process:
        proc = components.start_router(self.logs, routes_file=routes, name=name,
                                       extra=list(extra))
        self.procs.append(proc)
        wait_for(lambda: httpx.get(f"{proc.url}/ready", timeout=2, trust_env=False).status_code == 200, 30,
                 f"{name} ready", proc)
        return proc

    def await_revision(self, router: Process, revision: int) -> None:
        wait_for(lambda: httpx.get(f"{router.url}/ready", timeout=2, trust_env=False).json().get("revision")
                 == revision, 30, f"{router.url} at revision {revision}", router)

    def litellm(self, agent_urls: Sequence[str]) -> Process | None:
        exe = self.args.litellm
        if exe is None or not Path(exe).exists():
            return None
        config = self.work / "litellm.yaml"
        lines = ["model_list:"]
        for url in agent_urls:
            lines += [f"  - model_name: {MODEL}", "    litellm_params:", f"      model: openai/{MODEL}",
                      f"      api_base: {url}/v1", "      api_key: none"]
        lines += ["router_settings:", "  routing_strategy: least-busy", "litellm_settings:",
                  "  drop_params: true", "  telemetry: false", "  request_timeout: 60"]
        config.write_text("\n".join(lines) + "\n")
        port = free_port()
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
               "NO_PROXY": "*", "no_proxy": "*"}
        if Path(OPENBLAS).exists():
            env["LD_PRELOAD"] = OPENBLAS  # the same BLAS as ours (LiteLLM does no matrix work)
        proc = Process.start("litellm", [exe, "--config", str(config), "--host", LOOPBACK, "--port", str(port),
                                         "--num_workers", "1"], self.logs / "litellm.log", env=env)
        self.procs.append(proc)
        proc.url = f"http://{LOOPBACK}:{port}"
        try:
            wait_for(lambda: _status(f"{proc.url}/health/liveliness") == 200, 120, "litellm ready", proc)
        except Exception as exc:
            print(f"litellm did not start: {exc}", flush=True)
            self.stop(proc)
            return None
        return proc


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2, trust_env=False).status_code
    except httpx.HTTPError:
        return 0


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(f"\n== {title} (load average {load_average()})", flush=True)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)), flush=True)


# ---------------------------------------------------------------------------------------------
# Sections


EFFICIENCY_TIMING = {"slots": 4, "step_base_ms": 100, "step_per_seq_ms": 2, "prefill_tps": 20000}
FAST_TIMING = {"slots": 32, "step_base_ms": 2, "step_per_seq_ms": 0.05, "prefill_tps": 50000}


async def efficiency(bench: Bench, out: dict) -> None:
    levels = [1, 8, 32] if bench.args.quick else [1, 2, 4, 8, 16, 32]
    seconds = 5.0 if bench.args.quick else 15.0
    max_tokens = 32
    sims, urls = bench.sims("eff", max(levels), [MODEL], **EFFICIENCY_TIMING)
    routes = bench.work / "eff-routes.json"
    bench.routes(routes, {MODEL: urls[:1]}, "least-loaded")
    router = bench.router("router-eff", routes)
    rows, tok_s = [], {}
    slots = int(EFFICIENCY_TIMING["slots"])
    for n in levels:
        bench.await_revision(router, bench.routes(routes, {MODEL: urls[:n]}, "least-loaded"))
        url = f"{router.url}/v1/chat/completions"
        # warm the connections first
        await closed_loop(lambda i: chat(url, MODEL, "hello there", 4, True), n * slots, 1.0)
        results, wall = await closed_loop(lambda i: chat(url, MODEL, "hello there", max_tokens, True),
                                          n * slots, seconds)
        tokens = sum(r.tokens for r in results if r.ok)
        tok_s[n] = tokens / wall
        eff = tok_s[n] / (n * tok_s[levels[0]]) if n != levels[0] else 1.0
        rows.append([n, n * slots, len(results), sum(not r.ok for r in results), round(tok_s[n], 1),
                     f"{eff:.3f}", ms(pct([r.ttft for r in results if r.ttft], 50)),
                     ms(pct([r.ttft for r in results if r.ttft], 99))])
        out[f"efficiency_{n}"] = round(eff, 4)
        out[f"tok_s_{n}"] = round(tok_s[n], 1)
    # The same largest level straight to the agents: what the host allows without a router.
    n = levels[-1]
    direct = itertools.cycle(f"{u}/v1/chat/completions" for u in urls[:n])
    results, wall = await closed_loop(lambda i: chat(next(direct), MODEL, "hello there", max_tokens, True),
                                      n * slots, seconds)
    direct_tok_s = sum(r.tokens for r in results if r.ok) / wall
    rows.append([f"{n} direct", n * slots, len(results), sum(not r.ok for r in results), round(direct_tok_s, 1),
                 f"{direct_tok_s / (n * tok_s[levels[0]]):.3f}", ms(pct([r.ttft for r in results if r.ttft], 50)),
                 ms(pct([r.ttft for r in results if r.ttft], 99))])
    out[f"efficiency_direct_{n}"] = round(direct_tok_s / (n * tok_s[levels[0]]), 4)
    lag = sum(e.get("lag_seconds", 0) for a in bench.engines(sims) for e in a["engines"].values())
    out["sim_lag_seconds"] = round(lag, 2)
    table(f"efficiency: agents of {slots} slots, {max_tokens}-token streams, least-loaded, {seconds:.0f} s per level"
          f" (simulator lag {lag:.1f} s)",
          ["agents", "clients", "requests", "errors", "tok/s", "efficiency", "ttft_p50_ms", "ttft_p99_ms"], rows)
    bench.stop(router)
    bench.stop(sims)


async def alternate(turns: Sequence[tuple[str, Callable[[], Awaitable[tuple[list[Result], float]]]]],
                    rounds: int) -> dict[str, list[Result]]:
    """Run the named turns ABAB... `rounds` times; results per name."""
    collected: dict[str, list[Result]] = {name: [] for name, _ in turns}
    for _ in range(rounds):
        for name, turn in turns:
            results, _ = await turn()
            collected[name] += results
    return collected


def overhead_row(name: str, rate: float, results: list[Result], base: list[Result] | None) -> list[object]:
    lat = latencies(results)
    p50, p99 = pct(lat, 50), pct(lat, 99)
    row: list[object] = [name, rate, len(results), sum(not r.ok for r in results), ms(p50), ms(p99)]
    if base is not None:
        b = latencies(base)
        row += [ms(p50 - pct(b, 50)), ms(p99 - pct(b, 99))]
    else:
        row += ["", ""]
    return row


async def overhead(bench: Bench, out: dict) -> None:
    quick = bench.args.quick
    seconds = 3.0 if quick else 8.0
    rounds = 1 if quick else 3
    sims, urls = bench.sims("ovh", 8, [MODEL], **FAST_TIMING)
    routes = bench.work / "ovh-routes.json"
    bench.routes(routes, {MODEL: urls}, "round-robin")
    router = bench.router("router-ovh", routes)
    direct_urls = itertools.cycle(f"{u}/v1/chat/completions" for u in urls)
    via = f"{router.url}/v1/chat/completions"
    prompt = "a short question about the weather today, please answer briefly"

    def direct(i: int) -> Body:
        return chat(next(direct_urls), MODEL, prompt, 1, False)

    def routed(i: int) -> Body:
        return chat(via, MODEL, prompt, 1, False)

    rows = []
    await open_loop(routed, 100, 1.0)  # warm
    await open_loop(direct, 100, 1.0)
    for rate in (200, 500):
        got = await alternate([("direct", lambda: open_loop(direct, rate, seconds)),
                               ("router", lambda: open_loop(routed, rate, seconds))], rounds)
        rows.append(overhead_row("direct", rate, got["direct"], None))
        rows.append(overhead_row("router", rate, got["router"], got["direct"]))
        out[f"router_p50_ms_{rate}"] = ms(pct(latencies(got["router"]), 50) - pct(latencies(got["direct"]), 50))
        out[f"router_p99_ms_{rate}"] = ms(pct(latencies(got["router"]), 99) - pct(latencies(got["direct"]), 99))
        out[f"router_errors_{rate}"] = sum(not r.ok for r in got["router"])

    # Maximum req/s: closed loop, through the router and direct.
    if "max" not in bench.args.skip:
        clients, max_seconds = 64, (4.0 if quick else 10.0)
        got_max = await alternate([("direct", lambda: closed_loop(direct, clients, max_seconds)),
                                   ("router", lambda: closed_loop(routed, clients, max_seconds))], 1)
        for name in ("direct", "router"):
            ok = sum(r.ok for r in got_max[name])
            rps = ok / max_seconds
            rows.append([f"{name} max", f"{clients} clients", len(got_max[name]), len(got_max[name]) - ok,
                         ms(pct(latencies(got_max[name]), 50)), ms(pct(latencies(got_max[name]), 99)),
                         f"{rps:.0f} req/s", ""])
            out[f"{name}_max_rps"] = round(rps, 1)
        out["router_max_rps"] = out.pop("router_max_rps")

    # LiteLLM's proxy on the same agents: at a rate it sustains, then its maximum.
    if "litellm" not in bench.args.skip:
        lite = bench.litellm(urls)
        if lite is None:
            out["litellm"] = "not run (no --litellm executable, or it did not start)"
        else:
            lite_url = f"{lite.url}/v1/chat/completions"

            def via_litellm(i: int) -> Body:
                return chat(lite_url, MODEL, prompt, 1, False, authorization="Bearer none")

            rate = 20
            await open_loop(via_litellm, 5, 2.0)  # warm
            got = await alternate([("direct", lambda: open_loop(direct, rate, seconds)),
                                   ("router", lambda: open_loop(routed, rate, seconds)),
                                   ("litellm", lambda: open_loop(via_litellm, rate, seconds))], rounds)
            rows.append(overhead_row("direct", rate, got["direct"], None))
            rows.append(overhead_row("router", rate, got["router"], got["direct"]))
            rows.append(overhead_row("litellm", rate, got["litellm"], got["direct"]))
            ours = pct(latencies(got["router"]), 50) - pct(latencies(got["direct"]), 50)
            theirs = pct(latencies(got["litellm"]), 50) - pct(latencies(got["direct"]), 50)
            out["litellm_p50_ms_20"] = ms(theirs)
            out["litellm_p99_ms_20"] = ms(pct(latencies(got["litellm"]), 99) - pct(latencies(got["direct"]), 99))
            out["router_p50_ms_20"] = ms(ours)
            out["vs_litellm_p50_ratio"] = round(ours / theirs, 4) if theirs > 0 else None
            clients, max_seconds = 32, (4.0 if quick else 10.0)
            results, _ = await closed_loop(via_litellm, clients, max_seconds)
            ok = sum(r.ok for r in results)
            out["litellm_max_rps"] = round(ok / max_seconds, 1)
            rows.append(["litellm max", f"{clients} clients", len(results), len(results) - ok,
                         ms(pct(latencies(results), 50)), ms(pct(latencies(results), 99)),
                         f"{ok / max_seconds:.0f} req/s", ""])
            bench.stop(lite)
    table(f"router overhead: 1-token chat completions over 8 agents, open loop, {rounds} alternating turns of"
          f" {seconds:.0f} s", ["path", "req/s", "requests", "errors", "p50_ms", "p99_ms", "added_p50_ms",
                                "added_p99_ms"], rows)
    bench.stop(router)
    bench.stop(sims)


def group_prompt(group: int, user: int, system_chars: int) -> str:
    rng = random.Random(group)
    vocabulary = ("alpha", "beta", "gamma", "delta", "omega", "sigma")
    words = " ".join(rng.choice(vocabulary) for _ in range(system_chars // 6))
    system = f"[system {group}] " + words
    return system[:system_chars] + f"\nuser {user}: question {random.Random(user).random():.6f}"


async def replicas(bench: Bench, out: dict) -> None:
    """1 router, then 3 replicas sharing their prefix indexes through Redis, then 3 that do not.

    Each pass sends its shared-prefix groups under a model name of its own, so it starts
    on cold agent caches (a pass never inherits what the one before warmed).
    """
    from bench.sharedkv import start_redis  # only this section needs Redis

    quick = bench.args.quick
    seconds = 4.0 if quick else 10.0
    passes = [("1", 1, True), ("3 shared", 3, True), ("3 own", 3, False)]
    models = [f"{MODEL}-rep{n}" for n in range(len(passes))]
    sims, urls = bench.sims("rep", 8, [MODEL, *models], **FAST_TIMING, prefix_cache_blocks=2000)
    redis_proc = start_redis(bench.work)
    bench.procs.append(redis_proc)
    routes = bench.work / "rep-routes.json"
    bench.routes(routes, dict.fromkeys((MODEL, *models), urls), "sticky-prefix")
    redis_url = redis_proc.url
    assert redis_url is not None
    shared = [bench.router(f"router-rep{i}", routes, ["--prefix-redis", redis_url]) for i in range(3)]
    own = [bench.router(f"router-own{i}", routes) for i in range(3)]
    prompt = "a short question about the weather today, please answer briefly"
    rows = []
    rps = {}
    for (name, count, sharing), model in zip(passes, models, strict=True):
        routers = (shared if sharing else own)[:count]
        via = itertools.cycle(f"{r.url}/v1/chat/completions" for r in routers)
        results, _ = await closed_loop(lambda i: chat(next(via), MODEL, prompt, 1, False), 32 * count, seconds)
        ok = sum(r.ok for r in results)
        rps[name] = ok / seconds
        # Shared prefixes: 64 groups; hit rate from the agents' own counters.
        before = _prefix_counts(bench, sims)
        via = itertools.cycle(f"{r.url}/v1/chat/completions" for r in routers)
        rng = random.Random(7)  # the same groups in the same order in every pass
        grouped, _ = await open_loop(
            lambda i: chat(next(via), model, group_prompt(rng.randrange(64), i, 3000), 1, False), 100, seconds)
        after = _prefix_counts(bench, sims)
        hit = (after[1] - before[1]) / max(after[0] - before[0], 1)
        p90 = ms(pct(latencies(grouped), 90))
        rows.append([name, 32 * count, len(results), len(results) - ok, f"{rps[name]:.0f}", f"{hit:.3f}", p90])
        key = name.replace(" ", "_")
        out[f"replicas{key}_rps"] = round(rps[name], 1)
        out[f"replicas{key}_prefix_hit_rate"] = round(hit, 4)
        out[f"replicas{key}_prefix_p90_ms"] = p90
    out["replicas3_speedup"] = round(rps["3 shared"] / rps["1"], 3) if rps["1"] else None
    table(f"active-active replicas: closed loop, 1-token chats, {seconds:.0f} s; then 64 shared-prefix groups at"
          " 100 req/s under sticky-prefix, a model name (cold caches) per pass; '3 shared': prefix indexes"
          " shared through Redis (--prefix-redis), '3 own': each replica's own",
          ["replicas", "clients", "requests", "errors", "req/s", "prefix_hit_rate", "p90_ms"], rows)
    for r in shared + own:
        bench.stop(r)
    bench.stop(redis_proc)
    bench.stop(sims)


def _prefix_counts(bench: Bench, sims: Process) -> tuple[int, int]:
    agents = bench.engines(sims)
    prompt = sum(e["prompt_tokens"] for a in agents for e in a["engines"].values())
    cached = sum(e["cached_tokens"] for a in agents for e in a["engines"].values())
    return prompt, cached


SKEW_STRATEGIES = ("round-robin", "least-loaded", "load-aware", "predicted-latency")


async def skewed(bench: Bench, out: dict) -> None:
    quick = bench.args.quick
    seconds = 10.0 if quick else 40.0
    timing = {"slots": 4, "step_base_ms": 20, "step_per_seq_ms": 2, "prefill_tps": 4000}
    models = [f"{MODEL}-{s}" for s in SKEW_STRATEGIES]
    sims, urls = bench.sims("skew", 4, models, **timing, speeds="1,1,1,0.5")
    routes = bench.work / "skew-routes.json"
    bench.routes(routes, dict.fromkeys(models, urls), "round-robin", selectable=SKEW_STRATEGIES[1:])
    router = bench.router("router-skew", routes)
    via = f"{router.url}/v1/chat/completions"
    rate = 6.0
    rows = []
    p99 = {}
    for strategy, model in zip(SKEW_STRATEGIES, models, strict=True):
        rng = random.Random(7)
        prompts = [("x" * 8000 if rng.random() < 0.3 else "y" * 400) + f" {i}" for i in range(int(rate * seconds))]
        headers = {"x-mlxpool-strategy": strategy}
        results, _ = await open_loop(lambda i: chat(via, model, prompts[i], 32, True, **headers),
                                     rate, seconds)
        lat = latencies(results)
        ttfts = [r.ttft for r in results if r.ok and r.ttft is not None]
        p99[strategy] = pct(lat, 99)
        rows.append([strategy, len(results), sum(not r.ok for r in results), ms(pct(lat, 50)), ms(pct(lat, 99)),
                     ms(pct(ttfts, 90))])
        out[f"skewed_p99_ms_{strategy}"] = ms(pct(lat, 99))
        out[f"skewed_ttft_p90_ms_{strategy}"] = ms(pct(ttfts, 90))
    best = min(SKEW_STRATEGIES[1:], key=lambda s: p99[s])
    out["skewed_best_vs_round_robin_p99"] = round(p99[best] / p99["round-robin"], 3)
    table(f"skewed pool: 4 agents (one at half speed), 30% 2000-token prompts, {rate} req/s open loop,"
          f" {seconds:.0f} s per strategy", ["strategy", "requests", "errors", "p50_ms", "p99_ms", "ttft_p90_ms"], rows)
    bench.stop(router)
    bench.stop(sims)


PREFIX_STRATEGIES = ("round-robin", "prefix-affinity", "sticky-prefix")


async def prefix(bench: Bench, out: dict) -> None:
    quick = bench.args.quick
    groups, system_chars = 150, 6000
    seconds = 6.0 if quick else 30.0
    rate = 20.0
    # A cache of 4000 blocks of 64 characters holds about 40 of the 150 system prompts.
    timing = {"slots": 8, "step_base_ms": 10, "step_per_seq_ms": 1, "prefill_tps": 20000,
              "prefix_cache_blocks": 4000}
    names = [*PREFIX_STRATEGIES, "oracle"]
    models = {n: f"{MODEL}-{n}" for n in names}
    sims, urls = bench.sims("pfx", 4, list(models.values()), **timing)
    routes = bench.work / "pfx-routes.json"
    bench.routes(routes, dict.fromkeys(models.values(), urls), "round-robin", selectable=PREFIX_STRATEGIES[1:])
    router = bench.router("router-pfx", routes)
    via = f"{router.url}/v1/chat/completions"
    rows, p90 = [], {}
    for name in names:
        model = models[name]

        def body(i: int, group: int, name: str = name, model: str = model) -> Body:
            prompt = group_prompt(group, i, system_chars)
            if name == "oracle":  # each group always on one agent
                return chat(f"{urls[group % len(urls)]}/v1/chat/completions", model, prompt, 8, True)
            return chat(via, model, prompt, 8, True, **{"x-mlxpool-strategy": name})

        await open_loop(lambda i: body(i, i % groups), 30.0, groups / 30.0)  # every group once: warm
        rng = random.Random(11)
        order = [rng.randrange(groups) for _ in range(int(rate * seconds))]
        before = _prefix_counts(bench, sims)
        results, _ = await open_loop(lambda i: body(10_000 + i, order[i]), rate, seconds)
        after = _prefix_counts(bench, sims)
        hit = (after[1] - before[1]) / max(after[0] - before[0], 1)
        ttfts = [r.ttft for r in results if r.ok and r.ttft is not None]
        p90[name] = pct(ttfts, 90)
        rows.append([name, len(results), sum(not r.ok for r in results), ms(pct(ttfts, 50)), ms(p90[name]),
                     ms(pct(latencies(results), 99)), f"{hit:.3f}"])
        out[f"prefix_ttft_p90_ms_{name}"] = ms(p90[name])
        out[f"prefix_hit_rate_{name}"] = round(hit, 4)
    best = min(PREFIX_STRATEGIES[1:], key=lambda s: p90[s])
    out["prefix_best_strategy"] = best
    out["prefix_ttft_p90_vs_oracle"] = round(p90[best] / p90["oracle"], 3)
    table(f"shared prefix: {groups} groups of {system_chars}-character system prompts over 4 agents (caches hold"
          f" ~40 groups each), {rate} req/s, {seconds:.0f} s", ["strategy", "requests", "errors", "ttft_p50_ms",
                                                                "ttft_p90_ms", "p99_ms", "hit_rate"], rows)
    bench.stop(router)
    bench.stop(sims)


async def kill(bench: Bench, out: dict) -> None:
    seconds = 8.0 if bench.args.quick else 20.0
    sims, urls = bench.sims("kill", 4, [MODEL], slots=8, step_base_ms=20, step_per_seq_ms=1, prefill_tps=20000)
    routes = bench.work / "kill-routes.json"
    bench.routes(routes, {MODEL: urls}, "least-loaded")
    router = bench.router("router-kill", routes)
    via = f"{router.url}/v1/chat/completions"

    async def killer() -> None:
        await asyncio.sleep(seconds / 2)
        async with httpx.AsyncClient(trust_env=False) as client:
            await client.post(f"{sims.url}/agents/kill-000/kill", timeout=10)

    (results, _), _ = await asyncio.gather(
        closed_loop(lambda i: chat(via, MODEL, "tell me a story", 32, True), 24, seconds), killer())
    before_stream = [r for r in results if not r.ok and not r.started_streaming]
    mid_stream = [r for r in results if not r.ok and r.started_streaming]
    clean = sum(b"stream_interrupted" in r.error.encode() for r in mid_stream)
    out["kill_failed_before_first_byte"] = len(before_stream)
    out["kill_cut_mid_stream"] = len(mid_stream)
    table(f"kill one of 4 agents under load (24 streaming clients, {seconds:.0f} s)",
          ["requests", "ok", "failed_before_first_byte", "cut_mid_stream", "with_error_event"],
          [[len(results), sum(r.ok for r in results), len(before_stream), len(mid_stream), clean]])
    bench.stop(router)
    bench.stop(sims)


async def real(bench: Bench, out: dict) -> None:
    from mlxpool.tinymodel import make_tiny

    model = make_tiny(bench.work / "models" / "tiny", size="tiny", seed=0)
    agents = [components.start_agent(model, bench.logs, name=f"real{i}", extra=["--no-warmup"]) for i in range(2)]
    bench.procs += agents
    routes = bench.work / "real-routes.json"
    bench.routes(routes, {"tiny": [a.url for a in agents if a.url]}, "least-loaded")
    router = bench.router("router-real", routes)
    requests_per_turn = 8 if bench.args.quick else 24
    direct = itertools.cycle(f"{a.url}/v1/chat/completions" for a in agents if a.url)
    via = f"{router.url}/v1/chat/completions"

    async def turn(make: Callable[[int], Body]) -> tuple[list[Result], float]:
        results: list[Result] = []
        counter = itertools.count()
        started = time.perf_counter()
        async with session() as s:
            async def client() -> None:
                while (i := next(counter)) < requests_per_turn:
                    results.append(await send(s, make(i)))
            await asyncio.gather(*(client() for _ in range(4)))
        return results, time.perf_counter() - started

    walls: dict[str, float] = {"direct": 0.0, "router": 0.0}

    def timed(name: str, make: Callable[[int], Body]) -> Callable[[], Awaitable[tuple[list[Result], float]]]:
        async def run() -> tuple[list[Result], float]:
            results, wall = await turn(make)
            walls[name] += wall
            return results, wall
        return run

    body = {"temperature": 0}
    got = await alternate([
        ("direct", timed("direct", lambda i: _with(chat(next(direct), "tiny", f"count to ten {i}", 32, True), body))),
        ("router", timed("router", lambda i: _with(chat(via, "tiny", f"count to ten {i}", 32, True), body)))], 2)
    rows = []
    for name in ("direct", "router"):
        results = got[name]
        tok_s = sum(r.tokens for r in results if r.ok) / walls[name]
        ttfts = [r.ttft for r in results if r.ok and r.ttft is not None]
        rows.append([name, len(results), sum(not r.ok for r in results), round(tok_s, 1), ms(pct(ttfts, 50)),
                     ms(pct(latencies(results), 99))])
        out[f"real_{name}_tok_s"] = round(tok_s, 1)
        out[f"real_{name}_ttft_p50_ms"] = ms(pct(ttfts, 50))
    if out.get("real_direct_tok_s"):
        out["real_router_vs_direct_tok_s"] = round(out["real_router_tok_s"] / out["real_direct_tok_s"], 3)
    table("two real MLX agents (tiny model, CPU), 4 streaming clients, 32 tokens, 2 alternating turns",
          ["path", "requests", "errors", "tok/s", "ttft_p50_ms", "p99_ms"], rows)
    bench.stop(router)
    for a in agents:
        bench.stop(a)


def _with(body: Body, extra: dict) -> Body:
    body.payload.update(extra)
    return body


SECTIONS: dict[str, Callable[[Bench, dict], Awaitable[None]]] = {
    "efficiency": efficiency, "overhead": overhead, "replicas": replicas, "skewed": skewed, "prefix": prefix,
    "kill": kill, "real": real,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter turns and fewer levels (under 5 minutes)")
    parser.add_argument("--litellm", default=shutil.which("litellm") or "/tmp/litellm-venv/bin/litellm",
                        help="the litellm proxy executable (pip install 'litellm[proxy]' in a separate venv)")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip: {', '.join(SKIPPABLE)}")
    parser.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = (args.skip | set(filter(None, args.only.split(",")))) - set(SKIPPABLE)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))} (known: {', '.join(SKIPPABLE)})")
    if args.only:
        args.skip |= set(SECTIONS) - set(args.only.split(","))
    return args


async def run(args: argparse.Namespace, work: Path) -> dict:
    bench = Bench(args, work)
    out: dict = {"bench": "scaling", "quick": args.quick, "load_average_start": load_average(),
                 "cpus": os.cpu_count()}
    started = time.perf_counter()
    try:
        for name, section in SECTIONS.items():
            if name in args.skip:
                continue
            t0 = time.perf_counter()
            try:
                await section(bench, out)
            except Exception as exc:
                print(f"section {name} failed: {exc!r}", flush=True)
                out[f"{name}_error"] = repr(exc)[:300]
            finally:
                bench.stop_all()
            out[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        bench.stop_all()
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["load_average_end"] = load_average()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    work = Path(tempfile.mkdtemp(prefix="mlxpool-scaling-"))
    try:
        out = asyncio.run(run(args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}", flush=True)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
