"""Control-plane benchmark: the operator against a real API server and simulated agents.

Starts the local control plane (etcd + kube-apiserver, `mlxpool.dev.controlplane`),
`--nodes` simulated agents in `--sim-processes` processes (`bench.simagents`, 250 agents
per process by default: real HTTP servers on loopback answering /health and the
operations API without MLX, registering their InferenceNodes and renewing their Leases
every 10 s as the agent identity), and the operator (its own process, as the operator
identity, default settings); with `--shards 2`, two operators, each owning the pools
labelled with its shard (`--pool-selector mlxpool.dev/shard=a|b`; the second leaves the
nodes' Ready condition to the first). Then:

1. converge: `--pools` InferencePools created at once, each with its own model (loaded
   by path, 0.5 s per load) on 2 replicas; the time until every pool is Ready with
   both replicas serving (`converge_100_s` for 100 pools over 50 nodes);
2. steady state: over one resync interval, the operator's API requests (should be 0)
   and reconcile passes;
3. failover: `--kills` times, an agent serving some pools is killed (stops answering,
   port closed); the time from the kill until no routing table lists it any more,
   watched through the API server (p50, p99); it is revived and every pool made whole
   before the next kill.
Also reported: the operator's own API requests per reconcile pass (its /metrics), the
load calls it made (exactly one per replica means no duplicates), the API server's
requests and writes per second at rest (its own /metrics: lease renewals included),
the operator's probes per second at rest, its CPU (cores) and RSS at rest and while
converging (/proc; summed over the operators with `--shards 2`), the CPU of the
simulated agents, kube-apiserver and etcd, the agents' failed heartbeats (renewals that
timed out or were refused), with two shards the models each shard loaded for the
other's pools (must be 0), and the machine's load average before anything started (the
figures mean little on a busy machine).

Usage: python -m bench.controlplane [--quick] [--pools N] [--nodes N] [--kills N] [--curve] [--shards 2]
Prints a table, then one JSON line last. `--quick`: 100 nodes, 50 pools, 8 kills (a few
minutes). The default is the full fleet, 1,000 nodes and 500 pools; `--curve` runs
100/50, 300/150 and 1,000/500 one after the other (a fresh control plane each) and
prints the growth curve.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from mlxpool.dev.controlplane import REPO_ROOT, SYSTEM_NAMESPACE, ControlPlane
from mlxpool.dev.processes import Process
from mlxpool.resources import LABEL_POOL, ROUTES_DATA_KEY

NAMESPACE = "bench"
LABEL = "mlxpool.dev/bench"
REPLICAS = 2
STEADY_SECONDS = 20.0
HEARTBEAT_SECONDS = 10.0
CURVE = ((100, 50), (300, 150), (1000, 500))
AGENTS_PER_PROCESS = 250
SHARD_LABEL = "mlxpool.dev/shard"
SHARDS = "ab"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE"}
FAILOVER_TIMEOUT_S = 30.0
"""A kill not unrouted by then counts as this long (a miss), and the run goes on."""
API_REQUESTS, RECONCILES = "mlxpool_operator_api_requests_total", "mlxpool_operator_reconciles_total"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.controlplane", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 nodes, 50 pools, 8 kills (under 5 minutes)")
    parser.add_argument("--pools", type=int)
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--curve", action="store_true", help="100/300/1,000 nodes one after the other")
    parser.add_argument("--converge-timeout", type=float, default=300.0)
    parser.add_argument("--kills", type=int, help="agents to kill one after the other (default 20, quick: 8)")
    parser.add_argument("--load-seconds", type=float, default=0.5)
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temporary directory)")
    parser.add_argument("--sim-processes", type=int, help=f"simulated-agent processes (default: one per "
                                                          f"{AGENTS_PER_PROCESS} agents)")
    parser.add_argument("--shards", type=int, choices=(1, 2), default=1,
                        help="operators, each owning the pools of its shard (label mlxpool.dev/shard)")
    parser.add_argument("--operator-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for the operator, e.g. --operator-arg=--watch-interval=10")
    args = parser.parse_args(argv)
    if args.kills is None:
        args.kills = 8 if args.quick else 20
    if args.nodes is None:
        args.nodes = 100 if args.quick else 1000
    if args.pools is None:
        args.pools = 50 if args.quick else 500
    return args


def sim_processes(args: argparse.Namespace) -> int:
    return args.sim_processes or max(1, math.ceil(args.nodes / AGENTS_PER_PROCESS))


class Usage:
    """A process's CPU time and RSS, from /proc (Linux)."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids

    def cpu_seconds(self) -> float:
        """Summed over the processes."""
        total = 0.0
        for pid in self.pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        return total

    def rss_mb(self) -> float:
        """The largest of the processes'."""
        largest = 0.0
        for pid in self.pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    largest = max(largest, int(line.split()[1]) / 1024)
        return largest


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 20 samples is the largest)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


