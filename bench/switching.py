"""Model switching benchmark: our agent's residency tiers against mlx_lm.server's reloads.

Same model files, same BLAS (OpenBLAS through LD_PRELOAD for both), the same seeded
sequence of requests. Every request is a 1-token completion (greedy): its latency is its
time to first token. A request "switches" when it names another model than the one before;
the added TTFT of a case is the median TTFT of switching requests minus that of
non-switching ones (same models, same run).

The alternating sequence (`ALT`): 100 requests (30 with `--quick`, fixed seed) over the three
bench-size models and the >= 500 MB one, each switching with probability 1/2 to one of
the others. Each switch case runs it against mlx_lm.server, the two taking turns request by
request (ABBA), and reports both servers' added TTFT, non-switching TTFT, total time, the
total-time ratio (`speedup_vs_mlx_lm_<case>`) and the bound that ratio has if every one of
our switches were free (`bound_vs_mlx_lm_<case>`: their total over our non-switching TTFT
per request's model). mlx_lm.server is asked for the other model through its `model`
field (how it switches: it loads the named model in place of the one it holds); its side
is the same in every case, ours changes:

- hot: ours holds all four active (`max_models` 4); `speedup_vs_mlx_lm` is this case's;
- parked: ours has one engine slot with `multi_model.park` on: every switch wakes the
  parked one (`parked_switch_ms` is into the >= 500 MB model, `_small` into the others);
- page_cache: ours has one slot, no parking, `load_on_request`: every switch unloads one
  and loads the other from page-cache-warm files;
- cold: as page_cache with the page cache dropped before each server's switching request
  (both servers; root only, skipped with a note otherwise); a shorter sequence;
- prefetched (ours alone): as cold, but after the drop the next model is announced
  (`POST /v1/node/prefetch`, waited for until `warm`) before the request that switches to it
  (`prefetched_switch_ms`: a cold switch that an announcement made page-cache warm).

Every request is the same short prompt (`PROMPT`): both servers keep what they computed
for it (mlx_lm.server its KV, ours its KV and the first token's log-probabilities, so a
repeat is answered with no forward pass: `instant_answers`). Each server gets one HTTP
client for the run.
- Zipf: a trace over 5 models (s=1) replayed through our eviction policy
  (`eviction.replay`, the code the agent runs) with the switch costs measured above: plain
  LRU, cost-aware without parking (memory for 3), and with parking (3 engine slots, memory
  for 5); loads, and the share caused by models with < 2% of the traffic; Belady's offline
  bound for memory for 3. A replay, not a live run (it says so: `zipf_replayed`).

- adapter: two LoRA adapters (mlx-lm's format, `tinymodel.make_adapter`) over bench model
  `a`, loaded into ours over the loaded base (`POST /v1/node/models` with `base`) beside the
  hot case's models; requests alternate between them (`adapter_switch_ms`). mlx_lm.server is
  asked for the base's path with the other adapter in its `adapters` field (how it switches
  adapters: it reloads the base and the adapter); ours and it take turns (ABBA),
  `speedup_vs_mlx_lm_adapters` is its total time over ours.

- shared tensors: a fine-tune of bench model `a` with one layer changed
  (`tinymodel.make_variant(layers=[1])`) loaded into the hot case's agent beside `a`: its own
  `memory_bytes`, `shared_tensor_bytes_saved` from `/v1/node`, and the agent's resident
  memory (VmRSS) before and after the load (`shared_rss_added_bytes`) against the
  fine-tune's whole size (what it adds without sharing, as mlx_lm.server or a second
  process would hold it).

`python -m bench.switching [--quick]`; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from bench.memory import drop_caches
from bench.serving import blas_env
from mlxpool.agent.operations.eviction import Order, fewest_loads, replay
from mlxpool.dev.processes import LOOPBACK, Process, free_port, wait_for
from mlxpool.tinymodel import make_adapter, make_tiny, make_variant

OURS, THEIRS = "mlxpool", "mlx_lm.server"
ALT = ["a", "b", "c", "big"]
"""The alternating sequence's models: the three bench-size ones and the >= 500 MB one."""
OPS_TOKEN = "bench-ops-token"


