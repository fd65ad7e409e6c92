"""Serving benchmark: `mlxpool agent` against `mlx_lm.server`, side by side, same model.

Both servers get the same bench-size model (float32, ~25M parameters, made locally),
the same BLAS (OpenBLAS through LD_PRELOAD; our agent would load it itself anyway) and
the same client: streaming /v1/completions, temperature 0, 64 output tokens, at 1, 8 and
32 concurrent clients (closed loop: each client sends its next request when the last
one ends).

Both servers stay up for the whole run, but only one is driven at a time (an idle
server uses no CPU), so they never compete for the cores. At each concurrency both
are warmed up first (first-use kernel compilation is not measured for either), then
the measured passes alternate between them in ABBA order, each pass sending the same
prompts to both. Background load on a shared machine drifts over minutes; alternating
passes makes the drift hit both servers alike instead of whichever happened to run
second. Warm-up prompts differ from measured ones and measured prompts are distinct,
so neither server is helped by its prefix cache. Each server keeps one HTTP client
(keep-alive connections) for the whole run, as a gateway in front of it would; how
TTFT is measured and connection failures are retried is described in `loadgen`.

Usage: python -m bench.serving [--quick] [--cold] [--model PATH] [--levels 1,8,32] [--log-dir DIR]
(--quick: 2 passes, under 3 minutes; the full run: 6 passes, about 6 minutes.)

`--cold` measures starts instead, as a user meets them: each server is launched with an
empty kernel compile cache (MLX_PTX_CACHE_DIR, a fresh directory per server), then again
with the cache its first launch left (a restart), in ABBA order (ours cold, theirs cold,
theirs warm, ours warm). Per launch: launch to ready (ours: `/ready`, which waits for the
warm-up; theirs: `/health`), launch to the end of a first completion, and at each
concurrency a first burst of that many distinct requests right after ready, then a
second one: the first burst's worst TTFT against the second's p99 says what compiling
while serving cost (the target: worst first <= 2x warm p99), and the exit code after
SIGTERM.
Prints a line per server, level and pass, then the merged table per server and level
(output tok/s, TTFT p50/p99, latency p50/p99, errors), peak RSS, the ratios
ours/theirs, and one JSON line last (with `ratio_tok_s_c1`, `ratio_tok_s_c8`,
`ratio_tok_s_c32`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.loadgen import LevelResult, http_client, run_level
from mlxpool.dev.components import start_agent
from mlxpool.dev.processes import LOOPBACK, Process, free_port, wait_for
from mlxpool.tinymodel import make_tiny

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
MODEL_NAME = "bench"
OURS, THEIRS = "mlxpool", "mlx_lm.server"


def blas_env() -> dict:
    return {"LD_PRELOAD": OPENBLAS} if Path(OPENBLAS).exists() else {}


def make_prompts(n: int, seed: int = 7) -> list[str]:
    """Distinct prompts of 20-60 words, so neither server is helped by a prefix cache."""
    rng = np.random.default_rng(seed)
    words = ["the", "a", "fleet", "of", "small", "computers", "serve", "models", "quickly", "and", "reliably",
             "while", "kubernetes", "reconciles", "desired", "state", "across", "many", "nodes", "with",
             "routing", "tables", "health", "probes"]
    return [" ".join(rng.choice(words, size=int(rng.integers(20, 60)))) for _ in range(n)]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def start_ours(model: Path, logs: Path, label: str = "mlxpool-agent") -> Process:
    os.environ.update(blas_env())
    return start_agent(model, logs, name=label, extra=["--model-name", MODEL_NAME], timeout=600)


def start_theirs(model: Path, logs: Path, label: str = "mlx_lm_server") -> Process:
    port = free_port()
    proc = Process.start("mlx_lm.server", [
        sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--host", LOOPBACK,
        "--port", str(port), "--log-level", "WARNING",
    ], logs / f"{label}.log", env=blas_env())
    proc.url = f"http://{LOOPBACK}:{port}"
    wait_for(lambda: httpx.get(f"{proc.url}/health", timeout=2).status_code == 200, 300, "mlx_lm.server", proc)
    return proc


def model_id(proc: Process, fallback: str) -> str:
    """The id the server lists first; `fallback` when it lists none or cannot list.

    mlx_lm.server's /v1/models scans the Hugging Face hub cache and fails (500) when
    there is none; it serves its --model under the name "default_model" regardless.
    """
    try:
        data = httpx.get(f"{proc.url}/v1/models", timeout=10).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        return fallback
    return data[0]["id"] if data else fallback


def merge(levels: list[LevelResult]) -> LevelResult:
    """Several passes at one concurrency as one result: all requests, total wall time."""
    return LevelResult(levels[0].clients, sum(lv.wall_s for lv in levels), [r for lv in levels for r in lv.results])


def describe(name: str, clients: int, summary: dict) -> str:
    return (f"  {name:<14} c={clients:<3} {summary['tok_s']:>8.1f} tok/s  ttft p50 {summary['ttft_p50_s']:.3f}s "
            f"p99 {summary['ttft_p99_s']:.3f}s  latency p50 {summary['latency_p50_s']:.3f}s "
            f"p99 {summary['latency_p99_s']:.3f}s  errors {summary['errors']}"
            + (f"  connect retries {summary['retries']}" if summary["retries"] else "")
            + (f"  (ttft over {summary['requests'] - summary['errors'] - summary['ttft_excluded']}: "
               f"{summary['ttft_excluded']} streamed no text before the end)" if summary["ttft_excluded"] else ""))


async def measure_all(servers: dict[str, tuple[Process, str]], levels: list[int], passes: int, rounds: int,
                      max_tokens: int) -> dict[str, dict[int, list[LevelResult]]]:
    """Every level in turn, each server's passes per level; one keep-alive client per server for
    the whole run, as a gateway would hold (a fresh burst of connections per pass would measure
    accept queues, not serving)."""
    http = {name: http_client(max(levels)) for name in servers}
    results: dict[str, dict[int, list[LevelResult]]] = {name: {} for name in servers}
    try:
        for i, clients in enumerate(levels):
            per_server = await measure(servers, http, clients, passes, rounds, max_tokens, seed=1000 * i)
            for name, level_passes in per_server.items():
                results[name][clients] = level_passes
        return results
    finally:
        for client in http.values():
            await client.aclose()


async def measure(servers: dict[str, tuple[Process, str]], http: dict, clients: int, passes: int, rounds: int,
                  max_tokens: int, seed: int) -> dict[str, list[LevelResult]]:
    """Warm both up, then `passes` measured passes each, in ABBA order; each server's passes.

    A pass sends `rounds` requests per client, at least 16 in all: one client alone needs
    more requests than 32 do for a figure that holds still.
    """
    rounds = max(rounds, 16 // clients)
    warmup = make_prompts(clients, seed=seed + 1)
    for name, (proc, model) in servers.items():
        await run_level(proc.base_url, warmup, clients, 1, max_tokens, model, client=http[name])
    names = list(servers)
    done: dict[str, list[LevelResult]] = {name: [] for name in names}
    for p in range(passes):
        prompts = make_prompts(clients * rounds, seed=seed + 100 + p)
        for name in names if p % 2 == 0 else names[::-1]:
            proc, model = servers[name]
            # ABBA runs a server twice in a row at pass boundaries, the second time with its
            # threads awake and its memory in cache; a short request first makes every
            # measured pass start that way.
            await run_level(proc.base_url, warmup[:1], 1, 1, 8, model, client=http[name])
            level = await run_level(proc.base_url, prompts, clients, rounds, max_tokens, model, client=http[name])
            done[name].append(level)
            print(describe(name, clients, level.summary()) + f"  (pass {p + 1})", flush=True)
    return done


PTX_CACHE_ENV = "MLX_PTX_CACHE_DIR"
STARTERS = {OURS: (start_ours, MODEL_NAME), THEIRS: (start_theirs, "default_model")}


def worst_ttft(level: LevelResult) -> float:
    """The slowest first token of a burst (over the requests that streamed text; nan if none)."""
    ttfts = [r.ttft_s for r in level.ok if r.streamed]
    return round(max(ttfts), 4) if ttfts else float("nan")


def cold_launch(name: str, model: Path, logs: Path, cache_dir: Path, levels: list[int], max_tokens: int,
                label: str, seed: int) -> dict:
    """One launch of `name` with `cache_dir` as its kernel cache: ready, first completion, bursts, exit."""
    starter, fallback = STARTERS[name]
    cache_dir.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get(PTX_CACHE_ENV)
    os.environ[PTX_CACHE_ENV] = str(cache_dir)  # the child's environment (the agent's own setting yields to it)
    started = time.monotonic()
    try:
        proc = starter(model, logs, label)
    finally:
        if saved is None:
            os.environ.pop(PTX_CACHE_ENV, None)
        else:
            os.environ[PTX_CACHE_ENV] = saved
    ready_s = time.monotonic() - started
    try:
        served = model_id(proc, fallback)
        figures = asyncio.run(_after_ready(proc.base_url, served, levels, max_tokens, seed, started))
    finally:
        code = proc.stop(timeout=60)
    out = {"ready_s": round(ready_s, 2), **figures, "exit_code": code}
    print(f"  {label:<22} ready {out['ready_s']:.1f}s  first completion {out['first_completion_s']:.1f}s  "
          + "  ".join(f"c={c}: worst first-burst ttft {b['first_worst_ttft_s']:.3f}s, second p99 "
                      f"{b['second_ttft_p99_s']:.3f}s (x{b['ratio']})" for c, b in out["bursts"].items())
          + f"  exit {code}", flush=True)
    return out


async def _after_ready(url: str, model: str, levels: list[int], max_tokens: int, seed: int,
                       started: float) -> dict:
    first = await run_level(url, make_prompts(1, seed=seed), 1, 1, max_tokens, model)
    first_s = time.monotonic() - started
    bursts: dict[str, dict] = {}
    for i, clients in enumerate(levels):
        one = await run_level(url, make_prompts(clients, seed=seed + 10 + 2 * i), clients, 1, max_tokens, model)
        two = await run_level(url, make_prompts(clients, seed=seed + 11 + 2 * i), clients, 1, max_tokens, model)
        worst, p99 = worst_ttft(one), two.summary()["ttft_p99_s"]
        bursts[str(clients)] = {"first_worst_ttft_s": worst, "first_errors": len(one.results) - len(one.ok),
                                "second_ttft_p99_s": p99, "ratio": round(worst / p99, 2) if p99 else float("nan")}
    return {"first_completion_s": round(first_s, 2), "first_completion_ok": bool(first.ok), "bursts": bursts}


def run_cold(model: Path, work: Path, logs: Path, levels: list[int], max_tokens: int) -> dict:
    """Cold then warm launches of both servers, ABBA; the figures by server and launch."""
    results: dict[str, dict[str, dict]] = {OURS: {}, THEIRS: {}}
    order = [(OURS, "cold"), (THEIRS, "cold"), (THEIRS, "warm"), (OURS, "warm")]
    for k, (name, start) in enumerate(order):
        label = f"{'mlxpool-agent' if name == OURS else 'mlx_lm_server'}-{start}"
        cache = work / f"ptx-{'ours' if name == OURS else 'theirs'}"  # the warm launch reuses the cold one's
        results[name][start] = cold_launch(name, model, logs, cache, levels, max_tokens, label, seed=5000 + 100 * k)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests per client (< 3 minutes)")
    parser.add_argument("--model", type=Path, help="model directory (default: make the bench model)")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cold", action="store_true",
                        help="measure cold and warm-cache starts (ready, first completion, first bursts, exit)")
    parser.add_argument("--log-dir", type=Path, help="where the servers' logs go (default: a temporary directory)")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    passes, rounds = (2, 2) if args.quick else (6, 2)  # requests per client: passes x rounds (c=1: 16 per pass)
    work = Path(tempfile.mkdtemp(prefix="mlxpool-bench-"))
    logs = args.log_dir or work / "logs"
    model = args.model or make_tiny(work / MODEL_NAME, "bench", seed=0)
    t0 = time.monotonic()
    if args.cold:
        return cold_main(model, work, logs, levels, args.max_tokens, t0)

    servers: dict[str, tuple[Process, str]] = {}
    try:
        for name, starter, fallback in ((OURS, start_ours, MODEL_NAME), (THEIRS, start_theirs, "default_model")):
            print(f"{name}: starting on {model}", flush=True)
            proc = starter(model, logs)
            servers[name] = (proc, model_id(proc, fallback))
        by_pass = asyncio.run(measure_all(servers, levels, passes, rounds, args.max_tokens))
        results: dict[str, dict[int, dict]] = {name: {} for name in servers}
        for name, per_level in by_pass.items():
            for clients, level_passes in per_level.items():
                level = merge(level_passes)
                results[name][clients] = level.summary()
                if results[name][clients]["errors"]:
                    print(f"    {name} c={clients} first error: {next(r.error for r in level.results if not r.ok)}")
        rss = {name: peak_rss_mb(proc.pid) for name, (proc, _) in servers.items()}
    finally:
        for proc, _ in servers.values():
            proc.stop()

    print("\nall passes merged:")
    for name in servers:
        for c in levels:
            print(describe(name, c, results[name][c]))
        print(f"  {name} peak RSS {rss[name]} MB")
    ours, theirs = results[OURS], results[THEIRS]
    figures: dict = {"bench": "serving", "quick": args.quick, "model_params_m": _params_m(model),
                     "max_tokens": args.max_tokens, "passes": passes,
                     "requests_per_client": {str(c): passes * max(rounds, 16 // c) for c in levels},
                     "peak_rss_mb": rss, "seconds": round(time.monotonic() - t0, 1)}
    print("\nratios (mlxpool / mlx_lm.server; tok/s and TTFT over all passes; per pass: the two runs of one pass)")
    for c in levels:
        tok = round(ours[c]["tok_s"] / theirs[c]["tok_s"], 3) if theirs[c]["tok_s"] else float("nan")
        ttft = round(ours[c]["ttft_p99_s"] / theirs[c]["ttft_p99_s"], 3) if theirs[c]["ttft_p99_s"] else float("nan")
        per_pass = [round(a.summary()["tok_s"] / b.summary()["tok_s"], 3)
                    for a, b in zip(by_pass[OURS][c], by_pass[THEIRS][c], strict=True)]
        figures[f"ratio_tok_s_c{c}"] = tok
        figures[f"ratio_ttft_p99_c{c}"] = ttft
        figures[f"pass_ratios_tok_s_c{c}"] = per_pass
        print(f"  c={c:<3} tok/s x{tok}   ttft p99 x{ttft} (lower is better)   tok/s per pass {per_pass} "
              f"(median x{round(statistics.median(per_pass), 3)})")
    figures["results"] = {n: {str(c): v for c, v in r.items()} for n, r in results.items()}
    print(json.dumps(figures))
    return 0


def cold_main(model: Path, work: Path, logs: Path, levels: list[int], max_tokens: int, t0: float) -> int:
    print(f"cold starts (empty kernel cache, then the cache it left), ABBA, on {model}", flush=True)
    results = run_cold(model, work, logs, levels, max_tokens)
    ours, theirs = results[OURS], results[THEIRS]
    print("\nratios (mlxpool / mlx_lm.server)")
    figures: dict = {"bench": "serving-cold", "model_params_m": _params_m(model), "max_tokens": max_tokens,
                     "levels": levels, "results": results}
    for start in ("cold", "warm"):
        a, b = ours[start], theirs[start]
        figures[f"ratio_ready_{start}"] = round(a["ready_s"] / b["ready_s"], 3)
        figures[f"ratio_first_completion_{start}"] = round(a["first_completion_s"] / b["first_completion_s"], 3)
        print(f"  {start}: ready x{figures[f'ratio_ready_{start}']} ({a['ready_s']}s vs {b['ready_s']}s), "
              f"first completion x{figures[f'ratio_first_completion_{start}']} "
              f"({a['first_completion_s']}s vs {b['first_completion_s']}s)")
        for c in levels:
            worst_a, worst_b = a["bursts"][str(c)]["first_worst_ttft_s"], b["bursts"][str(c)]["first_worst_ttft_s"]
            figures[f"ratio_first_burst_worst_ttft_{start}_c{c}"] = round(worst_a / worst_b, 3) if worst_b else None
            print(f"    c={c:<3} first burst worst ttft {worst_a}s vs {worst_b}s")
    figures["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(figures))
    return 0


def _params_m(model: Path) -> float:
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "numpy") as f:
        names = f.keys()  # safe_open is not a mapping: keys() is its listing
        return round(sum(np.prod(f.get_slice(k).get_shape()) for k in names) / 1e6, 1)


if __name__ == "__main__":
    sys.exit(main())