class Api:
    """The admin's view of the API server, for the benchmark's own reads and writes."""

    def __init__(self, cp: ControlPlane) -> None:
        verify = ssl.create_default_context(cafile=str(cp.workdir / "certs" / "apiserver.crt"))
        self.client = httpx.AsyncClient(base_url=cp.server, verify=verify, timeout=30,
                                        headers={"Authorization": f"Bearer {cp.tokens['admin']}"})

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """A request, retried while the API server says 429 (a new CRD's storage initializing,
        or too many requests in flight) and, for reads, when it does not answer in 30 s (the
        two-shard run at 1,000 nodes died on one such list)."""
        for attempt in range(50):
            try:
                response = await self.client.request(method, url, **kwargs)
            except httpx.ReadTimeout:
                if method != "GET" or attempt >= 3:
                    raise
                print(f"  the API server did not answer GET {url} in 30 s: again", flush=True)
                continue
            if response.status_code != 429:
                response.raise_for_status()
                return response
            await asyncio.sleep(0.2)
        response.raise_for_status()
        return response

    async def create_pool(self, index: int, shards: int = 1) -> None:
        labels = {SHARD_LABEL: shard_of(index)} if shards > 1 else {}
        body = {"apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
                "metadata": {"name": f"pool-{index:03d}", "namespace": NAMESPACE, "labels": labels},
                "spec": {"models": [{"name": f"model-{index:03d}", "source": f"file:///sim/model-{index:03d}"}],
                         "replicas": REPLICAS, "nodeSelector": {"matchLabels": {LABEL: "true"}}}}
        await self.request("POST", f"/apis/mlxpool.dev/v1alpha1/namespaces/{NAMESPACE}/inferencepools", json=body)

    async def pools(self) -> list[dict]:
        response = await self.request("GET", f"/apis/mlxpool.dev/v1alpha1/namespaces/{NAMESPACE}/inferencepools")
        return response.json()["items"]

    async def request_counts(self) -> dict[str, float]:
        """The API server's own count of the requests it served: all of them, writes, and
        each `verb resource[/subresource] code` (key "by <verb> <resource> <code>")."""
        text = (await self.request("GET", "/metrics")).text
        counts = {"requests": 0.0, "writes": 0.0}
        for line in text.splitlines():
            if line.startswith("apiserver_request_total{"):
                labels, value = line.rsplit(" ", 1)
                verb = re.search(r'verb="([A-Z]+)"', labels)
                counts["requests"] += float(value)
                if verb and verb.group(1) in WRITE_VERBS:
                    counts["writes"] += float(value)
                found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
                if verb and found.get("resource"):
                    what = found["resource"] + (f"/{found['subresource']}" if found.get("subresource") else "")
                    key = f"by {verb.group(1)} {what} {found.get('code', '?')}"
                    counts[key] = counts.get(key, 0.0) + float(value)
        return counts

    async def node_count(self) -> int:
        response = await self.request("GET", "/apis/mlxpool.dev/v1alpha1/inferencenodes",
                                      params={"labelSelector": LABEL})
        return len(response.json()["items"])


def shard_of(index: int) -> str:
    return SHARDS[index % len(SHARDS)]


def pool_ready(pool: dict) -> bool:
    status = pool.get("status") or {}
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
    return (status.get("observedGeneration") == pool["metadata"]["generation"] and ready.get("status") == "True"
            and status.get("readyReplicas") == pool["spec"]["replicas"])


