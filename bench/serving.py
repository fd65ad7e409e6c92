"""Serving benchmark: `mlxpool agent` against `mlx_lm.server`, side by side, same model.

Both servers get the same bench-size model (float32, ~25M parameters, made locally),
the same BLAS (OpenBLAS through LD_PRELOAD; our agent would load it itself anyway) and
the same client: streaming /v1/completions, temperature 0, 64 output tokens, at 1, 8 and
32 concurrent clients. The servers run one after the other, never at once, so they do
not compete for the 2 cores. A warm-up pass at each concurrency runs before the
measured pass, for both, so first-use kernel compilation is not measured for either.

Usage: python -m bench.serving [--quick] [--model PATH] [--levels 1,8,32]
Prints a table per server and level, the ratios ours/theirs, and one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.loadgen import run_level
from mlxpool.dev.components import start_agent
from mlxpool.dev.processes import LOOPBACK, Process, free_port, wait_for
from mlxpool.tinymodel import make_tiny

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
MODEL_NAME = "bench"


def blas_env() -> dict:
    return {"LD_PRELOAD": OPENBLAS} if Path(OPENBLAS).exists() else {}


def make_prompts(n: int, seed: int = 7) -> list[str]:
    """Distinct prompts of 20-60 words, so neither server is helped by a prefix cache."""
    rng = np.random.default_rng(seed)
    words = "the a fleet of small computers serve models quickly and reliably while kubernetes " \
            "reconciles desired state across many nodes with routing tables health probes".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(20, 60)))) for _ in range(n)]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def start_ours(model: Path, logs: Path) -> Process:
    os.environ.update(blas_env())
    return start_agent(model, logs, name="mlxpool-agent", extra=["--model-name", MODEL_NAME], timeout=300)


def start_theirs(model: Path, logs: Path) -> Process:
    port = free_port()
    proc = Process.start("mlx_lm.server", [
        sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--host", LOOPBACK,
        "--port", str(port), "--log-level", "WARNING",
    ], logs / "mlx_lm_server.log", env=blas_env())
    proc.url = f"http://{LOOPBACK}:{port}"
    wait_for(lambda: httpx.get(f"{proc.url}/health", timeout=2).status_code == 200, 300, "mlx_lm.server", proc)
    return proc


def model_id(proc: Process, fallback: str) -> str:
    data = httpx.get(f"{proc.url}/v1/models", timeout=10).json()["data"]
    return data[0]["id"] if data else fallback


def measure(name: str, proc: Process, model: str, levels: list[int], rounds: int, max_tokens: int,
            prompts: list[str]) -> dict:
    out = {}
    for clients in levels:
        # Warm-up at this batch size (not measured), then the measured pass.
        asyncio.run(run_level(proc.url, prompts[::-1], clients, 1, max_tokens, model))
        level = asyncio.run(run_level(proc.url, prompts, clients, rounds, max_tokens, model))
        summary = level.summary()
        out[clients] = summary
        print(f"  {name:<14} c={clients:<3} {summary['tok_s']:>8.1f} tok/s  ttft p50 {summary['ttft_p50_s']:.3f}s "
              f"p99 {summary['ttft_p99_s']:.3f}s  latency p50 {summary['latency_p50_s']:.3f}s "
              f"p99 {summary['latency_p99_s']:.3f}s  errors {summary['errors']}", flush=True)
        if summary["errors"]:
            print(f"    first error: {next(r.error for r in level.results if not r.ok)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests per client (< 3 minutes)")
    parser.add_argument("--model", type=Path, help="model directory (default: make the bench model)")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    rounds = 2 if args.quick else 4
    work = Path(tempfile.mkdtemp(prefix="mlxpool-bench-"))
    model = args.model or make_tiny(work / MODEL_NAME, "bench", seed=0)
    prompts = make_prompts(max(levels) * rounds)
    t0 = time.monotonic()

    results, rss = {}, {}
    for name, starter in (("mlxpool", start_ours), ("mlx_lm.server", start_theirs)):
        print(f"{name}: starting on {model}", flush=True)
        proc = starter(model, work / "logs")
        try:
            results[name] = measure(name, proc, model_id(proc, str(model)), levels, rounds, args.max_tokens, prompts)
            rss[name] = peak_rss_mb(proc.pid)
        finally:
            proc.stop()
        print(f"  {name} peak RSS {rss[name]} MB", flush=True)

    ours, theirs = results["mlxpool"], results["mlx_lm.server"]
    figures: dict = {"bench": "serving", "quick": args.quick, "model_params_m": _params_m(model),
                     "max_tokens": args.max_tokens, "requests_per_client": rounds,
                     "peak_rss_mb": rss, "seconds": round(time.monotonic() - t0, 1)}
    print("\nratios (mlxpool / mlx_lm.server):")
    for c in levels:
        tok = round(ours[c]["tok_s"] / theirs[c]["tok_s"], 3) if theirs[c]["tok_s"] else float("nan")
        ttft = round(ours[c]["ttft_p99_s"] / theirs[c]["ttft_p99_s"], 3) if theirs[c]["ttft_p99_s"] else float("nan")
        figures[f"ratio_tok_s_c{c}"] = tok
        figures[f"ratio_ttft_p99_c{c}"] = ttft
        print(f"  c={c:<3} tok/s x{tok}   ttft p99 x{ttft} (lower is better)")
    figures["results"] = {n: {str(c): v for c, v in r.items()} for n, r in results.items()}
    print(json.dumps(figures))
    return 0


def _params_m(model: Path) -> float:
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "numpy") as f:
        return round(sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6, 1)


if __name__ == "__main__":
    sys.exit(main())
