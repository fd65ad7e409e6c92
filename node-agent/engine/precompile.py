"""Compile the warm-up's kernels in child processes first, in parallel, into the disk cache.

Measured on the H200 (MLX's CUDA backend, the 8B-shaped 4-bit model): an agent that
compiles its 45 warm-up shapes itself grows from 1.1 GB to 5.7 GB of RSS while doing so
(anonymous memory that NVRTC and the loaded modules keep), and takes 136 s; one that
finds them in its kernel cache (MLX_PTX_CACHE_DIR) warms up in 9.6 s at 2.2 GB, as
much as mlx_lm.server holds. So on CUDA, with a kernel cache set, the warm-up runs are
split among `workers` child processes that each load the model, run their share and
exit (their compiler memory goes with them); the engine then runs every shape itself
as before, now from the cache. A child that fails only costs time: the engine's own
warm-up still compiles whatever is missing. Once every child succeeded, a marker in the
cache (keyed by the MLX version, the model's files and the runs) says so, and a restart
with the same cache skips the children: its own warm-up finds every kernel there. Not
used on the CPU (nothing is compiled per shape there) or on Metal (not measured).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from mlxpool.agent.engine.interface import AcceleratorKind, EngineConfig
from mlxpool.agent.engine.shapes import WarmupRun

log = logging.getLogger(__name__)

CACHE_ENV = "MLX_PTX_CACHE_DIR"
WORKERS = 4
"""Child compilers at once (NVRTC is CPU-bound, one thread each; each child holds a copy of the weights)."""
TIMEOUT_S = 900.0


def wanted(kind: AcceleratorKind, environ: dict[str, str] | None = None) -> bool:
    """Compile ahead only on CUDA with a kernel cache the children can fill for us."""
    env = os.environ if environ is None else environ
    return kind is AcceleratorKind.CUDA and bool(env.get(CACHE_ENV))


def split(runs: list[WarmupRun], workers: int) -> list[list[WarmupRun]]:
    """Round-robin shares, non-empty (the decode ladders, the costliest runs, land on different children)."""
    shares: list[list[WarmupRun]] = [[] for _ in range(max(1, min(workers, len(runs))))]
    for i, run in enumerate(runs):
        shares[i % len(shares)].append(run)
    return [s for s in shares if s]


def child_argv(model_path: str, config: EngineConfig, runs: list[WarmupRun]) -> list[str]:
    spec = {"model": model_path, "max_running": config.max_running, "prefill_batch_size": config.prefill_batch_size,
            "prefill_step_size": config.prefill_step_size, "runs": [asdict(r) for r in runs]}
    return [sys.executable, "-m", "mlxpool.agent.engine.precompile", json.dumps(spec)]


def marker(cache_dir: str | Path, model_path: str, config: EngineConfig, runs: list[WarmupRun],
           kind: str = "precompiled") -> Path:
    """The file that says these runs' kernels are in `cache_dir`: named by a hash of the MLX
    version, the model's config and weight files (name, size, mtime) and the runs. Other
    `kind`s keep other facts of the same setting there (`dense-<device>`: the measured crossover)."""
    model = Path(model_path)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model.iterdir()
                   if f.suffix in (".json", ".safetensors") and f.is_file()) if model.is_dir() else []
    try:
        mlx_version = metadata.version("mlx")
    except metadata.PackageNotFoundError:
        mlx_version = "unknown"
    key = json.dumps([mlx_version, str(model.resolve()), files, child_argv(model_path, config, runs)[-1]])
    return Path(cache_dir) / f"mlxpool-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def compile_ahead(model_path: str, config: EngineConfig, runs: list[WarmupRun], workers: int = WORKERS,
                  timeout_s: float = TIMEOUT_S, cache_dir: str | None = None) -> int:
    """Run the shares in child processes and wait for all of them (bounded); how many
    succeeded (all of them, without starting any, when the cache's marker says they did before)."""
    started = time.perf_counter()
    shares = split(runs, workers)
    cache_dir = cache_dir or os.environ.get(CACHE_ENV)
    done = marker(cache_dir, model_path, config, runs) if cache_dir else None
    if done is not None and done.exists():
        log.info("kernels found compiled ahead path=%s marker=%s", model_path, done.name)
        return len(shares)
    children = [subprocess.Popen(child_argv(model_path, config, share)) for share in shares]
    ok = 0
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            code = child.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        ok += code == 0
    log.info("kernels compiled ahead path=%s children=%d ok=%d runs=%d seconds=%.1f", model_path, len(children), ok,
             len(runs), time.perf_counter() - started)
    if done is not None and ok == len(children):
        try:
            done.write_text(json.dumps({"model": model_path, "runs": len(runs)}))
        except OSError as exc:  # a read-only cache: the next start compiles ahead again
            log.warning("precompile marker not written path=%s error=%s", done, exc)
    return ok


def main(argv: list[str]) -> int:
    """A child: load the model, run its share of the warm-up, exit."""
    from mlxpool.agent.engine.generation import BatchEngine
    from mlxpool.agent.engine.interface import DenseCopyPolicy, LoadOptions

    spec = json.loads(argv[0])
    # No dense copies in a child: several children at once would each hold them on the device,
    # and the parent's dense path needs no kernel compiled (its GEMM is cuBLAS's).
    load = LoadOptions(pin_policy="none", dense_copies=DenseCopyPolicy.OFF)
    config = EngineConfig(max_running=spec["max_running"], prefill_batch_size=spec["prefill_batch_size"],
                          prefill_step_size=spec["prefill_step_size"], load=load)
    runs = [WarmupRun(tuple(r["prompt_lengths"]), tuple(r["max_tokens"]), r["sampler"]) for r in spec["runs"]]
    BatchEngine(spec["model"], config).compile_only(runs)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(sys.argv[1:]))