async def until_all_ready(api: Api, count: int, timeout: float, *, at_least: int | None = None,
                          progress: bool = False) -> float:
    """Seconds until every pool (or `at_least` of them) is Ready, polling the list every
    0.2 s, or every `count / 500` s (a list of 500 pools is ~1 MB for the API server to
    serve and us to parse: five a second was a load of its own); with `progress`, the
    count Ready every 10 s is printed (where a miss stalls)."""
    poll = max(0.2, count / 500)
    started = last_print = time.monotonic()
    while time.monotonic() - started < timeout:
        pools = await api.pools()
        ready = sum(map(pool_ready, pools))
        if len(pools) == count and ready >= (count if at_least is None else at_least):
            return time.monotonic() - started
        if progress and time.monotonic() - last_print >= 10:
            last_print = time.monotonic()
            print(f"  {last_print - started:.0f}s: {ready}/{count} pools Ready", flush=True)
        await asyncio.sleep(poll)
    pending = [p["metadata"]["name"] for p in await api.pools() if not pool_ready(p)]
    raise TimeoutError(f"{len(pending)} pools not Ready after {timeout}s: {pending[:5]}")


class TableWatch:
    """Every routing table in the namespace, kept current by a watch; `changed` fires on each event."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.routed: dict[str, set[str]] = {}
        self.changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        listed = await self.api.request("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps",
                                        params={"labelSelector": LABEL_POOL})
        for item in listed.json()["items"]:
            self._apply(item)
        self._task = asyncio.create_task(self._watch(listed.json()["metadata"]["resourceVersion"]))

    def _apply(self, cm: dict, deleted: bool = False) -> None:
        name = cm["metadata"]["name"]
        if deleted:
            self.routed.pop(name, None)
        else:
            table = json.loads(cm["data"][ROUTES_DATA_KEY])
            self.routed[name] = {e["node"] for routes in table["models"].values() for e in routes}
        self.changed.set()

    async def _watch(self, version: str) -> None:
        params = {"labelSelector": LABEL_POOL, "watch": "true", "resourceVersion": version,
                  "allowWatchBookmarks": "false"}
        async with self.api.client.stream("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps", params=params,
                                          timeout=httpx.Timeout(30, read=None)) as response:
            async for line in response.aiter_lines():
                if line.strip():
                    event = json.loads(line)
                    self._apply(event["object"], deleted=event["type"] == "DELETED")

    def listing(self, node: str) -> list[str]:
        return [t for t, nodes in self.routed.items() if node in nodes]

    async def until_gone(self, node: str, timeout: float) -> float:
        started = time.monotonic()
        while self.listing(node):
            self.changed.clear()
            remaining = timeout - (time.monotonic() - started)
            if remaining <= 0:
                raise TimeoutError(f"{node} still routed by {self.listing(node)[:3]} after {timeout}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return time.monotonic() - started

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def operator_counters(urls: list[str]) -> dict[str, float]:
    """Sums of the operators' counters we report, from their /metrics."""
    text = "\n".join(httpx.get(f"{url}/metrics", timeout=10).text for url in urls)
    sums: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(mlxpool_operator_(?:api_requests|reconciles|cache_reconciles|agent_requests|probes)_total)"
                         r"(\{[^}]*\})? (\S+)$", line)
        if match:
            name, labels, value = match.groups()
            if name == "mlxpool_operator_reconciles_total" and labels and 'outcome="error"' in labels:
                sums["errors"] = sums.get("errors", 0) + float(value)
            if name == "mlxpool_operator_agent_requests_total" and labels and 'operation="load"' in labels:
                sums["loads"] = sums.get("loads", 0) + float(value)
            sums[name] = sums.get(name, 0) + float(value)
    return sums


def per_reconcile(before: dict, after: dict) -> float:
    requests = after.get(API_REQUESTS, 0) - before.get(API_REQUESTS, 0)
    passes = after.get(RECONCILES, 0) - before.get(RECONCILES, 0)
    return requests / passes if passes else 0.0