@dataclass(frozen=True)
class Server:
    url: str
    proc: Process
    client: httpx.Client
    """One client per server for the whole run: a request's time is the server's, not the
    making of an HTTP client (`httpx.post` builds one, TLS context included, per call: tens of
    ms of client CPU on this machine, the same for both servers, which flattened every ratio)."""


def make_models(root: Path, quick: bool) -> dict[str, Path]:
    models = root / "models"
    models.mkdir()
    made = {name: make_tiny(models / name, size="bench", seed=seed) for seed, name in enumerate(("a", "b", "c"))}
    # >= 500 MB: hidden 2048, 10 layers of float32 (1.72 GB).
    made["big"] = make_tiny(models / "big", size="bench", seed=3, hidden=2048, layers=10)
    return made


def sequence(names: list[str], n: int, seed: int, switch_share: float = 0.5) -> list[str]:
    """`n` requests over `names`: each one switches with probability `switch_share` (fixed seed)."""
    rng = random.Random(seed)
    out = [names[0]]
    while len(out) < n:
        out.append(rng.choice([m for m in names if m != out[-1]]) if rng.random() < switch_share else out[-1])
    return out


@contextmanager
def agent(root: Path, first: Path, config: str, name: str) -> Iterator[Server]:
    port = free_port()
    (root / f"{name}.yaml").write_text(config)
    (root / "token").write_text(OPS_TOKEN + "\n")
    argv = [sys.executable, "-m", "mlxpool", "agent", "--host", LOOPBACK, "--port", str(port),
            "--model", str(first), "--model-name", first.name, "--cache-dir", str(root / f"{name}-cache"),
            "--config", str(root / f"{name}.yaml"), "--ops-token-file", str(root / "token"), "--no-warmup"]
    proc = Process.start(name, argv, root / f"{name}.log", env=blas_env())
    url = proc.url = f"http://{LOOPBACK}:{port}"
    try:
        wait_for(lambda: _ok(f"{url}/ready"), 300, f"{name} ready", proc)
        with httpx.Client(timeout=300) as client:
            yield Server(url, proc, client)
    finally:
        proc.stop(15)


@contextmanager
def theirs(root: Path, first: Path) -> Iterator[Server]:
    port = free_port()
    argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(first), "--host", LOOPBACK, "--port", str(port),
            "--log-level", "WARNING"]
    proc = Process.start(THEIRS, argv, root / "mlx_lm.log", env=blas_env())
    url = proc.url = f"http://{LOOPBACK}:{port}"
    try:
        wait_for(lambda: _ok(f"{url}/v1/models"), 300, "mlx_lm.server up", proc)
        with httpx.Client(timeout=300) as client:
            yield Server(url, proc, client)
    finally:
        proc.stop(15)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ops(server: Server, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{server.url}/v1/node{path}", headers={"Authorization": f"Bearer {OPS_TOKEN}"},
                         timeout=60, **kw)


def load(server: Server, name: str, path: Path) -> None:
    response = ops(server, "POST", "/models", json={"name": name, "path": str(path), "warm": False})
    assert response.status_code in (200, 202), response.text
    wait_for(lambda: _ready(server, name), 300, f"{name} ready", server.proc)


def prefetch(server: Server, path: Path) -> None:
    """Announce `path` as next (`POST /v1/node/prefetch`) and wait until its files are read."""
    response = ops(server, "POST", "/prefetch", json={"path": str(path)})
    assert response.status_code == 202, response.text
    want = str(path.resolve())

    def warm() -> bool:
        states = [p for p in ops(server, "GET", "").json()["prefetches"] if p["path"] == want]
        assert not states or states[-1]["phase"] != "failed", states
        return bool(states) and states[-1]["phase"] == "warm"

    wait_for(warm, 120, f"{path.name} prefetched", server.proc)


def _ready(server: Server, name: str) -> bool:
    return any(m["name"] == name and m["phase"] == "ready" for m in ops(server, "GET", "").json()["models"])


