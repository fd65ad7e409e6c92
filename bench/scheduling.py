"""Scheduling benchmark: SLA tiers under saturation, `mlxpool agent` against `mlx_lm.server`
(FIFO) side by side, same bench model, same client, in one run.

1. Unloaded: a short request (10 tokens) alone, a few times on each server; the tier
   targets are set from it (the larger of the two medians): `critical` 3x, `high` 10x,
   `low` 10x (sheddable). Ours gets them through its operations API
   (`PUT /v1/node/scheduling/bench`), as an operator would send a pool's spec.scheduling.
2. Mixed workload: 36 closed-loop clients for a fixed time, one third long (200 tokens,
   `low`), two thirds short (10 tokens, `critical`). Per server: short and long latency
   p50/p99, TTFT per tier, total output tok/s.
3. Overload: saturation is measured first (closed loop, 32 clients of the overload mix, on
   each server; the larger rate), then an open-loop Poisson arrival at 1.5x it, three
   classes (critical 20%, high 50% (the issue's middle class, with the `high` target), low
   30% sheddable), four equal tenants (`x-tenant`). Per server: TTFT p50/p99 and SLA
   attainment per tier (a refused request misses), 429 count and latency p99, Jain's index
   across tenants on served output tokens, and for ours the recomputed-token fraction
   (recomputed tokens / all prompt + generated tokens, from /metrics) and preemptions.

Runs alternate between the servers (ours, theirs; the full run adds theirs, ours), only
one driven at a time. mlx_lm.server ignores `priority` and `x-tenant`.
Usage: python -m bench.scheduling [--quick] [--only mixed|overload] [--rate R] [--model PATH] [--log-dir DIR]
(--quick: 20 s per phase, about 4 minutes with start-up; --only: the unloaded targets and that
phase alone, both servers still; --rate: the overload's arrival rate, not measured.) One JSON
line last (the ratios of a phase not run are NaN).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.loadgen import http_client, pct
from bench.serving import OURS, THEIRS, blas_env, make_prompts, start_theirs
from mlxpool.dev.components import start_agent
from mlxpool.tinymodel import make_tiny

MODEL = "bench"
OPS_TOKEN = "bench-scheduling-ops-token"
TENANTS = ("t1", "t2", "t3", "t4")
SHORT_TOKENS, LONG_TOKENS, OVERLOAD_TOKENS = 10, 200, 24
CLASSES = (("critical", 0.2), ("high", 0.5), ("low", 0.3))


@dataclass
class Result:
    tier: str
    tenant: str
    status: int
    ttft_s: float
    latency_s: float
    tokens: int
    prompt_tokens: int = 0


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, tier: str,
              tenant: str = "t1") -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "priority": tier, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens, prompt_tokens = None, 0, 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers={"x-tenant": tenant}) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(tier, tenant, r.status_code, 0.0, time.perf_counter() - start, 0)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens") or tokens
                    prompt_tokens = chunk["usage"].get("prompt_tokens") or prompt_tokens
                if ttft is None and any(c.get("text") for c in chunk.get("choices") or []):
                    ttft = time.perf_counter() - start
    except (httpx.HTTPError, TimeoutError):
        return Result(tier, tenant, 0, 0.0, time.perf_counter() - start, 0)
    latency = time.perf_counter() - start
    return Result(tier, tenant, 200, ttft if ttft is not None else latency, latency, tokens, prompt_tokens)


async def unloaded_ttft(client: httpx.AsyncClient, url: str, model: str, n: int) -> float:
    out = []
    for i, prompt in enumerate(make_prompts(n + 2, seed=3)):
        r = await one(client, url, model, prompt, SHORT_TOKENS, "critical")
        if i >= 2 and r.status == 200:  # two warm-ups
            out.append(r.ttft_s)
    return statistics.median(out)


async def closed_loop(client: httpx.AsyncClient, url: str, model: str, seconds: float,
                      clients: list[tuple[str, int]], seed: int) -> tuple[list[Result], float]:
    """Each (tier, max_tokens) client sends its next request when the last ends, until `seconds` pass."""
    prompts = make_prompts(4000, seed=seed)
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + seconds
    results: list[Result] = []

    async def loop(c: int, tier: str, max_tokens: int) -> None:
        while time.perf_counter() < stop_at:
            i = next(counter)
            results.append(await one(client, url, model, prompts[i % len(prompts)], max_tokens, tier,
                                     TENANTS[c % len(TENANTS)]))

    start = time.perf_counter()
    await asyncio.gather(*(loop(c, t, m) for c, (t, m) in enumerate(clients)))
    return results, time.perf_counter() - start


async def open_loop(client: httpx.AsyncClient, url: str, model: str, seconds: float, rate: float,
                    seed: int) -> tuple[list[Result], float]:
    """Poisson arrivals at `rate`/s for `seconds`, classes and tenants drawn by a seeded stream
    (the same sequence for every server); waits for all to end."""
    rng = random.Random(seed)
    prompts = make_prompts(4000, seed=seed)
    tasks = []
    start = time.perf_counter()
    at, i = 0.0, 0
    while at < seconds:
        tier = rng.choices([c for c, _ in CLASSES], [w for _, w in CLASSES])[0]
        tenant = TENANTS[rng.randrange(len(TENANTS))]
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(client, url, model, prompts[i % len(prompts)], OVERLOAD_TOKENS,
                                             tier, tenant)))
        at += rng.expovariate(rate)
        i += 1
    results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - start


def jain(values: list[float]) -> float:
    return round(sum(values) ** 2 / (len(values) * sum(v * v for v in values)), 4) if any(values) else float("nan")


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def ours_counters(url: str) -> dict[str, float]:
    out = {k: metric(url, f"mlxpool_{k}_total") for k in
           ("recomputed_tokens", "prompt_tokens", "generation_tokens", "preemptions")}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for reason, value in re.findall(r'^mlxpool_requests_rejected_total{[^}]*reason="([^"]+)"[^}]*} (\S+)$', text, re.M):
        out[f"rejected_{reason}"] = out.get(f"rejected_{reason}", 0.0) + float(value)
    return out


def mixed_summary(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.status == 200]
    short = [r for r in ok if r.tier == "critical"]
    long = [r for r in ok if r.tier == "low"]
    return {"requests": len(results), "errors": len(results) - len(ok),
            "short_p50_s": pct([r.latency_s for r in short], 50), "short_p99_s": pct([r.latency_s for r in short], 99),
            "long_p50_s": pct([r.latency_s for r in long], 50), "long_p99_s": pct([r.latency_s for r in long], 99),
            "ttft_critical_p50_s": pct([r.ttft_s for r in short], 50),
            "ttft_critical_p99_s": pct([r.ttft_s for r in short], 99),
            "ttft_low_p50_s": pct([r.ttft_s for r in long], 50), "ttft_low_p99_s": pct([r.ttft_s for r in long], 99),
            "tok_s": round(sum(r.tokens for r in ok) / wall, 1)}


def overload_summary(results: list[Result], wall: float, targets: dict[str, float]) -> dict:
    # tok_s counts what was served: a server that refuses some requests serves fewer tokens.
    # work_tok_s (prompt + output tokens of the served requests per second) is its drain rate.
    out: dict = {"requests": len(results), "tok_s": round(sum(r.tokens for r in results) / wall, 1),
                 "work_tok_s": round(sum(r.tokens + r.prompt_tokens for r in results) / wall, 1),
                 "served": sum(1 for r in results if r.status == 200)}
    for tier, _ in CLASSES:
        mine = [r for r in results if r.tier == tier]
        ok = [r for r in mine if r.status == 200]
        met = sum(1 for r in ok if r.ttft_s <= targets[tier])
        out[f"{tier}_n"] = len(mine)
        out[f"{tier}_ttft_p50_s"] = pct([r.ttft_s for r in ok], 50)
        out[f"{tier}_ttft_p99_s"] = pct([r.ttft_s for r in ok], 99)
        out[f"{tier}_sla"] = round(met / len(mine), 4) if mine else float("nan")
    refused = [r for r in results if r.status == 429]
    out["refused_429"] = len(refused)
    out["errors"] = sum(1 for r in results if r.status not in (200, 429))
    out["reject_p99_ms"] = round(pct([r.latency_s for r in refused], 99) * 1000, 1) if refused else float("nan")
    out["jain_index"] = jain([float(sum(r.tokens for r in results if r.tenant == t)) for t in TENANTS])
    return out


async def run(args: argparse.Namespace, servers: dict[str, tuple[str, str]]) -> dict:
    seconds = 20.0 if args.quick else 60.0
    order = [OURS, THEIRS] if args.quick else [OURS, THEIRS, THEIRS, OURS]
    http = {name: http_client(400, timeout=120) for name in servers}
    ours_url = servers[OURS][0]
    report: dict = {"mixed": {n: [] for n in servers}, "overload": {n: [] for n in servers}}
    try:
        unloaded = {n: await unloaded_ttft(http[n], u, m, 5) for n, (u, m) in servers.items()}
        base = max(unloaded.values())
        targets = {"critical": 3 * base, "high": 10 * base, "low": 10 * base}
        print(f"unloaded short TTFT: {unloaded}; targets (s): {targets}", flush=True)
        policy = {"tiers": [
            {"priority": "critical", "ttft_target_ms": max(1, round(targets["critical"] * 1000)), "preempt": True},
            {"priority": "high", "ttft_target_ms": max(1, round(targets["high"] * 1000))},
            {"priority": "low", "ttft_target_ms": max(1, round(targets["low"] * 1000)), "sheddable": True}]}
        r = await http[OURS].put(f"{ours_url}/v1/node/scheduling/{MODEL}", json=policy,
                                 headers={"authorization": f"Bearer {OPS_TOKEN}"}, timeout=10)
        r.raise_for_status()
        mixed_clients = [("low", LONG_TOKENS)] * 12 + [("critical", SHORT_TOKENS)] * 24
        for k, name in enumerate(order if args.only in (None, "mixed") else []):
            url, model = servers[name]
            results, wall = await closed_loop(http[name], url, model, seconds, mixed_clients, seed=100 + k // 2)
            summary = mixed_summary(results, wall)
            report["mixed"][name].append(summary)
            print(f"mixed {name}: {summary}", flush=True)
        saturation: dict[str, float] = {}
        for name in order[:2] if args.only in (None, "overload") and args.rate is None else []:
            url, model = servers[name]
            sat_clients = [(t, OVERLOAD_TOKENS) for t, w in CLASSES for _ in range(round(32 * w))]
            results, wall = await closed_loop(http[name], url, model, seconds / 2, sat_clients, seed=300)
            saturation[name] = round(sum(1 for r in results if r.status == 200) / wall, 2)
        rate = args.rate or 1.5 * max(saturation.values(), default=0.0)
        print(f"saturation (req/s): {saturation}; overload rate {rate:.2f} req/s", flush=True)
        for k, name in enumerate(order if args.only in (None, "overload") else []):
            url, model = servers[name]
            before = await asyncio.to_thread(ours_counters, ours_url) if name == OURS else None
            results, wall = await open_loop(http[name], url, model, seconds, rate, seed=500 + k // 2)
            summary = overload_summary(results, wall, targets)
            if before is not None:
                after = await asyncio.to_thread(ours_counters, ours_url)
                delta = {k: after[k] - before.get(k, 0.0) for k in after}
                compute = delta["prompt_tokens"] + delta["generation_tokens"]
                summary["recompute_fraction"] = round(delta["recomputed_tokens"] / compute, 4) if compute else 0.0
                summary["preemptions"] = int(delta["preemptions"])
                summary["refused_by_reason"] = {k.removeprefix("rejected_"): int(v) for k, v in delta.items()
                                                if k.startswith("rejected_") and v}
            report["overload"][name].append(summary)
            print(f"overload {name}: {summary}", flush=True)
        report.update(unloaded_ttft_s=unloaded, targets_s=targets, saturation_req_s=saturation, overload_rate=rate)
        return report
    finally:
        for client in http.values():
            await client.aclose()


def mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return round(statistics.fmean(values), 4) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b and a == a and b == b else float("nan")


def tables(report: dict) -> dict:
    mixed, over = report["mixed"], report["overload"]
    keys_m = ["short_p50_s", "short_p99_s", "long_p50_s", "long_p99_s", "ttft_critical_p99_s", "tok_s", "errors"]
    keys_o = ["critical_sla", "high_sla", "low_sla", "critical_ttft_p99_s", "high_ttft_p99_s", "refused_429",
              "reject_p99_ms", "jain_index", "tok_s", "work_tok_s", "served", "errors"]
    print("\nmixed workload (36 clients: 12 long low, 24 short critical)")
    print(f"  {'':<24}" + "".join(f"{n:>16}" for n in (OURS, THEIRS)) + f"{'ratio':>10}")
    for k in keys_m:
        a, b = mean(mixed[OURS], k), mean(mixed[THEIRS], k)
        print(f"  {k:<24}{a:>16}{b:>16}{ratio(a, b):>10}")
    print("overload (1.5x saturation; critical 20%, high 50%, low 30% sheddable; 4 tenants)")
    for k in keys_o:
        a, b = mean(over[OURS], k), mean(over[THEIRS], k)
        print(f"  {k:<24}{a:>16}{b:>16}{ratio(a, b):>10}")
    print(f"  recompute_fraction (ours) {mean(over[OURS], 'recompute_fraction')}, "
          f"preemptions (ours) {mean(over[OURS], 'preemptions')}")
    crit_unloaded = report["unloaded_ttft_s"][OURS]
    return {
        "bench": "scheduling",
        "ratio_short_p50": ratio(mean(mixed[OURS], "short_p50_s"), mean(mixed[THEIRS], "short_p50_s")),
        "ratio_long_p50": ratio(mean(mixed[OURS], "long_p50_s"), mean(mixed[THEIRS], "long_p50_s")),
        "ratio_tok_s": ratio(mean(mixed[OURS], "tok_s"), mean(mixed[THEIRS], "tok_s")),
        "critical_sla": mean(over[OURS], "critical_sla"), "high_sla": mean(over[OURS], "high_sla"),
        "theirs_critical_sla": mean(over[THEIRS], "critical_sla"), "theirs_high_sla": mean(over[THEIRS], "high_sla"),
        "critical_ttft_p99_over_unloaded": ratio(mean(over[OURS], "critical_ttft_p99_s"), crit_unloaded),
        "recompute_fraction": mean(over[OURS], "recompute_fraction"),
        "reject_p99_ms": mean(over[OURS], "reject_p99_ms"),
        "jain_index": mean(over[OURS], "jain_index"), "theirs_jain_index": mean(over[THEIRS], "jain_index"),
        "ratio_overload_tok_s": ratio(mean(over[OURS], "tok_s"), mean(over[THEIRS], "tok_s")),
        "ratio_overload_work_tok_s": ratio(mean(over[OURS], "work_tok_s"), mean(over[THEIRS], "work_tok_s")),
        "unloaded_ttft_s": report["unloaded_ttft_s"], "targets_s": report["targets_s"],
        "saturation_req_s": report["saturation_req_s"], "overload_rate_req_s": round(report["overload_rate"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("mixed", "overload"), help="run this phase alone (after the targets)")
    parser.add_argument("--rate", type=float,
                        help="overload arrivals per second (default: 1.5x the measured saturation)")
    parser.add_argument("--model", type=Path, help="model directory (default: make the bench model)")
    parser.add_argument("--log-dir", type=Path)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-scheduling-"))
    logs = args.log_dir or work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    model = args.model or make_tiny(work / MODEL, "bench", seed=0)
    token = work / "ops-token"
    token.write_text(OPS_TOKEN + "\n")
    config = work / "runtime.yaml"
    config.write_text("priority_scheduling:\n  allow_tenant_header: true\n")
    os.environ.update(blas_env())
    started = time.monotonic()
    ours = start_agent(model, logs, name="mlxpool-agent", ops_token_file=token,
                       extra=["--model-name", MODEL, "--config", str(config)], timeout=600)
    try:
        theirs = start_theirs(model, logs)
        try:
            servers = {OURS: (ours.base_url, MODEL), THEIRS: (theirs.base_url, "default_model")}
            report = asyncio.run(run(args, servers))
        finally:
            theirs.stop(10)
    finally:
        ours.stop(10)
    line = tables(report)
    line["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