def control(url: str, name: str, action: str) -> None:
    httpx.post(f"{url}/agents/{name}/{action}", json={}, timeout=30).raise_for_status()


def heartbeat_failures(workdir: Path) -> int:
    """Failed heartbeats (lease renewals and status writes) the simulated agents logged."""
    return sum(path.read_text().count("inferencenode heartbeat failed") for path in workdir.glob("simagents-*.log"))


def foreign_loads(urls: list[str]) -> int:
    """Models that one shard's operator loaded for a pool of the other shard."""
    foreign = 0
    for url in urls:
        for agent in httpx.get(f"{url}/agents", timeout=30).json():
            for model, owner in agent["owners"].items():
                index = int(model.rsplit("-", 1)[1])
                if owner and f"{SHARD_LABEL}={shard_of(index)}" not in owner:
                    foreign += 1
    return foreign


async def run(args: argparse.Namespace, workdir: Path) -> dict:
    load_at_start = os.getloadavg()[0]  # before we start anything: is someone else busy?
    cp = ControlPlane(workdir / "controlplane").start()
    procs: list[Process] = []
    try:
        cp.kubectl("create", "namespace", SYSTEM_NAMESPACE)
        cp.kubectl("create", "namespace", NAMESPACE)
        crds = sorted((REPO_ROOT / "crds").glob("*.yaml"))
        cp.apply(*crds)
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", *[f"-f={c}" for c in crds])
        cp.kubectl("apply", "-k", str(REPO_ROOT / "manifests" / "rbac"))
        token = workdir / "ops-token"
        token.write_text("bench-ops-token")

        processes = sim_processes(args)
        per_process = math.ceil(args.nodes / processes)
        sims: list[Process] = []
        for k, first in enumerate(range(0, args.nodes, per_process)):
            sims.append(Process.start(f"simagents-{k}", [
                sys.executable, "-m", "bench.simagents", "--count", str(min(per_process, args.nodes - first)),
                "--first", str(first), "--prefix", "node",
                "--kubeconfig", str(cp.kubeconfig("agent")), "--label", f"{LABEL}=true",
                "--heartbeat-interval", str(HEARTBEAT_SECONDS),
                "--ops-token-file", str(token), "--max-models", "8", "--memory-gib", "64", "--model-gib", "2",
                "--load-seconds", str(args.load_seconds)], workdir / f"simagents-{k}.log",
                env={"PYTHONPATH": str(REPO_ROOT)}))
            procs.append(sims[-1])
        sims_urls = [sim.wait_for_log(r"simagents ready url=(http://\S+)", 600).group(1) for sim in sims]
        api = Api(cp)
        while await api.node_count() < args.nodes:  # noqa: ASYNC110 (polling the apiserver: no event to wait on)
            await asyncio.sleep(0.2)

        operators: list[Process] = []
        for k in range(args.shards):
            shard = ["--pool-selector", f"{SHARD_LABEL}={SHARDS[k]}"] if args.shards > 1 else []
            conditions = ["--no-node-conditions"] if k > 0 else []  # one shard writes the nodes' Ready
            operators.append(Process.start(f"operator-{k}", [
                sys.executable, "-m", "mlxpool", "operator", "--kubeconfig", str(cp.kubeconfig("operator")),
                "--namespace", NAMESPACE, "--metrics-port", "0", "--agent-token-file", str(token),
                "--log-format", "full", *shard, *conditions, *args.operator_arg], workdir / f"operator-{k}.log"))
            procs.append(operators[-1])
        metrics_urls = [op.wait_for_log(r"operator ready url=(http://[0-9.]+:\d+)", 120).group(1)
                        for op in operators]
        await asyncio.sleep(2.0 + args.nodes / 200)  # every node probed and reported once
        control_plane = {p.name: p.pid for p in cp.processes}
        usages = {"operator": Usage(*(op.pid for op in operators)), "sims": Usage(*(s.pid for s in sims)),
                  "apiserver": Usage(control_plane["kube-apiserver"]), "etcd": Usage(control_plane["etcd"])}
        counters = await measure(api, args, metrics_urls, sims_urls, usages)
        counters["heartbeat_failures"] = await asyncio.to_thread(heartbeat_failures, workdir)
        counters["processes"] = processes
        if args.shards > 1:
            counters["foreign_loads"] = await asyncio.to_thread(foreign_loads, sims_urls)
        await api.client.aclose()
        return summarize(args, counters, load_at_start)
    finally:
        for proc in reversed(procs):
            proc.stop()
        cp.stop()


