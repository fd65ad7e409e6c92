"""Read a model's weight files into the page cache at process start, while Python imports.

A cold start (`mlxpool agent --model DIR`, page cache dropped) spent its load reading the
files through the native reader's mappings: page faults on a cold file, 0.08-0.30 GB/s
on the shared 2-core machine (bench.memory, 545 MB: 1.8-6.8 s), while one sequential
`read()` of the same file took 0.42 s (1.3 GB/s). So the agent's command line starts
this before it imports anything heavy (FastAPI, MLX, mlx-lm, transformers: seconds):
one thread reads each weight file front to back in large chunks (the GIL is released
in each `read`), the disk works while the interpreter imports, and the native reader
later finds every page in the cache.

Bounded: nothing is read when the files exceed half the memory the OS says is available
(the page cache would only push out other things, or the files themselves, before the
load). The page cache is the kernel's: reclaimable, and counted nowhere in the memory
books (the loaded arrays are). Stdlib only: importing this loads neither MLX nor numpy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 * 1024 * 1024
WEIGHT_GLOBS = ("*.safetensors",)
MEMINFO = Path("/proc/meminfo")


@dataclass
class PageIn:
    """One page-in: what it read, and when it finished (None: still reading)."""

    directory: Path
    files: list[Path]
    total_bytes: int
    read_bytes: int = 0
    seconds: float | None = None
    error: str | None = None


def weight_files(directory: Path) -> list[Path]:
    return sorted({p for pattern in WEIGHT_GLOBS for p in directory.glob(pattern) if p.is_file()})


def available_bytes(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none: macOS, a sandbox)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def model_argument(argv: Sequence[str]) -> Path | None:
    """The `--model DIR` (or `--model=DIR`) of an agent command line, if any."""
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return Path(argv[i + 1]).expanduser()
        if arg.startswith("--model="):
            return Path(arg.split("=", 1)[1]).expanduser()
    return None


def plan(directory: Path, available: int | None) -> PageIn | None:
    """What to read for the model in `directory`; None: nothing (no weights, or too big)."""
    files = weight_files(directory) if directory.is_dir() else []
    total = sum(p.stat().st_size for p in files)
    if not files or (available is not None and total > available // 2):
        return None
    return PageIn(directory, files, total)


def read_all(job: PageIn, chunk_bytes: int = CHUNK_BYTES) -> PageIn:
    """Read every file of `job` once, front to back (blocking; `start` runs it on a thread)."""
    started = time.perf_counter()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    try:
        for path in job.files:
            with path.open("rb", buffering=0) as f:
                while n := f.readinto(view):
                    job.read_bytes += n
    except OSError as exc:  # a file gone or unreadable: the load will say so, with its name
        job.error = str(exc)
    job.seconds = round(time.perf_counter() - started, 3)
    log.info("weights paged in path=%s bytes=%d seconds=%.3f%s", job.directory, job.read_bytes, job.seconds,
             f" error={job.error}" if job.error else "")
    return job


def start(directory: Path) -> tuple[PageIn, threading.Thread] | None:
    """Begin reading the weights of `directory` into the page cache on a daemon thread (it
    only reads, and ends by itself; a process that exits first loses nothing). None: skipped."""
    if os.environ.get("MLXPOOL_PAGE_IN", "1") == "0":
        return None
    try:
        job = plan(directory, available_bytes())
    except OSError:
        return None
    if job is None:
        return None
    thread = threading.Thread(target=read_all, args=(job,), name="weights-page-in", daemon=True)
    thread.start()
    return job, thread
