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
- jitter under memory pressure: one stream at a time, per-token gaps p50/p99, agent with
  pin_policy all vs none, while a hog in the agent's own memory cgroup (its limit set to the
  agent's RSS + 32 MB, the hog the weights' size) makes the kernel reclaim; a swap file is made and
  swapped on where root may (the weights are anonymous memory: only swap can take them);
  the output says whether swap existed and how much of the agent went to it.

Usage: python -m bench.memory [--quick]. The last line is one JSON object with
`cold_ttft_ratio` (ours / mlx_lm.server), `load_gbps_ratio` (ours / mlx_lm.load),
`pinned_jitter_ratio` (p99/p50 pinned / unpinned; null if not measured), `ours_aborts`, `theirs_aborts`.
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
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx

from bench.serving import blas_env, make_prompts, peak_rss_mb
from mlxpool.dev.processes import LOOPBACK, Process, free_port
from mlxpool.tinymodel import make_tiny

OURS, THEIRS = "mlxpool", "mlx_lm.server"
SOAK_HEADROOM = 400 * 1024 * 1024
"""The agent's memory_headroom_bytes in the soak: its own non-book memory (interpreter, MLX,
tokenizer: the RSS at ready less the weights, printed) must fit in it, or the cap is a lie."""
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
            result["rss_at_ready_mb"] = round(proc_status_kb(proc.pid, "VmRSS") / 1024, 1)

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


# ---- jitter under memory pressure ----

HOG = """
import sys, time
chunks, limit, deadline = [], int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    if sum(len(c) for c in chunks) < limit:
        chunks.append(bytearray(b"x" * (4 << 20)))  # written: anonymous memory the cgroup must hold
    for c in chunks:  # keep ours hot, so the kernel reclaims the agent's pages instead
        c[::4096] = b"y" * len(c[::4096])
    time.sleep(0.05)
"""


@contextlib.contextmanager
def swap_file(path: Path, nbytes: int) -> Iterator[bool]:
    """A swap file, on where root may (swapon); yields whether swap is on."""
    on = False
    try:
        subprocess.run(["fallocate", "-l", str(nbytes), str(path)], check=True, capture_output=True)
        path.chmod(0o600)
        subprocess.run(["mkswap", str(path)], check=True, capture_output=True)
        on = subprocess.run(["swapon", str(path)], capture_output=True).returncode == 0
    except (OSError, subprocess.CalledProcessError):
        on = False
    try:
        yield on
    finally:
        if on:
            subprocess.run(["swapoff", str(path)], capture_output=True)
        with contextlib.suppress(OSError):
            path.unlink()


def token_gaps(url: str, prompt: str, max_tokens: int) -> list[float]:
    """Seconds between streamed tokens of one completion."""
    gaps: list[float] = []
    last = None
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
            "model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and "[DONE]" not in line:
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
    return gaps