async def measure(api: Api, args: argparse.Namespace, metrics_urls: list[str], sims_urls: list[str],
                  usages: dict[str, Usage]) -> dict:
    """The three phases; the operators' counters between them, and the measured times."""
    per_process = math.ceil(args.nodes / len(sims_urls))

    def sims_url(node: str) -> str:
        return sims_urls[int(node.rsplit("-", 1)[1]) // per_process]

    async def counters() -> dict[str, float]:
        found = await asyncio.to_thread(operator_counters, metrics_urls)  # blocking GETs: off the loop
        found.update({f"apiserver_{k}": v for k, v in (await api.request_counts()).items()})
        for who, usage in usages.items():
            found[f"{who}_cpu_s"] = usage.cpu_seconds()
        found["cpu_s"], found["rss_mb"], found["t"] = found["operator_cpu_s"], usages["operator"].rss_mb(), \
            time.monotonic()
        return found

    # 1. Convergence.
    before = await counters()
    started = time.monotonic()
    # 16 in flight, as a client would: 100 at once, with the agents' renewals and the
    # operator's writes, went over the API server's 200 mutating requests in flight (429s).
    slots = asyncio.Semaphore(16)

    async def create(index: int) -> None:
        async with slots:
            await api.create_pool(index, args.shards)

    await asyncio.gather(*(create(i) for i in range(args.pools)))
    print(f"  created {args.pools} pools in {time.monotonic() - started:.1f}s", flush=True)
    converge: float | None = None
    try:
        await until_all_ready(api, args.pools, timeout=args.converge_timeout, progress=True)
        converge = time.monotonic() - started
        print(f"converged: {args.pools} pools over {args.nodes} nodes in {converge:.2f}s", flush=True)
    except TimeoutError as exc:  # a miss is a figure too: measure the rest
        print(f"not converged: {exc}", flush=True)
    converged = await counters()
    ready = sum(map(pool_ready, await api.pools()))

    # 2. Steady state: once the agents' heartbeats list the new models (5 s), nothing changes,
    # so nothing should be written. Measured over one resync interval (10 s): every pool
    # passes once in it, whenever it converged. The wait grows with the fleet: at 1,000
    # nodes the operator's first Ready-condition writes (8 in flight) were still draining
    # 6 s after convergence, and were counted as "at rest".
    await asyncio.sleep(6.0 + args.nodes / 40)
    quiet = await counters()
    await asyncio.sleep(STEADY_SECONDS)
    steady = await counters()

    # 3. Failover, one agent at a time.
    watch = TableWatch(api)
    await watch.start()
    latencies: list[float] = []
    victims = iter([f"node-{i:03d}" for i in range(args.nodes)] * 4)  # round-robin over agents serving something
    for _ in range(args.kills):  # not converged: failovers of the routed agents all the same
        victim = next(v for v in victims if watch.listing(v))
        listed_by = len(watch.listing(victim))
        kill_started = time.monotonic()
        await asyncio.to_thread(control, sims_url(victim), victim, "kill")
        try:
            await watch.until_gone(victim, timeout=FAILOVER_TIMEOUT_S)
        except TimeoutError as exc:  # a miss is a figure: counted at the timeout, the run goes on
            print(f"  {exc}", flush=True)
        latency = time.monotonic() - kill_started  # from before the kill: the kill itself counts
        latencies.append(latency)
        print(f"  killed {victim} (in {listed_by} tables): unrouted after {latency:.3f}s", flush=True)
        await asyncio.to_thread(control, sims_url(victim), victim, "revive")
        try:  # whole again (or as whole as when converging stopped)
            await until_all_ready(api, args.pools, timeout=60, at_least=None if converge is not None else ready)
        except TimeoutError as exc:
            print(f"  not whole again after the revival: {exc}", flush=True)
            break
    await watch.stop()
    return {"before": before, "converged": converged, "quiet": quiet, "steady": steady, "end": await counters(),
            "converge": converge, "latencies": latencies, "ready": ready}


def breakdown(a: dict, b: dict, top: int = 12) -> dict[str, int]:
    """The API server's requests from `a` to `b` by verb, resource and code, the most first."""
    keys = [k for k in b if k.startswith("apiserver_by ")]
    counts = {k.removeprefix("apiserver_by "): int(b[k] - a.get(k, 0)) for k in keys}
    return dict(sorted(((k, n) for k, n in counts.items() if n > 0), key=lambda kv: -kv[1])[:top])


def summarize(args: argparse.Namespace, m: dict, load_at_start: float) -> dict:
    before, converged, quiet, steady, end = (m[k] for k in ("before", "converged", "quiet", "steady", "end"))
    latencies = m["latencies"]

    def rate(name: str) -> float:
        return round((steady.get(name, 0) - quiet.get(name, 0)) / (steady["t"] - quiet["t"]), 3)

    def cores(a: dict, b: dict, who: str = "operator") -> float:
        return round((b[f"{who}_cpu_s"] - a[f"{who}_cpu_s"]) / (b["t"] - a["t"]), 3)

    return {
        "pools": args.pools, "nodes": args.nodes, "replicas": REPLICAS, "kills": args.kills,
        "shards": args.shards, "sim_processes": m["processes"],
        **({"converge_100_s": round(m["converge"], 3)} if args.pools == 100 and m["converge"] else {}),
        "converge_s": round(m["converge"], 3) if m["converge"] is not None else None,
        "pools_ready_at_converge": m["ready"],
        "failover_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "failover_p99_s": round(percentile(latencies, 99), 3) if latencies else None,
        "failover_max_s": round(max(latencies), 3) if latencies else None,
        "failovers": len(latencies),
        "failover_misses": sum(latency >= FAILOVER_TIMEOUT_S for latency in latencies),
        "converge_reconciles": int(converged.get(RECONCILES, 0) - before.get(RECONCILES, 0)),
        "converge_api_requests_per_reconcile": round(per_reconcile(before, converged), 3),
        "steady_api_requests_per_s": rate(API_REQUESTS),
        "steady_reconciles_per_s": rate(RECONCILES),
        "api_requests_per_reconcile": round(per_reconcile(before, end), 3),
        "converge_load_calls": int(converged.get("loads", 0) - before.get("loads", 0)),
        "load_calls_total": int(end.get("loads", 0)),
        "reconcile_errors": int(end.get("errors", 0)),
        "converge_apiserver_requests": breakdown(before, converged),
        "steady_apiserver_requests_per_s": rate("apiserver_requests"),
        "steady_apiserver_requests": breakdown(quiet, steady),
        "steady_apiserver_writes_per_s": rate("apiserver_writes"),
        "steady_apiserver_writes_per_node_per_10s": round(rate("apiserver_writes") * 10 / args.nodes, 3),
        "steady_probes_per_s": rate("mlxpool_operator_probes_total"),
        "operator_cpu_cores_converging": cores(before, converged),
        "operator_cpu_cores_at_rest": cores(quiet, steady),
        "operator_rss_mb_converged": round(converged["rss_mb"], 1),
        "operator_rss_mb_at_rest": round(steady["rss_mb"], 1),
        **{f"{who}_cpu_cores_{phase}": cores(a, b, who) for who in ("sims", "apiserver", "etcd")
           for phase, (a, b) in (("converging", (before, converged)), ("at_rest", (quiet, steady)))},
        "heartbeat_failures": m["heartbeat_failures"],
        **({"foreign_loads": m["foreign_loads"]} if "foreign_loads" in m else {}),
        "load_avg_1m_at_start": round(load_at_start, 2),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }


def print_table(result: dict) -> None:
    rows = [
        ("pools / nodes / replicas", f"{result['pools']} / {result['nodes']} / {result['replicas']}"),
        ("operators (shards) / agent processes", f"{result['shards']} / {result['sim_processes']}"),
        ("converge (all pools Ready)", f"{result['converge_s']} s ({result['pools_ready_at_converge']} Ready)"),
        ("failover p50 / p99 / max", f"{result['failover_p50_s']} / {result['failover_p99_s']} / "
                                     f"{result['failover_max_s']} s over {result['failovers']} kills"),
        (f"failovers past the {FAILOVER_TIMEOUT_S:g} s timeout", str(result["failover_misses"])),
        ("reconcile passes to converge", str(result["converge_reconciles"])),
        ("API server requests while converging", ", ".join(f"{k}: {n}" for k, n in
                                                           result["converge_apiserver_requests"].items())),
        ("API requests per reconcile (converge)", f"{result['converge_api_requests_per_reconcile']:.3f}"),
        ("API requests per reconcile (whole run)", f"{result['api_requests_per_reconcile']:.3f}"),
        ("steady state: API requests / s", f"{result['steady_api_requests_per_s']:.2f}"),
        ("steady state: reconciles / s", f"{result['steady_reconciles_per_s']:.2f}"),
        ("load calls to converge (expected)",
         f"{result['converge_load_calls']} ({result['pools'] * result['replicas']})"),
        ("reconcile errors", str(result["reconcile_errors"])),
        ("API server at rest: requests / writes per s", f"{result['steady_apiserver_requests_per_s']:.1f} / "
                                                        f"{result['steady_apiserver_writes_per_s']:.1f} "
                                                        f"({result['steady_apiserver_writes_per_node_per_10s']:.2f}"
                                                        " per node per 10 s)"),
        ("API server requests at rest", ", ".join(f"{k}: {n}" for k, n in result["steady_apiserver_requests"].items())),
        ("probes / s at rest", f"{result['steady_probes_per_s']:.1f}"),
        ("operator CPU converging / at rest", f"{result['operator_cpu_cores_converging']:.2f} / "
                                              f"{result['operator_cpu_cores_at_rest']:.2f} cores"),
        ("operator RSS converged / at rest", f"{result['operator_rss_mb_converged']:.0f} / "
                                             f"{result['operator_rss_mb_at_rest']:.0f} MB"),
        *((f"{who} CPU converging / at rest", f"{result[f'{who}_cpu_cores_converging']:.2f} / "
                                              f"{result[f'{who}_cpu_cores_at_rest']:.2f} cores")
          for who in ("sims", "apiserver", "etcd")),
        ("agents' failed heartbeats", str(result["heartbeat_failures"])),
        *((("models loaded for the other shard's pools", str(result["foreign_loads"])),)
          if "foreign_loads" in result else ()),
        ("load average (1 min) at start / end", f"{result['load_avg_1m_at_start']} / {result['load_avg_1m_at_end']}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def one_run(args: argparse.Namespace) -> dict:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        for log in (*args.workdir.glob("simagents*.log"), *args.workdir.glob("operator*.log")):
            log.unlink()  # logs are appended to: a reused workdir must not mislead
        return asyncio.run(run(args, args.workdir))
    with tempfile.TemporaryDirectory(prefix="mlxpool-bench-") as tmp:
        return asyncio.run(run(args, Path(tmp)))


CURVE_KEYS = ("nodes", "pools", "converge_s", "failover_p50_s", "failover_p99_s", "operator_cpu_cores_at_rest",
              "operator_cpu_cores_converging", "operator_rss_mb_at_rest", "steady_apiserver_writes_per_s",
              "steady_probes_per_s", "converge_api_requests_per_reconcile")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.curve:
        result = one_run(args)
        print_table(result)
        print(json.dumps(result))
        return 0
    runs = []
    for nodes, pools in CURVE:
        args.nodes, args.pools = nodes, pools
        try:
            runs.append(one_run(args))
        except TimeoutError as exc:  # a size that does not converge is a figure too
            runs.append({"nodes": nodes, "pools": pools, "error": str(exc)[:200]})
        print_table(runs[-1]) if "error" not in runs[-1] else print(runs[-1], flush=True)
    print(" | ".join(CURVE_KEYS))
    for run_ in runs:
        print(" | ".join(str(run_.get(k, "-")) for k in CURVE_KEYS))
    print(json.dumps({"curve": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