Target = str | dict[str, str]
"""What a request names: a model (its `model` field), or fields of the body (mlx_lm.server's `adapters`)."""


def ttft(server: Server, model: Target) -> float:
    named = {"model": model} if isinstance(model, str) else model
    started = time.perf_counter()
    response = server.client.post(f"{server.url}/v1/completions",
                                  json={**named, "prompt": PROMPT, "max_tokens": 1, "temperature": 0})
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{server.url} {model}: {response.status_code} {response.text[:300]}")
    return elapsed


PROMPT = "The fleet serves"
"""Every request's prompt: a 1-token completion of one short prompt, repeated (both servers
keep what they computed for it; ours answers a repeat from its kept first-token row)."""


def added_ms(seq: list[str], times: list[float], only: set[str] | None = None) -> float | None:
    """Median TTFT of switching requests (into `only`, if set) minus that of the others, in ms."""
    switched = [t for i, t in enumerate(times) if i and seq[i] != seq[i - 1] and (only is None or seq[i] in only)]
    same = [t for i, t in enumerate(times) if i and seq[i] == seq[i - 1] and (only is None or seq[i] in only)]
    if not switched or not same:
        return None
    return round((statistics.median(switched) - statistics.median(same)) * 1000, 2)


def same_ms(seq: list[str], times: list[float], only: set[str] | str | None = None) -> float | None:
    """Median TTFT of the non-switching requests (into `only`, if set), in ms."""
    only = {only} if isinstance(only, str) else only
    same = [t for i, t in enumerate(times) if i and seq[i] == seq[i - 1] and (only is None or seq[i] in only)]
    return round(statistics.median(same) * 1000, 2) if same else None


def turns(seq: list[str], ours: tuple[Server, Mapping[str, Target]], them: tuple[Server, Mapping[str, Target]],
          before_switch: Callable[[], object] | None = None) -> tuple[list[float], list[float]]:
    """Both servers through `seq`, taking turns request by request (ABBA); `before_switch`
    runs before each server's request that switches (untimed)."""
    ours_t: list[float] = []
    their_t: list[float] = []
    for i, model in enumerate(seq):
        pair = [(ours, ours_t), (them, their_t)]
        for (server, names), times in pair if i % 2 == 0 else pair[::-1]:
            if before_switch is not None and i and model != seq[i - 1]:
                before_switch()
            times.append(ttft(server, names[model]))
    return ours_t, their_t


def free_bound(seq: list[str], ours: list[float], theirs: list[float]) -> float | None:
    """Their total over what ours would take if none of its switches cost anything (each
    request at our median non-switching TTFT for its model): the most this case can show."""
    same = {m: same_ms(seq, ours, m) for m in set(seq)}
    if any(v is None for v in same.values()):
        return None
    floor = sum(same[m] or 0.0 for m in seq) / 1000
    return round(sum(theirs) / floor, 2) if floor > 0 else None


