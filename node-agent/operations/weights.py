"""A model directory's files through the native weight manager, off the event loop.

Warming maps every file and reads one byte per page (after a WILLNEED hint), so the
first load or request does not wait for the disk; pinning `mlock`s the mappings so
the kernel keeps them resident. Pinning is refused by the OS when RLIMIT_MEMLOCK is
too low and the process lacks CAP_IPC_LOCK (Linux) — then `pin` raises `PinRefused`
whose message says which limit to raise, and nothing stays half-locked.
A pinned set stays mapped for as long as this object lives: `close()` releases it.

`describe` turns a loaded model's load report and residency (the engine's `WeightsView`)
into the wire form that /v1/node, the InferenceNode status and the ModelCache status carry.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import resource
import time
from pathlib import Path

from mlxpool import _native
from mlxpool.agent.engine.interface import LoadReport, WeightResidency, WeightsView
from mlxpool.agentapi import ModelWeights
from mlxpool.nodes import WeightsResidency


class PinRefused(RuntimeError):
    """The OS would not lock the weights in memory; the message says why."""


class WeightFiles:
    def __init__(self, weights: _native.WeightSet, directory: Path) -> None:
        self._weights = weights
        self.directory = directory

    @classmethod
    async def open(cls, directory: Path) -> WeightFiles:
        paths = await asyncio.to_thread(_model_files, directory)
        return cls(await asyncio.to_thread(_native.WeightSet, [str(p) for p in paths]), directory)

    @property
    def size(self) -> int:
        return self._weights.size

    @property
    def pinned(self) -> bool:
        return self._weights.locked

    async def warm(self) -> float:
        """Bring every page into memory; the seconds it took."""
        started = time.perf_counter()
        await asyncio.to_thread(self._warm)
        return time.perf_counter() - started

    def _warm(self) -> None:
        self._weights.prefetch()
        self._weights.touch()

    async def pin(self) -> None:
        try:
            await asyncio.to_thread(self._weights.lock)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOMEM, errno.EAGAIN):
                raise PinRefused(refusal_message(exc, self.size)) from None
            raise

    async def unpin(self) -> None:
        await asyncio.to_thread(self._weights.unlock)

    async def resident_fraction(self) -> float:
        return await asyncio.to_thread(self._weights.resident_fraction)

    def close(self) -> None:
        """Drop the mappings (and with them any lock)."""
        self._weights = _native.WeightSet([])


def refusal_message(exc: OSError, size: int) -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
    return (f"not pinned: the OS refused to lock {size} bytes in memory ({os.strerror(exc.errno or 0)}); "
            f"RLIMIT_MEMLOCK is {limit}: raise it (ulimit -l, launchd HardResourceLimits/MemoryLock) "
            "or grant CAP_IPC_LOCK")


def _model_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def describe(report: LoadReport, residency: WeightResidency | None = None) -> ModelWeights:
    """The wire form of a model's weights; residency fields are None when not measured."""
    return ModelWeights(
        reader=report.reader, transfer=report.transfer, files=report.files, load_bytes=report.bytes,
        read_seconds=round(report.seconds, 4), load_gbps=round(report.gbps, 3),
        prefetch_threads=report.prefetch_threads, pin_policy=report.pin_policy, pin_message=report.pin_message,
        total_bytes=residency.total if residency else None,
        resident_bytes=residency.resident if residency else None,
        pinned_bytes=residency.pinned if residency else report.pinned_bytes,
        mapped_bytes=residency.mapped if residency else None,
    )


def two_figures(n: int) -> int:
    """`n` to 2 significant figures (a status field that must not change on every heartbeat)."""
    if n <= 0:
        return 0
    return int(round(n, 1 - math.floor(math.log10(n))))


def status_residency(view: WeightsView | None) -> WeightsResidency | None:
    """The InferenceNode status's `models[].weights`; blocking (mincore): call off the loop."""
    if view is None:
        return None
    where = view.residency()
    return WeightsResidency(total_bytes=two_figures(where.total), resident_bytes=two_figures(where.resident),
                            pinned_bytes=two_figures(where.pinned), mapped_bytes=two_figures(where.mapped))
