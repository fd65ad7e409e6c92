"""Soak: mixed traffic through a real router over two real agents, one agent restarted
midway, while the processes' memory, file descriptors and asyncio tasks are sampled.

Leaks show as growth over time, not as failures, so this run measures growth: every
`--interval` seconds it reads each process's RSS (/proc/PID/status), open descriptors
(/proc/PID/fd) and asyncio task count (the `mlxpool_*_asyncio_tasks` gauge of its
/metrics), and reports the least-squares slope per minute of each. The traffic mixes
non-streamed completions, chat completions, streams read to the end and streams the
client drops after two events (a disconnect the servers must clean up after). A third of
the way in, the second agent is stopped (SIGTERM, as Kubernetes stops a pod) and a fresh one takes
its place in the router's routes file.

Every request ends as one of: ok (a complete answer: a 200 body, or a stream ending
with [DONE]), cancelled (dropped by the client on purpose), failed (a clear error: a
4xx/5xx with a JSON error body, or a stream's error event) or lost (no answer at all:
a timeout, a broken connection, a stream cut without an error event). Lost must be 0.

There is no competitor here: nothing else runs our router and agents; the figures are
our own growth and throughput, on a machine that may be shared.

Usage: python -m bench.soak [--seconds 600] [--quick] [--concurrency 4]
(--quick: 30 seconds.) Prints a line per sample, a table per process, and one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from mlxpool.dev import components
from mlxpool.dev.processes import Process
from mlxpool.routing import RouteEndpoint, RoutingTable
from mlxpool.tinymodel import make_tiny

MODEL = "tiny"
TASK_GAUGES = ("mlxpool_agent_asyncio_tasks", "mlxpool_router_asyncio_tasks")
REQUEST_TIMEOUT = 30.0


class Outcome(Enum):
    OK = "ok"
    CANCELLED = "cancelled"
    FAILED = "failed"
    LOST = "lost"


class Kind(Enum):
    COMPLETION = "completion"
    CHAT = "chat"
    STREAM = "stream"
    STREAM_CANCELLED = "stream_cancelled"


ROUTER_KEEPALIVE_EXPIRY_S = 5.0
"""How long the router keeps an idle connection to an agent (httpx's default, PerHostTransport's)."""

MIX = (Kind.COMPLETION, Kind.STREAM, Kind.CHAT, Kind.STREAM_CANCELLED)


@dataclass
class Sample:
    t: float  # seconds since the traffic started
    rss_mib: float
    fds: int
    tasks: float


@dataclass
class Series:
    name: str
    samples: list[Sample] = field(default_factory=list)

    def slope(self, value: Callable[[Sample], float]) -> float:
        """Least-squares slope of `value` over time, per minute (0 with under 3 samples)."""
        if len(self.samples) < 3:
            return 0.0
        ts = [s.t for s in self.samples]
        vs = [value(s) for s in self.samples]
        mt, mv = sum(ts) / len(ts), sum(vs) / len(vs)
        var = sum((t - mt) ** 2 for t in ts)
        if var == 0:
            return 0.0
        return 60.0 * sum((t - mt) * (v - mv) for t, v in zip(ts, vs, strict=True)) / var

    def growth(self, value: Callable[[Sample], float]) -> float:
        """Peak of the last quarter minus peak of the first: growth beyond what load explains."""
        n = len(self.samples)
        if n < 4:
            return 0.0
        q = max(1, n // 4)
        return max(value(s) for s in self.samples[-q:]) - max(value(s) for s in self.samples[:q])

    def summary(self) -> dict:
        if not self.samples:
            return {"samples": 0}
        first, last = self.samples[0], self.samples[-1]
        return {
            "samples": len(self.samples),
            "rss_mib_first": round(first.rss_mib, 1), "rss_mib_last": round(last.rss_mib, 1),
            "rss_mib_per_min": round(self.slope(lambda s: s.rss_mib), 2),
            "rss_mib_growth": round(self.growth(lambda s: s.rss_mib), 1),
            "fds_first": first.fds, "fds_last": last.fds,
            "fds_per_min": round(self.slope(lambda s: s.fds), 2),
            "fds_growth": self.growth(lambda s: s.fds),
            "tasks_first": first.tasks, "tasks_last": last.tasks, "tasks_min": min(s.tasks for s in self.samples),
            "tasks_per_min": round(self.slope(lambda s: s.tasks), 2),
            "tasks_growth": self.growth(lambda s: s.tasks),
        }


@dataclass
class Tally:
    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    lost_reasons: list[str] = field(default_factory=list)
    failed_reasons: list[str] = field(default_factory=list)

    def add(self, kind: Kind, outcome: Outcome, reason: str = "") -> None:
        self.counts[outcome] += 1
        row = self.by_kind.setdefault(kind.value, {o.value: 0 for o in Outcome})
        row[outcome.value] += 1
        reasons = self.lost_reasons if outcome is Outcome.LOST else self.failed_reasons
        if reason and len(reasons) < 20:  # bounded: a summary, not a log
            reasons.append(f"{kind.value}: {reason}")


def write_routes(path: Path, urls: list[str], revision: int) -> None:
    table = RoutingTable(pool="soak", namespace="default", revision=revision, models={
        MODEL: [RouteEndpoint(node=f"node-{i}", url=url) for i, url in enumerate(urls)]})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(table.to_json())
    tmp.replace(path)  # the router never reads half a file


def read_proc(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open descriptors) of `pid`."""
    rss_kib = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
                break
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def task_count(client: httpx.AsyncClient, url: str) -> float:
    text = (await client.get(url + "/metrics", timeout=10)).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in TASK_GAUGES)


