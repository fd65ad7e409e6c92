"""Model switching benchmark: our agent's residency tiers against mlx_lm.server's reloads.

Same model files, same BLAS (OpenBLAS through LD_PRELOAD for both), the same seeded
sequence of requests. Every request is a 1-token completion (greedy): its latency is its
time to first token. A request "switches" when it names another model than the one before;
the added TTFT of a case is the median TTFT of switching requests minus that of
non-switching ones (same models, same run).

- hot: ours holds both models active (`max_models` 4);
- parked: ours has one engine slot with `multi_model.park` on, over a bench-size model and
  one of >= 500 MB: every switch wakes the parked one (`parked_switch_ms` is the big one's);
- page_cache: ours has one slot, no parking, `load_on_request`: every switch unloads one
  and loads the other from page-cache-warm files;
- cold: as page_cache with the page cache dropped before each switch (root only; skipped
  with a note otherwise);
- prefetched: as cold, but after the drop the next model is announced
  (`POST /v1/node/prefetch`, waited for until `warm`) before the request that switches to it
  (`prefetched_switch_ms`: a cold switch that an announcement made page-cache warm);
- mlx_lm.server is asked for the other model through its `model` field (how it switches:
  it loads the named model in place of the one it holds), on the hot case's sequence; ours
  and it take turns request by request (ABBA) and `speedup_vs_mlx_lm` is its total time
  over ours on that sequence; it also takes turns with ours on the parked case's sequence
  (`speedup_vs_mlx_lm_big`: it reloads the >= 500 MB model at every switch into it).
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
OPS_TOKEN = "bench-ops-token"


@dataclass(frozen=True)
class Server:
    url: str
    proc: Process


def make_models(root: Path, quick: bool) -> dict[str, Path]:
    models = root / "models"
    models.mkdir()
    made = {name: make_tiny(models / name, size="bench", seed=seed) for seed, name in enumerate(("a", "b", "c"))}
    # >= 500 MB: hidden 2048, 10 layers of float32 (~0.55 GB).
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
        yield Server(url, proc)
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
        yield Server(url, proc)
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


def ttft(url: str, model: Target) -> float:
    named = {"model": model} if isinstance(model, str) else model
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/completions", json={**named, "prompt": "The fleet serves", "max_tokens": 1,
                                                          "temperature": 0}, timeout=300)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{url} {model}: {response.status_code} {response.text[:300]}")
    return elapsed


def added_ms(seq: list[str], times: list[float], only: str | None = None) -> float | None:
    """Median TTFT of switching requests (into `only`, if set) minus that of the others, in ms."""
    switched = [t for i, t in enumerate(times) if i and seq[i] != seq[i - 1] and (only is None or seq[i] == only)]
    same = [t for i, t in enumerate(times) if i and seq[i] == seq[i - 1] and (only is None or seq[i] == only)]
    if not switched or not same:
        return None
    return round((statistics.median(switched) - statistics.median(same)) * 1000, 2)


def same_ms(seq: list[str], times: list[float], only: str | None = None) -> float | None:
    """Median TTFT of the non-switching requests (into `only`, if set), in ms."""
    same = [t for i, t in enumerate(times) if i and seq[i] == seq[i - 1] and (only is None or seq[i] == only)]
    return round(statistics.median(same) * 1000, 2) if same else None


def turns(seq: list[str], ours: tuple[str, Mapping[str, Target]], them: tuple[str, Mapping[str, Target]]
          ) -> tuple[list[float], list[float]]:
    """Both servers through `seq`, taking turns request by request (ABBA)."""
    ours_t: list[float] = []
    their_t: list[float] = []
    for i, model in enumerate(seq):
        pair = [(ours, ours_t), (them, their_t)]
        for (url, names), times in pair if i % 2 == 0 else pair[::-1]:
            times.append(ttft(url, names[model]))
    return ours_t, their_t


def run(url: str, seq: list[str], name_of: dict[str, str],
        before_switch: Callable[[], object] | None = None) -> list[float]:
    times = []
    for i, model in enumerate(seq):
        if before_switch is not None and i and model != seq[i - 1]:
            before_switch()
        times.append(ttft(url, name_of[model]))
    return times


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
        hot_seq = sequence(["a", "b"], n, seed=11)
        # ---- hot (ours) against mlx_lm.server, turn by turn ----
        config = "multi_model:\n  max_models: 4\n  park: true\n"
        with agent(root, models["a"], config, "ours-hot") as ours, theirs(root, models["a"]) as them:
            load(ours, "b", models["b"])
            ours_names = {"a": "a", "b": "b"}
            their_names = {m: str(models[m]) for m in ("a", "b")}
            ttft(ours.url, "a"), ttft(ours.url, "b"), ttft(them.url, their_names["a"])  # first-use costs out
            ours_t, their_t = turns(hot_seq, (ours.url, ours_names), (them.url, their_names))
            # ---- adapters: two LoRA adapters over a, in the same servers ----
            adapters = {k: make_adapter(models["a"], root / "adapters" / k, seed=seed)
                        for seed, k in ((1, "x"), (2, "y"))}
            for k, path in adapters.items():
                response = ops(ours, "POST", "/models", json={"name": f"a:{k}", "path": str(path), "base": "a"})
                assert response.status_code in (200, 202), response.text
                wait_for(partial(_ready, ours, f"a:{k}"), 300, f"a:{k} ready", ours.proc)
            ours_adapters = {k: f"a:{k}" for k in adapters}
            their_adapters: dict[str, Target] = {k: {"model": str(models["a"]), "adapters": str(p)}
                                                 for k, p in adapters.items()}
            for k in adapters:  # first-use costs out (and a check that both serve the adapters)
                ttft(ours.url, ours_adapters[k]), ttft(them.url, their_adapters[k])
            adapter_seq = sequence(list(adapters), n, seed=15)
            ours_ad, their_ad = turns(adapter_seq, (ours.url, ours_adapters), (them.url, their_adapters))
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
            ttft(ours.url, "a-tuned")  # it serves
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
        out["hot_switch_ms"] = added_ms(hot_seq, ours_t)
        out["ttft_ms"], out["mlx_lm_ttft_ms"] = same_ms(hot_seq, ours_t), same_ms(hot_seq, their_t)
        out["mlx_lm_switch_ms"] = added_ms(hot_seq, their_t)
        out["ours_total_s"], out["mlx_lm_total_s"] = round(sum(ours_t), 3), round(sum(their_t), 3)
        out["speedup_vs_mlx_lm"] = round(sum(their_t) / sum(ours_t), 2)
        print(f"hot: +{out['hot_switch_ms']} ms/switch, mlx_lm.server +{out['mlx_lm_switch_ms']} ms/switch, "
              f"TTFT not switching {out['ttft_ms']} vs {out['mlx_lm_ttft_ms']} ms, "
              f"total {out['ours_total_s']}s vs {out['mlx_lm_total_s']}s ({out['speedup_vs_mlx_lm']}x)", flush=True)
        # ---- parked: one slot, parking on, a and the >= 500 MB model ----
        park_seq = sequence(["a", "big"], n, seed=12)
        config = "multi_model:\n  max_models: 1\n  park: true\n"
        with agent(root, models["big"], config, "ours-parked") as ours, theirs(root, models["big"]) as them:
            load(ours, "a", models["a"])  # big is parked
            ttft(them.url, str(models["big"]))
            times, their_big = turns(park_seq, (ours.url, {"a": "a", "big": "big"}),
                                     (them.url, {m: str(models[m]) for m in ("a", "big")}))
            node = ops(ours, "GET", "").json()
            big = next(m for m in node["models"] if m["name"] == "big")
            out["load_gbps"] = (big.get("weights") or {}).get("load_gbps")
            out["big_model_bytes"] = big.get("memory_bytes")
            metrics = httpx.get(f"{ours.url}/metrics", timeout=10).text
        out["parked_switch_ms"] = added_ms(park_seq, times, only="big")
        out["parked_switch_ms_small"] = added_ms(park_seq, times, only="a")
        out["mlx_lm_big_switch_ms"] = added_ms(park_seq, their_big, only="big")
        out["big_ttft_ms"] = same_ms(park_seq, times, "big")
        out["mlx_lm_big_ttft_ms"] = same_ms(park_seq, their_big, "big")
        out["ours_big_total_s"], out["mlx_lm_big_total_s"] = round(sum(times), 3), round(sum(their_big), 3)
        out["speedup_vs_mlx_lm_big"] = round(sum(their_big) / sum(times), 2)
        out["wake_count"] = _metric(metrics, 'mlxpool_model_switch_seconds_count{tier="parked"}')
        out["wake_seconds_sum"] = _metric(metrics, 'mlxpool_model_switch_seconds_sum{tier="parked"}')
        print(f"parked: +{out['parked_switch_ms']} ms/switch into the {out['big_model_bytes']} B model "
              f"(+{out['parked_switch_ms_small']} ms into the bench one); load {out['load_gbps']} GB/s; "
              f"mlx_lm.server +{out['mlx_lm_big_switch_ms']} ms into it (TTFT not switching {out['big_ttft_ms']} vs "
              f"{out['mlx_lm_big_ttft_ms']} ms), total {out['ours_big_total_s']}s vs "
              f"{out['mlx_lm_big_total_s']}s ({out['speedup_vs_mlx_lm_big']}x)", flush=True)
        # ---- page cache warm and cold: one slot, no parking, load on request ----
        config = (f"multi_model:\n  max_models: 1\n  park: false\n  load_on_request: true\n"
                  f"  load_on_request_sources: [{models['a'].parent}]\n")
        pc_seq = sequence(["a", "b"], n, seed=13)
        with agent(root, models["a"], config, "ours-pagecache") as ours:
            times = run(ours.url, pc_seq, {"a": "a", "b": "b"})
            out["page_cache_switch_ms"] = added_ms(pc_seq, times)
            cold_seq = sequence(["a", "b"], n_cold, seed=14, switch_share=0.6)
            if drop_caches():
                cold = run(ours.url, cold_seq, {"a": "a", "b": "b"}, before_switch=drop_caches)
                out["cold_switch_ms"] = added_ms(cold_seq, cold)
                pf_seq = sequence(["a", "b"], n_cold, seed=16, switch_share=0.6)
                pf_times = []
                for i, m in enumerate(pf_seq):
                    if i and m != pf_seq[i - 1]:
                        drop_caches()
                        prefetch(ours, models[m])
                    pf_times.append(ttft(ours.url, m))
                out["prefetched_switch_ms"] = added_ms(pf_seq, pf_times)
            else:
                out["cold_switch_ms"] = out["prefetched_switch_ms"] = None
                out["cold_note"] = "page cache not dropped: not permitted here"
            metrics = httpx.get(f"{ours.url}/metrics", timeout=10).text
        print(f"page cache warm: +{out['page_cache_switch_ms']} ms/switch; cold: +{out['cold_switch_ms']} ms/switch; "
              f"cold, announced (prefetched): +{out['prefetched_switch_ms']} ms/switch", flush=True)
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
