"""macOS only: MLX's wired limit for a loaded model's weights. NOT RUN on our Linux machines.

On Apple silicon the GPU computes from unified memory that macOS may page out or
compress; MLX's wired limit (`mx.set_wired_limit`, macOS 15+) asks Metal to keep up to
that many bytes of MLX's buffers resident (wired). mlx-lm raises it to the device's
recommended working set for the length of a generation (`generate.wired_limit`); a
server keeps its weights loaded, so the agent raises it once, after a load, and leaves
it (every load asks for the same, largest allowed limit: idempotent).

The limit may not exceed what the OS allows: MLX's `max_recommended_working_set_size`
and, when set, `sysctl iogpu.wired_limit_mb` (0 or unset: the OS default, which the
recommended size already is). A limit past either is an error in MLX, so the smaller
one is asked for; weights larger than it are said in the log with the sysctl to raise.

Everything the path needs from the machine comes in through `Machine`, so its
decisions are tested on Linux with a faked sysctl and a faked MLX call; the real
`sysctl` and Metal calls have never run in this project's CI (no Mac).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

SYSCTL = ("sysctl", "-n", "iogpu.wired_limit_mb")
NEAR_LIMIT = 0.9
"""Weights above this fraction of the limit leave little for the KV cache: said in the log (as mlx-lm warns)."""


def wired_limit_bytes(sysctl_mb: int | None, recommended: int | None) -> int | None:
    """The wired limit to ask MLX for (as mlx-lm's `wired_limit` does, the most allowed: the
    device's recommended working set), never past what the OS allows (`iogpu.wired_limit_mb`;
    0 or unset: no raised limit). None: no limit known, leave MLX's default."""
    caps = [c for c in ((sysctl_mb << 20) if sysctl_mb else None, recommended) if c and c > 0]
    return min(caps) if caps else None


def parse_sysctl(returncode: int, stdout: str) -> int | None:
    """`sysctl -n iogpu.wired_limit_mb`'s answer in MiB; None when unknown (no such key)."""
    text = stdout.strip()
    return int(text) if returncode == 0 and text.isdigit() else None


def read_sysctl_mb() -> int | None:
    """Apple only (blocking, a subprocess of ~10 ms: the loader calls it off the event loop)."""
    out = subprocess.run(SYSCTL, capture_output=True, text=True, timeout=5, check=False)
    return parse_sysctl(out.returncode, out.stdout)


def _recommended() -> int | None:
    import mlx.core as mx

    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return int(info.get("max_recommended_working_set_size", 0)) or None


def _metal() -> bool:
    import mlx.core as mx

    return bool(mx.metal.is_available())


def _set(limit: int) -> int:
    import mlx.core as mx

    return int(mx.set_wired_limit(limit))


@dataclass(frozen=True)
class Machine:
    """What the wired-limit path reads and calls (real ones by default; tests fake them)."""

    metal: Callable[[], bool] = _metal
    sysctl_mb: Callable[[], int | None] = read_sysctl_mb
    recommended: Callable[[], int | None] = _recommended
    set_wired_limit: Callable[[int], int] = _set


def raise_wired_limit(weights: int, machine: Machine | None = None) -> str | None:
    """On Metal, `mx.set_wired_limit` within what the OS allows; what was done, for the load
    log, or None off Metal (nothing to wire). Never raises: a failure is a message."""
    machine = machine or Machine()
    if not machine.metal():
        return None
    try:
        sysctl_mb = machine.sysctl_mb()
        recommended = machine.recommended()
        limit = wired_limit_bytes(sysctl_mb, recommended)
        if limit is None:
            return "wired limit left at MLX's default (no limit known)"
        previous = machine.set_wired_limit(limit)
    except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("wired limit not raised error=%r", exc)
        return f"wired limit not raised: {exc}"
    said = f"wired limit {limit} bytes (was {previous}; iogpu.wired_limit_mb={sysctl_mb}, recommended={recommended})"
    if weights > limit:
        return f"{said}; the weights ({weights} bytes) exceed it: raise iogpu.wired_limit_mb"
    if weights > NEAR_LIMIT * limit:
        return (f"{said}; the weights ({weights} bytes) take over {NEAR_LIMIT:.0%} of it: "
                "little is left for the KV cache")
    return said