async def one_request(client: httpx.AsyncClient, router: str, kind: Kind, n: int, tally: Tally) -> None:
    prompt = f"soak request {n}: tell me about rivers"
    if kind is Kind.CHAT:
        path, body = "/v1/chat/completions", {"model": MODEL, "max_tokens": 8,
                                              "messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 8}
    streamed = kind in (Kind.STREAM, Kind.STREAM_CANCELLED)
    if streamed:
        body["stream"] = True
        body["max_tokens"] = 24
    try:
        if not streamed:
            reply = await client.post(router + path, json=body, timeout=REQUEST_TIMEOUT)
            if reply.status_code == 200 and reply.json().get("choices"):
                tally.add(kind, Outcome.OK)
            elif reply.status_code >= 400 and "error" in _json(reply.text):
                tally.add(kind, Outcome.FAILED, f"{reply.status_code} {reply.text[:200]}")
            else:
                tally.add(kind, Outcome.LOST, f"{reply.status_code} without an error body: {reply.text[:200]}")
            return
        async with client.stream("POST", router + path, json=body, timeout=REQUEST_TIMEOUT) as reply:
            if reply.status_code != 200:
                text = (await reply.aread()).decode(errors="replace")
                outcome = Outcome.FAILED if "error" in _json(text) else Outcome.LOST
                tally.add(kind, outcome, f"{reply.status_code} {text[:200]}")
                return
            events = 0
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    tally.add(kind, Outcome.OK)
                    return
                if "error" in _json(data):
                    tally.add(kind, Outcome.FAILED, f"error event {data[:200]}")
                    return
                events += 1
                if kind is Kind.STREAM_CANCELLED and events >= 2:
                    tally.add(kind, Outcome.CANCELLED)
                    return  # leaving the block closes the connection mid-stream
            tally.add(kind, Outcome.LOST, f"stream cut after {events} events without [DONE] or an error event")
    except httpx.HTTPError as exc:
        tally.add(kind, Outcome.LOST, f"{type(exc).__name__}: {exc}")


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class Soak:
    model: Path
    work: Path
    seconds: float
    concurrency: int = 4
    interval: float = 2.0
    log: Callable[[str], None] = print
    series: dict[str, Series] = field(default_factory=dict)
    tally: Tally = field(default_factory=Tally)
    restart_seconds: float | None = None
    router_in_flight_idle: float | None = None
    """The router's in-flight requests once traffic stopped: a reply never closed stays counted."""
    router_fds_idle: int | None = None
    """The router's descriptors after the traffic, once idle connections expired."""

    def run(self) -> dict:
        logs = self.work / "logs"
        starts = [asyncio.to_thread(components.start_agent, self.model, logs, name=name, extra=["--no-warmup"])
                  for name in ("agent-a", "agent-b")]
        agents = asyncio.run(_gather_started(starts))
        routes = self.work / "routes.json"
        procs: dict[str, Process] = {}
        try:
            write_routes(routes, [a.url or "" for a in agents], 1)
            router = components.start_router(logs, routes_file=routes)
            procs = {"router": router, "agent-a": agents[0], "agent-b": agents[1]}
            return asyncio.run(self._drive(procs, routes))
        finally:
            for proc in [*procs.values(), *agents]:
                proc.stop(10)

    async def _drive(self, procs: dict[str, Process], routes: Path) -> dict:
        router = procs["router"].base_url
        limits = httpx.Limits(max_connections=self.concurrency + 4)
        async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
            await self._until_routed(client, router)
            started = time.monotonic()
            deadline = started + self.seconds
            counter = iter(range(10**9))

            async def worker() -> None:
                while time.monotonic() < deadline:
                    n = next(counter)
                    await one_request(client, router, MIX[n % len(MIX)], n, self.tally)

            async def sampler() -> None:
                while time.monotonic() < deadline:
                    await self._sample(client, procs, time.monotonic() - started)
                    await asyncio.sleep(self.interval)

            async def restarter() -> None:
                await asyncio.sleep(self.seconds / 3)  # early: the fresh agent is sampled too
                began = time.monotonic()
                old = procs.pop("agent-b")
                await asyncio.to_thread(old.stop, 10)
                fresh = await asyncio.to_thread(components.start_agent, self.model, self.work / "logs",
                                                name="agent-b2", extra=["--no-warmup"])
                procs["agent-b2"] = fresh
                write_routes(routes, [procs["agent-a"].base_url, fresh.base_url], 2)
                self.restart_seconds = time.monotonic() - began
                self.log(f"restart: agent-b stopped, agent-b2 at {fresh.url} in {self.restart_seconds:.1f}s")

            await asyncio.gather(sampler(), restarter(), *[worker() for _ in range(self.concurrency)])
            elapsed = time.monotonic() - started
            await asyncio.sleep(1.0)  # the last cancelled streams' cleanup
            # The last sample is taken idle: tasks left then outlived their requests.
            await self._sample(client, procs, time.monotonic() - started)
            self.router_in_flight_idle = await router_in_flight(client, router)
            # Descriptors once idle connections could expire: past the router's keep-alive
            # expiry for agents, then a few round-robin requests (httpcore prunes a pool's
            # expired connections when it is next used). A leak stays; load's peaks go.
            await asyncio.sleep(ROUTER_KEEPALIVE_EXPIRY_S + 1.0)
            for n in range(4):
                await one_request(client, router, Kind.COMPLETION, n, Tally())
            await asyncio.sleep(0.5)
            self.router_fds_idle = (await asyncio.to_thread(read_proc, procs["router"].pid))[1]
        return self._report(elapsed)

    async def _until_routed(self, client: httpx.AsyncClient, router: str) -> None:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                reply = await client.post(router + "/v1/completions", timeout=10,
                                          json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
                if reply.status_code == 200:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError("the router never routed a request")

    async def _sample(self, client: httpx.AsyncClient, procs: dict[str, Process], t: float) -> None:
        parts = []
        for name, proc in list(procs.items()):
            if not proc.alive():
                continue
            try:
                rss, fds = await asyncio.to_thread(read_proc, proc.pid)
                tasks = await task_count(client, proc.base_url)
            except (OSError, httpx.HTTPError):
                continue  # stopped between the check and the read (the restart)
            self.series.setdefault(name, Series(name)).samples.append(Sample(t, rss, fds, tasks))
            parts.append(f"{name} rss={rss:.1f}MiB fds={fds} tasks={tasks:g}")
        counts = " ".join(f"{o.value}={c}" for o, c in self.tally.counts.items())
        self.log(f"t={t:6.1f}s {counts} | " + " | ".join(parts))

    def _report(self, elapsed: float) -> dict:
        counts = {o.value: c for o, c in self.tally.counts.items()}
        answered = counts["ok"] + counts["cancelled"]
        return {
            "seconds": round(elapsed, 1), "concurrency": self.concurrency,
            "requests": counts, "by_kind": self.tally.by_kind,
            "throughput_rps": round(answered / elapsed, 2) if elapsed else 0.0,
            "restart_seconds": round(self.restart_seconds, 1) if self.restart_seconds is not None else None,
            "router_in_flight_idle": self.router_in_flight_idle, "router_fds_idle": self.router_fds_idle,
            "processes": {name: s.summary() for name, s in self.series.items()},
            "lost_reasons": self.tally.lost_reasons, "failed_reasons": self.tally.failed_reasons,
        }


async def router_in_flight(client: httpx.AsyncClient, router: str) -> float:
    """Sum of the router's `mlxpool_router_in_flight_requests` over its endpoints."""
    reply = await client.get(router + "/metrics", timeout=10)
    reply.raise_for_status()
    return sum(float(line.rsplit(" ", 1)[1]) for line in reply.text.splitlines()
               if line.startswith("mlxpool_router_in_flight_requests{"))


async def _gather_started(starts: list) -> list[Process]:
    results = await asyncio.gather(*starts, return_exceptions=True)
    started = [r for r in results if isinstance(r, Process)]
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for proc in started:
            proc.stop()
        raise failed[0]
    return started


def print_table(report: dict) -> None:
    print(f"{'process':<10} {'samples':>7} {'rss MiB first/last':>19} {'MiB/min':>8} "
          f"{'fds first/last':>15} {'fds/min':>8} {'tasks first/last':>17} {'tasks/min':>9}")
    for name, s in report["processes"].items():
        if not s["samples"]:
            continue
        print(f"{name:<10} {s['samples']:>7} {s['rss_mib_first']:>9}/{s['rss_mib_last']:<9} {s['rss_mib_per_min']:>8} "
              f"{s['fds_first']:>7}/{s['fds_last']:<7} {s['fds_per_min']:>8} "
              f"{s['tasks_first']:>8g}/{s['tasks_last']:<8g} {s['tasks_per_min']:>9}")
    print(f"requests {report['requests']} in {report['seconds']}s: {report['throughput_rps']} answered/s; "
          f"agent restart took {report['restart_seconds']}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long the traffic runs (default 600)")
    parser.add_argument("--quick", action="store_true", help="30 seconds")
    parser.add_argument("--concurrency", type=int, default=4, help="clients sending at once (default 4)")
    parser.add_argument("--interval", type=float, default=None, help="seconds between samples (default: ~60 samples)")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: a tiny one made here)")
    args = parser.parse_args()
    seconds = 30.0 if args.quick else args.seconds
    if seconds <= 0 or args.concurrency < 1:
        parser.error("--seconds must be > 0 and --concurrency >= 1")
    interval = args.interval if args.interval is not None else max(1.0, seconds / 60)
    with tempfile.TemporaryDirectory(prefix="mlxpool-soak-") as tmp:
        work = Path(tmp)
        model = args.model or make_tiny(work / "models" / "tiny", size="tiny", seed=0)
        report = Soak(model, work, seconds, args.concurrency, interval).run()
    print_table(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
