"""Memory benchmark: the native weight manager and memory admission against mlx_lm.server.

Side by side, alternating turns (ABAB), same model files, same BLAS (OpenBLAS through
LD_PRELOAD for both):
- load rate from page cache: `mlx_lm.load` vs our loader (`engine.loading.load`, native
  reader, no pinning), each load in a fresh process (ours with the huge-page malloc tunable
  the agent sets for itself, mlx-lm without, as mlx_lm.server runs; mlx-lm with it too, as
  a third figure), the files read once before so both read from page cache; GB/s of
  weight bytes over the time to a usable model.
- cold start: process start to first token (a 1-token completion polled until it
  answers), the page cache dropped before each start (`echo 1 > /proc/sys/vm/drop_caches`;
  skipped with a note where not permitted), mlx_lm.server vs our agent (native load,
  prefetch, warm-up before /ready).
- memory soak: long prompts (cut by the model's tokenizer so that prompt + max_tokens fits
  its context), all distinct, the same texts for both servers, sent at once, whose projected KV is twice what
  the cap leaves; each server in its own memory cgroup (v2 memory.max or v1
  memory.limit_in_bytes, where we may create one) capped at the same bytes; counts
  answered, refused with a clear error (ours: 503 insufficient_memory), failed otherwise,
  and whether the server died (an abort: the OOM killer or a crash); peak RSS.
Not measured here (yet): per-token jitter under memory pressure, pinned vs unpinned.

Usage: python -m bench.memory [--quick]. The last line is one JSON object with
`cold_ttft_ratio` (ours / mlx_lm.server), `load_gbps_ratio` (ours / mlx_lm.load),
`pinned_jitter_ratio` (null: not measured), `ours_aborts`, `theirs_aborts`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.serving import blas_env, make_prompts, peak_rss_mb
from mlxpool.dev.processes import LOOPBACK, Process, free_port
from mlxpool.tinymodel import make_tiny

OURS, THEIRS = "mlxpool", "mlx_lm.server"
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def weight_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.glob("model*.safetensors"))


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


# ---- load rate ----

HUGE = "huge_pages"


def load_once(who: str, model: Path) -> float:
    """Seconds for one load to a usable model in this (fresh) process, files already in page cache."""
    import mlx.core as mx
    import mlx_lm

    from mlxpool.agent.engine import loading
    from mlxpool.agent.engine.interface import LoadOptions

    for p in model.glob("model*.safetensors"):
        p.read_bytes()
    started = time.perf_counter()
    if who == OURS:
        loading.load(model, LoadOptions(pin_policy="none"))
    else:
        mx.eval(mlx_lm.load(str(model))[0].parameters())
    return time.perf_counter() - started


def load_rates(model: Path, rounds: int) -> dict[str, list[float]]:
    """GB/s per load, each in a fresh process as the servers would load: ours with the huge-page
    tunable the agent sets for itself (mlxpool.cli), mlx_lm.load without (as mlx_lm.server
    runs); `mlx_lm.load+huge_pages` says what the tunable alone would give mlx-lm."""
    from mlxpool.cli import HUGE_PAGES_TUNABLE

    size = weight_bytes(model)
    rates: dict[str, list[float]] = {OURS: [], THEIRS: [], f"{THEIRS}+{HUGE}": []}
    for r in range(rounds):
        order = list(rates) if r % 2 == 0 else list(reversed(rates))
        for who in order:
            env = blas_env()
            if who != THEIRS:
                env["GLIBC_TUNABLES"] = HUGE_PAGES_TUNABLE
            done = subprocess.run([sys.executable, "-m", "bench.memory", "--load-once", who.split("+")[0], str(model)],
                                  capture_output=True, text=True, timeout=300, env={**os.environ, **env})
            if done.returncode != 0:
                raise RuntimeError(f"load {who} failed: {done.stderr[-2000:]}")
            seconds = float(done.stdout.strip().splitlines()[-1])
            rates[who].append(size / seconds / 1e9)
            print(f"load {who:26s} round {r}: {size / 1e6:.0f} MB in {seconds:.2f} s = {rates[who][-1]:.2f} GB/s",
                  flush=True)
    return rates


# ---- servers ----

def in_cgroup(argv: list[str], cgroup: Path | None) -> list[str]:
    if cgroup is None:
        return argv
    return ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *argv]


def start_server(who: str, model: Path, logs: Path, port: int, cgroup: Path | None = None,
                 config: Path | None = None) -> Process:
    if who == THEIRS:
        argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--host", LOOPBACK,
                "--port", str(port), "--log-level", "WARNING"]
    else:
        argv = [sys.executable, "-m", "mlxpool", "agent", "--host", LOOPBACK, "--port", str(port), "--model",
                str(model), "--model-name", "bench", "--cache-dir", str(logs / "cache")]
        if config is not None:
            argv += ["--config", str(config)]
    proc = Process.start(who, in_cgroup(argv, cgroup), logs / f"{who}-{port}.log", env=blas_env())
    proc.url = f"http://{LOOPBACK}:{port}"
    return proc


def first_token(url: str, model: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{url}/v1/completions", timeout=30,
                           json={"model": model, "prompt": "Hello there", "max_tokens": 1, "temperature": 0})
            if r.status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    return False


def cold_starts(model: Path, logs: Path, rounds: int) -> tuple[dict[str, list[float]], bool]:
    times: dict[str, list[float]] = {OURS: [], THEIRS: []}
    dropped = True
    for r in range(rounds):
        for who in ((THEIRS, OURS) if r % 2 == 0 else (OURS, THEIRS)):
            dropped = drop_caches() and dropped
            started = time.perf_counter()
            proc = start_server(who, model, logs, free_port())
            try:
                ok = first_token(proc.base_url, "bench" if who == OURS else "default_model", 300)
                seconds = time.perf_counter() - started
            finally:
                proc.stop(10)
            if ok:
                times[who].append(seconds)
            print(f"cold {who:14s} round {r}: {f'{seconds:.2f} s' if ok else 'no first token'} "
                  f"(page cache {'dropped' if dropped else 'NOT dropped'})", flush=True)
    return times, dropped


# ---- soak ----

def make_cgroup(name: str, limit: int) -> Path | None:
    """A child memory cgroup of ours limited to `limit` bytes (v1 here), or None."""
    try:
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if ":memory:" in line)
        group = CGROUP_V1 / own.lstrip("/") / name
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
        return group
    except (OSError, StopIteration):
        return None


def remove_cgroup(group: Path | None) -> None:
    if group is not None:
        with contextlib.suppress(OSError):  # still has a process: left for the OS to clean
            group.rmdir()


def soak_prompts(model: Path, n: int, tokens: int) -> list[str]:
    """`n` distinct prompts of about `tokens` tokens each (by the model's own tokenizer), so that
    prompt + max_tokens fits the model's context: both servers get the same texts."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    out = []
    for i, base in enumerate(make_prompts(n, seed=99)):
        text = f"request {i}: " + base
        while len(tok.encode(text).ids) < tokens + 8:
            text += " " + base
        ids = tok.encode(text).ids[:tokens]
        out.append(tok.decode(ids))
    return out


def context_length(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["max_position_embeddings"])


def soak(model: Path, logs: Path, requests: int, prompt_tokens: int, max_tokens: int, cap: int,
         headroom: int) -> dict[str, dict[str, object]]:
    if prompt_tokens + max_tokens + 16 > context_length(model):
        raise ValueError(f"soak prompts of {prompt_tokens} tokens + {max_tokens} do not fit the model's context "
                         f"({context_length(model)})")
    prompts = soak_prompts(model, requests, prompt_tokens)
    config = logs / "soak.yaml"
    config.write_text(f"weight_management:\n  memory_headroom_bytes: {headroom}\n  memory_wait_seconds: 5\n")
    out: dict[str, dict[str, object]] = {}
    for who in (THEIRS, OURS):
        group = make_cgroup(f"mlxpool-soak-{who.replace('.', '-')}", cap)
        proc = start_server(who, model, logs, free_port(), group, config if who == OURS else None)
        name = "bench" if who == OURS else "default_model"
        result: dict[str, object] = {"cgroup": str(group) if group else None, "cap_bytes": cap, "served": 0,
                                     "refused_clearly": 0, "failed": 0, "aborts": 0}
        try:
            if not first_token(proc.base_url, name, 300):
                raise RuntimeError(f"{who} did not start: {proc.log_tail()}")

            def one(prompt: str, proc: Process = proc, name: str = name) -> str:
                try:
                    r = httpx.post(f"{proc.base_url}/v1/completions", timeout=300, json={
                        "model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
                except httpx.HTTPError:
                    return "failed"
                if r.status_code == 200:
                    return "served"
                try:
                    clear = bool(r.json()["error"]["message"])
                except (ValueError, KeyError, TypeError):
                    clear = False
                return "refused_clearly" if clear and r.status_code in (429, 503) else "failed"

            with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
                for outcome in pool.map(one, prompts):
                    result[outcome] = int(result[outcome]) + 1  # type: ignore[call-overload]
            result["peak_rss_mb"] = peak_rss_mb(proc.pid) if proc.alive() else None
        finally:
            if not proc.alive():
                result["aborts"] = 1
                result["exit"] = proc.popen.returncode
            proc.stop(10)
            remove_cgroup(group)
        print(f"soak {who:14s}: {result}", flush=True)
        out[who] = result
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--quick", action="store_true", help="fewer rounds; under 5 minutes")
    parser.add_argument("--load-once", nargs=2, metavar=("WHO", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_once:
        print(load_once(args.load_once[0], Path(args.load_once[1])))
        return 0
    rounds = 2 if args.quick else 4
    work = Path(tempfile.mkdtemp(prefix="mlxpool-bench-memory-"))
    logs = work / "logs"
    logs.mkdir()
    bench = make_tiny(work / "bench", size="bench")
    big = make_tiny(work / "big", size="bench", layers=3, hidden=2048)  # ~0.6 GB of float32
    print(f"models: bench {weight_bytes(bench) / 1e6:.0f} MB, big {weight_bytes(big) / 1e6:.0f} MB; "
          "machine: 2-core x86-64 CPU, shared with other work", flush=True)
    rates = {m.name: load_rates(m, rounds) for m in (bench, big)}
    cold = {m.name: cold_starts(m, logs, rounds if not args.quick else 1) for m in (big,)}
    # Soak on the bench model (2,048-token context): 32 KB of KV per token; 1,600-token
    # prompts + 200 tokens (about 57 MB of KV each, 1,792 tokens in KV steps).
    soaked = soak(bench, logs, requests=8 if args.quick else 16, prompt_tokens=1600, max_tokens=200,
                  cap=900 * 1024 * 1024, headroom=600 * 1024 * 1024)
    med = statistics.median
    load_ratio = med(rates["big"][OURS]) / med(rates["big"][THEIRS])
    cold_big = cold["big"][0]
    cold_ratio = (med(cold_big[OURS]) / med(cold_big[THEIRS])) if cold_big[OURS] and cold_big[THEIRS] else None
    summary = {
        "bench": "memory", "quick": args.quick, "machine": "2-core x86-64 CPU, shared",
        "load_gbps": {k: {who: round(med(v), 3) for who, v in r.items()} for k, r in rates.items()},
        "load_gbps_ratio": round(load_ratio, 3),
        "cold_ttft_s": {who: [round(x, 2) for x in v] for who, v in cold_big.items()},
        "cold_ttft_ratio": round(cold_ratio, 3) if cold_ratio is not None else None,
        "page_cache_dropped": cold["big"][1],
        "soak": soaked,
        "pinned_jitter_ratio": None,
        "ours_aborts": soaked[OURS]["aborts"], "theirs_aborts": soaked[THEIRS]["aborts"],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