def case(out: dict, name: str, seq: list[str], ours: list[float], theirs: list[float]) -> None:
    """Both servers' figures for one switch case of the alternating sequence, and its ratio."""
    out[f"{name}_switch_ms"] = added_ms(seq, ours)
    out[f"mlx_lm_{name}_switch_ms"] = added_ms(seq, theirs)
    out[f"{name}_ttft_ms"], out[f"mlx_lm_{name}_ttft_ms"] = same_ms(seq, ours), same_ms(seq, theirs)
    out[f"ours_{name}_total_s"], out[f"mlx_lm_{name}_total_s"] = round(sum(ours), 3), round(sum(theirs), 3)
    out[f"speedup_vs_mlx_lm_{name}"] = round(sum(theirs) / sum(ours), 2)
    out[f"bound_vs_mlx_lm_{name}"] = free_bound(seq, ours, theirs)
    print(f"{name}: +{out[f'{name}_switch_ms']} ms/switch, mlx_lm.server "
          f"+{out[f'mlx_lm_{name}_switch_ms']} ms/switch; TTFT not switching {out[f'{name}_ttft_ms']} vs "
          f"{out[f'mlx_lm_{name}_ttft_ms']} ms; total {out[f'ours_{name}_total_s']}s vs "
          f"{out[f'mlx_lm_{name}_total_s']}s ({out[f'speedup_vs_mlx_lm_{name}']}x, bound with free switches "
          f"{out[f'bound_vs_mlx_lm_{name}']}x)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.switching")
    parser.add_argument("--quick", action="store_true", help="fewer requests; under 5 minutes")
    args = parser.parse_args(argv)
    n = 30 if args.quick else 100
    n_cold = 8 if args.quick else 30
    started = time.monotonic()
    out: dict = {"quick": args.quick, "requests": n, "load_average": [round(x, 2) for x in os.getloadavg()],
                 "zipf_replayed": True}
    root = Path(tempfile.mkdtemp(prefix="bench-switching-"))
    try:
        models = make_models(root, args.quick)
        print(f"models made in {time.monotonic() - started:.1f}s: "
              + ", ".join(f"{k}={sum(p.stat().st_size for p in v.glob('*.safetensors')) / 1e6:.0f}MB"
                          for k, v in models.items()), flush=True)
        alt_seq = sequence(ALT, n, seed=11)
        ours_names = {m: m for m in ALT}
        their_names: dict[str, Target] = {m: str(models[m]) for m in ALT}
        out["alternating"] = {m: alt_seq.count(m) for m in ALT}
        out["alternating_switches"] = sum(1 for i in range(1, n) if alt_seq[i] != alt_seq[i - 1])
        # ---- hot: ours holds all four active; against mlx_lm.server, turn by turn ----
        config = "multi_model:\n  max_models: 4\n  park: true\n"
        with agent(root, models["a"], config, "ours-hot") as ours, theirs(root, models["a"]) as them:
            for m in ALT[1:]:
                load(ours, m, models[m])
            for m in ALT:  # first-use costs out
                ttft(ours, m)
            ttft(them, their_names["a"])
            ours_t, their_t = turns(alt_seq, (ours, ours_names), (them, their_names))
            # ---- adapters: two LoRA adapters over a, in the same servers ----
            adapters = {k: make_adapter(models["a"], root / "adapters" / k, seed=seed)
                        for seed, k in ((1, "x"), (2, "y"))}
            for k, path in adapters.items():
                response = ops(ours, "POST", "/models", json={"name": f"a:{k}", "path": str(path), "base": "a"})
                assert response.status_code in (200, 202), response.text
                wait_for(partial(_ready, ours, f"a:{k}"), 300, f"a:{k} ready", ours.proc)
            ours_adapters: dict[str, Target] = {k: f"a:{k}" for k in adapters}
            their_adapters: dict[str, Target] = {k: {"model": str(models["a"]), "adapters": str(p)}
                                                 for k, p in adapters.items()}
            for k in adapters:  # first-use costs out (and a check that both serve the adapters)
                ttft(ours, ours_adapters[k]), ttft(them, their_adapters[k])
            adapter_seq = sequence(list(adapters), n, seed=15)
            ours_ad, their_ad = turns(adapter_seq, (ours, ours_adapters), (them, their_adapters))
            # ---- shared tensors: a fine-tune of a (layer 1 changed) beside a ----
            tuned = make_variant(models["a"], root / "tuned", seed=21, scale=0.05, layers=[1])
            rss_before = _rss(ours.proc.popen.pid)
            load(ours, "a-tuned", tuned)
            rss_after = _rss(ours.proc.popen.pid)
            node = ops(ours, "GET", "").json()
            state = next(m for m in node["models"] if m["name"] == "a-tuned")
            out["shared_tensor_bytes_saved"] = node.get("shared_tensor_bytes_saved")
            out["shared_model_bytes"] = sum(p.stat().st_size for p in tuned.glob("*.safetensors"))
            out["shared_own_bytes"] = state["memory_bytes"]
            out["shared_rss_added_bytes"] = (rss_after - rss_before if rss_before is not None and rss_after is not None
                                             else None)
            ttft(ours, "a-tuned")  # it serves
            out["instant_answers"] = sum(
                float(line.split()[-1]) for line in httpx.get(f"{ours.url}/metrics", timeout=10).text.splitlines()
                if line.startswith("mlxpool_instant_answers_total"))
        print(f"shared tensors: a fine-tune of {out['shared_model_bytes']} B adds {out['shared_own_bytes']} B "
              f"({out['shared_tensor_bytes_saved']} B saved); resident memory +{out['shared_rss_added_bytes']} B",
              flush=True)
        out["adapter_switch_ms"] = added_ms(adapter_seq, ours_ad)
        out["mlx_lm_adapter_switch_ms"] = added_ms(adapter_seq, their_ad)
        out["ours_adapters_total_s"], out["mlx_lm_adapters_total_s"] = round(sum(ours_ad), 3), round(sum(their_ad), 3)
        out["speedup_vs_mlx_lm_adapters"] = round(sum(their_ad) / sum(ours_ad), 2)
        print(f"adapters: +{out['adapter_switch_ms']} ms/switch, mlx_lm.server +{out['mlx_lm_adapter_switch_ms']} "
              f"ms/switch, total {out['ours_adapters_total_s']}s vs {out['mlx_lm_adapters_total_s']}s "
              f"({out['speedup_vs_mlx_lm_adapters']}x)", flush=True)
        case(out, "hot", alt_seq, ours_t, their_t)
        out["speedup_vs_mlx_lm"] = out["speedup_vs_mlx_lm_hot"]
        out["mlx_lm_switch_ms"] = out["mlx_lm_hot_switch_ms"]
        out["hot_switch_ms_into_big"] = added_ms(alt_seq, ours_t, only={"big"})
        out["mlx_lm_hot_switch_ms_into_big"] = added_ms(alt_seq, their_t, only={"big"})
        # ---- parked: one engine slot, parking on: every switch wakes the one asked for ----
        config = "multi_model:\n  max_models: 1\n  park: true\n"
        with agent(root, models["big"], config, "ours-parked") as ours, theirs(root, models["a"]) as them:
            for m in ("a", "b", "c"):  # each load parks the one before
                load(ours, m, models[m])
            for m in ALT:
                ttft(ours, m)
            ttft(them, their_names["a"])
            times, their_p = turns(alt_seq, (ours, ours_names), (them, their_names))
            node = ops(ours, "GET", "").json()
            big = next(m for m in node["models"] if m["name"] == "big")
            out["load_gbps"] = (big.get("weights") or {}).get("load_gbps")
            out["big_model_bytes"] = big.get("memory_bytes")
            metrics = httpx.get(f"{ours.url}/metrics", timeout=10).text
        case(out, "parked", alt_seq, times, their_p)
        out["parked_switch_ms_all"] = out["parked_switch_ms"]
        out["parked_switch_ms"] = added_ms(alt_seq, times, only={"big"})
        out["parked_switch_ms_small"] = added_ms(alt_seq, times, only={"a", "b", "c"})
        out["mlx_lm_big_switch_ms"] = added_ms(alt_seq, their_p, only={"big"})
        out["big_ttft_ms"] = same_ms(alt_seq, times, {"big"})
        out["mlx_lm_big_ttft_ms"] = same_ms(alt_seq, their_p, {"big"})
        out["speedup_vs_mlx_lm_big"] = out["speedup_vs_mlx_lm_parked"]
        out["wake_count"] = _metric(metrics, 'mlxpool_model_switch_seconds_count{tier="parked"}')
        out["wake_seconds_sum"] = _metric(metrics, 'mlxpool_model_switch_seconds_sum{tier="parked"}')
        print(f"parked: +{out['parked_switch_ms']} ms/switch into the {out['big_model_bytes']} B model "
              f"(+{out['parked_switch_ms_small']} ms into the bench ones); load {out['load_gbps']} GB/s; "
              f"mlx_lm.server +{out['mlx_lm_big_switch_ms']} ms into it (TTFT not switching {out['big_ttft_ms']} vs "
              f"{out['mlx_lm_big_ttft_ms']} ms)", flush=True)
        # ---- page cache warm and cold: one slot, no parking, load on request ----
        config = (f"multi_model:\n  max_models: 1\n  park: false\n  load_on_request: true\n"
                  f"  load_on_request_sources: [{models['a'].parent}]\n")
        with agent(root, models["a"], config, "ours-pagecache") as ours, theirs(root, models["a"]) as them:
            ttft(ours, "a"), ttft(them, their_names["a"])
            times, their_pc = turns(alt_seq, (ours, ours_names), (them, their_names))
            case(out, "page_cache", alt_seq, times, their_pc)
            out["page_cache_switch_ms_into_big"] = added_ms(alt_seq, times, only={"big"})
            out["mlx_lm_page_cache_switch_ms_into_big"] = added_ms(alt_seq, their_pc, only={"big"})
            cold_seq = sequence(ALT, n_cold, seed=14, switch_share=0.6)
            if drop_caches():
                cold, their_cold = turns(cold_seq, (ours, ours_names), (them, their_names), before_switch=drop_caches)
                case(out, "cold", cold_seq, cold, their_cold)
                pf_seq = sequence(ALT, n_cold, seed=16, switch_share=0.6)
                pf_times = []
                for i, m in enumerate(pf_seq):
                    if i and m != pf_seq[i - 1]:
                        drop_caches()
                        prefetch(ours, models[m])
                    pf_times.append(ttft(ours, m))
                out["prefetched_switch_ms"] = added_ms(pf_seq, pf_times)
            else:
                out["cold_switch_ms"] = out["prefetched_switch_ms"] = None
                out["cold_note"] = "page cache not dropped: not permitted here"
        print(f"cold, announced (prefetched): +{out['prefetched_switch_ms']} ms/switch", flush=True)
        # ---- Zipf over 5 models, room for 3: replayed through the agent's policy ----
        reload_s = (out["page_cache_switch_ms"] or 1000) / 1000
        wake_s = max((out["parked_switch_ms_small"] or 1) / 1000, 1e-4)
        names = [f"m{i}" for i in range(5)]
        rng = random.Random(7)
        trace = rng.choices(names, weights=[1 / (i + 1) for i in range(5)], k=1000 if args.quick else 3000)
        costs, wakes = dict.fromkeys(names, reload_s), dict.fromkeys(names, wake_s)
        lru = replay(trace, costs, max_models=3, order=Order.LRU)
        cost = replay(trace, costs, max_models=3, order=Order.COST)
        parked = replay(trace, costs, max_models=3, order=Order.COST, memory_models=5, wake_seconds=wakes)
        bound = fewest_loads(trace, 3)
        out.update(
            zipf_requests=len(trace), lru_loads=lru.loads, cost_loads=cost.loads, parked_loads=parked.loads,
            parked_wakes=parked.wakes, belady_loads=bound,
            loads_ratio_vs_lru=round(parked.loads / lru.loads, 4),
            loads_ratio_vs_lru_no_parking=round(cost.loads / lru.loads, 3),
            belady_ratio_vs_lru=round(bound / lru.loads, 3),
            rare_load_share_lru=round(lru.load_share_below(0.02), 3),
            rare_load_share_ours=round(parked.load_share_below(0.02), 3),
            switch_seconds_lru=round(lru.loads * reload_s, 1),
            switch_seconds_ours=round(parked.loads * reload_s + parked.wakes * wake_s, 1),
        )
        print(f"zipf (replayed): LRU {lru.loads} loads, cost {cost.loads}, parking {parked.loads} loads + "
              f"{parked.wakes} wakes, Belady {bound}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(out))
    return 0


def _rss(pid: int) -> int | None:
    """The process's resident memory (VmRSS) in bytes; None where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _metric(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series):
            return float(line.split()[-1])
    return None


if __name__ == "__main__":
    raise SystemExit(main())
