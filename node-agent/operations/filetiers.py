"""Where a model's files are when it is not loaded: the OS page cache or only the disk.

The two lower residency tiers (`agentapi.ModelTier`). A load from page-cache-warm files
reads memory; from disk it waits for the device, often ten times longer, so the manager
times each load by the tier its files were in when it began (`tier_of`, mincore over a
mapping of the weight files: no byte is read), and cost-aware eviction prices a model's
return by that tier's measured rate. `drop` demotes page cache to disk for one model's
files (posix_fadvise DONTNEED: clean pages go; needs no privilege, unlike drop_caches).
Blocking: call off the event loop.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlxpool import _native
from mlxpool.agentapi import ModelTier

WEIGHT_SUFFIXES = (".safetensors", ".npz", ".gguf")
WARM_FRACTION = 0.9
"""Resident share of the weight bytes from which the files count as page-cache warm."""


def weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                  and not p.name.startswith(".") and p.stat().st_size > 0)


def resident_fraction(directory: Path) -> float:
    """The share of the model's weight bytes in the page cache now (1.0 with no weight files)."""
    files = weight_files(directory)
    if not files:
        return 1.0
    return float(_native.WeightSet([str(p) for p in files]).resident_fraction())


def tier_of(directory: Path) -> ModelTier:
    """PAGE_CACHE when (nearly) all of the weight bytes are cached, else DISK."""
    return ModelTier.PAGE_CACHE if resident_fraction(directory) >= WARM_FRACTION else ModelTier.DISK


def drop(directory: Path) -> None:
    """Ask the kernel to drop the model's weight files from the page cache (clean pages only)."""
    for path in weight_files(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