def major_faults(pid: int) -> int:
    """Page faults of `pid` that had to read a page in (from swap or a file): /proc/PID/stat majflt."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[9])  # field 12 of stat; [0] here is field 3 (state)


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def memory_by_kind(pid: int) -> dict[str, dict[str, int]]:
    """Where `pid`'s memory lies, from /proc/PID/smaps: kB resident, swapped and locked for
    file-backed mappings (code and data of the interpreter and the libraries), [heap],
    [stack] and the rest of the anonymous memory (MLX's buffers: weights, KV). Read before
    the pressure and after the stream, it says which kind the kernel took away (a file
    page dropped faults back in from the file, an anonymous one from swap)."""
    kinds: dict[str, dict[str, int]] = {}
    current = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            name = head[5].strip() if len(head) > 5 else ""
            kind = "file" if name.startswith("/") else name if name in ("[heap]", "[stack]") else "anon"
            current = kinds.setdefault(kind, {"rss_kb": 0, "swap_kb": 0, "locked_kb": 0})
        elif current is not None and head and head[0] in ("Rss:", "Swap:", "Locked:"):
            current[head[0][:-1].lower() + "_kb"] += int(head[1])
    return kinds


def jitter(model: Path, logs: Path, rounds: int, requests: int, max_tokens: int) -> dict[str, object]:
    """Per-token latency of one stream at a time while a hog in the agent's own memory cgroup
    forces the kernel to reclaim: pin_policy all vs none, alternating. The weights are
    anonymous memory (copied into MLX buffers), so only swap can take them."""
    out: dict[str, object] = {"weights_memory": "anonymous (copied into MLX buffers; no file-backed option: "
                                                "MLX's Python API cannot wrap the mapping)"}
    gaps: dict[str, list[float]] = {"pinned": [], "unpinned": []}
    swapped: dict[str, list[int]] = {"pinned": [], "unpinned": []}
    faults: dict[str, list[int]] = {"pinned": [], "unpinned": []}
    locked: dict[str, list[int]] = {"pinned": [], "unpinned": []}
    where: dict[str, list[dict[str, dict[str, dict[str, int]]]]] = {"pinned": [], "unpinned": []}
    out["memory_by_kind_kb"] = where
    weights = weight_bytes(model)
    with swap_file(logs / "swapfile", 1 << 30) as swap:
        out["swap"] = swap
        for r in range(rounds):
            for kind in (("pinned", "unpinned") if r % 2 == 0 else ("unpinned", "pinned")):
                config = logs / f"jitter-{kind}.yaml"
                config.write_text("weight_management:\n  pin_policy: " + ("all" if kind == "pinned" else "none")
                                  + f"\n  pin_budget_bytes: {4 * weights}\n")
                group = make_cgroup(f"mlxpool-jitter-{kind}", 1 << 40)
                if group is None:
                    out["error"] = "no memory cgroup could be made: pressure not applied"
                    return out
                proc = start_server(OURS, model, logs, free_port(), group, config)
                hog = None
                try:
                    if not first_token(proc.base_url, "bench", 300):
                        raise RuntimeError(f"agent did not start: {proc.log_tail()}")
                    token_gaps(proc.base_url, "warm up", 8)
                    rss = proc_status_kb(proc.pid, "VmRSS") * 1024
                    kinds_before = memory_by_kind(proc.pid)
                    # Room for the agent's RSS and 32 MB, and a hog of the weights' size: the
                    # kernel must push about the weights' worth of pages out (to swap).
                    (group / "memory.limit_in_bytes").write_text(str(rss + (32 << 20)))
                    hog = subprocess.Popen(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh",
                                            sys.executable, "-c", HOG, str(weights), "600"])
                    deadline = time.monotonic() + 20  # until the hog holds its share
                    while time.monotonic() < deadline and hog.poll() is None and \
                            proc_status_kb(hog.pid, "VmRSS") << 10 < weights * 0.9:
                        time.sleep(0.05)
                    before = major_faults(proc.pid)
                    for i in range(requests):
                        gaps[kind] += token_gaps(proc.base_url, f"request {i}: tell me about fleets", max_tokens)
                    swapped[kind].append(proc_status_kb(proc.pid, "VmSwap") * 1024 if proc.alive() else -1)
                    faults[kind].append(major_faults(proc.pid) - before if proc.alive() else -1)
                    locked[kind].append(proc_status_kb(proc.pid, "VmLck") * 1024 if proc.alive() else -1)
                    if proc.alive():
                        where[kind].append({"before": kinds_before, "after": memory_by_kind(proc.pid)})
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
                    proc.stop(10)
                    remove_cgroup(group)
                print(f"jitter {kind:9s} round {r}: {len(gaps[kind])} gaps, agent swapped "
                      f"{swapped[kind][-1] / 1e6:.1f} MB, locked {locked[kind][-1] / 1e6:.1f} MB, "
                      f"{faults[kind][-1]} major faults while streaming", flush=True)
    for kind, g in gaps.items():
        if not g:
            continue
        g = sorted(g)
        p50, p99 = g[len(g) // 2], g[min(len(g) - 1, int(len(g) * 0.99))]
        out[kind] = {"tokens": len(g), "p50_ms": round(p50 * 1e3, 2), "p99_ms": round(p99 * 1e3, 2),
                     "p99_over_p50": round(p99 / p50, 3), "agent_swap_bytes": swapped[kind],
                     "agent_locked_bytes": locked[kind], "major_faults_while_streaming": faults[kind]}
    if isinstance(out.get("pinned"), dict) and isinstance(out.get("unpinned"), dict):
        pinned, unpinned = cast("dict[str, float]", out["pinned"]), cast("dict[str, float]", out["unpinned"])
        out["pinned_jitter_ratio"] = round(pinned["p99_over_p50"] / unpinned["p99_over_p50"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--quick", action="store_true", help="fewer rounds; under 5 minutes")
    parser.add_argument("--parts", default="load,cold,soak,jitter",
                        help="comma-separated subset of load,cold,soak,jitter (the rest reported as null)")
    parser.add_argument("--load-once", nargs=2, metavar=("WHO", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= {"load", "cold", "soak", "jitter"}:
        parser.error(f"--parts: unknown {sorted(parts - {'load', 'cold', 'soak', 'jitter'})}")
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
    rates = {m.name: load_rates(m, rounds) for m in (bench, big)} if "load" in parts else {}
    cold = {m.name: cold_starts(m, logs, rounds if not args.quick else 1) for m in (big,)} if "cold" in parts else {}
    # Soak on the bench model (2,048-token context): 32 KB of KV per token; 1,600-token
    # prompts + 200 tokens (about 57 MB of KV each, 1,792 tokens in KV steps).
    soaked = soak(bench, logs, requests=8 if args.quick else 16, prompt_tokens=1600, max_tokens=200,
                  cap=900 * 1024 * 1024, headroom=SOAK_HEADROOM) if "soak" in parts else {}
    jittered = jitter(bench, logs, rounds=1 if args.quick else 2, requests=3 if args.quick else 6,
                      max_tokens=100) if "jitter" in parts else {}
    print(f"jitter: {json.dumps(jittered)}", flush=True)
    med = statistics.median
    load_ratio = med(rates["big"][OURS]) / med(rates["big"][THEIRS]) if rates else None
    cold_big = cold["big"][0] if cold else {OURS: [], THEIRS: []}
    cold_ratio = (med(cold_big[OURS]) / med(cold_big[THEIRS])) if cold_big[OURS] and cold_big[THEIRS] else None
    summary = {
        "bench": "memory", "quick": args.quick, "machine": "2-core x86-64 CPU, shared", "parts": sorted(parts),
        "load_gbps": {k: {who: round(med(v), 3) for who, v in r.items()} for k, r in rates.items()},
        "load_gbps_ratio": round(load_ratio, 3) if load_ratio is not None else None,
        "cold_ttft_s": {who: [round(x, 2) for x in v] for who, v in cold_big.items()},
        "cold_ttft_ratio": round(cold_ratio, 3) if cold_ratio is not None else None,
        "page_cache_dropped": cold["big"][1] if cold else None,
        "soak": soaked,
        "jitter": jittered,
        "pinned_jitter_ratio": jittered.get("pinned_jitter_ratio"),
        "ours_aborts": soaked[OURS]["aborts"] if soaked else None,
        "theirs_aborts": soaked[THEIRS]["aborts"] if soaked else None,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
