"""How much memory this process may use and how much the OS has available now.

Capacity is physical memory, or the agent's cgroup limit when that is lower (cgroup v2
`memory.max`; v1 `memory.limit_in_bytes` where only the v1 memory controller is
mounted): a capped agent must budget for its cap, not the host's RAM.
Available is the OS's figure (Linux MemAvailable; macOS free + inactive + purgeable
pages, via `hardware.free_memory_bytes`), and within a cgroup the room left below its
limit, whichever is smaller. Reads the OS: call it off the event loop.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlxpool.agent.node import hardware

CGROUP_ROOT = Path("/sys/fs/cgroup")


UNLIMITED = 1 << 60
"""cgroup v1 writes "no limit" as a number near 2**63."""


def cgroup_files(proc_self_cgroup: str | None = None, root: Path = CGROUP_ROOT) -> tuple[Path, Path] | None:
    """(limit file, usage file) of this process's memory cgroup: v2 if its controller is
    there, else v1; None when neither is readable."""
    try:
        text = proc_self_cgroup if proc_self_cgroup is not None else Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        number, controllers, path = [*line.split(":", 2), "", ""][:3]
        if number == "0" and controllers == "":
            v2 = root / path.lstrip("/")
            if (v2 / "memory.max").exists():
                return v2 / "memory.max", v2 / "memory.current"
        elif "memory" in controllers.split(","):
            v1 = root / "memory" / path.lstrip("/")
            if (v1 / "memory.limit_in_bytes").exists():
                return v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes"
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # "max": no limit
        return None
    value = int(text)
    return value if value < UNLIMITED else None


def cgroup_limit_and_usage(files: tuple[Path, Path] | None = None) -> tuple[int | None, int | None]:
    """(limit, usage) of the agent's memory cgroup; None where unlimited or unreadable."""
    files = files if files is not None else cgroup_files()
    if files is None:
        return None, None
    return _read_int(files[0]), _read_int(files[1])


def capacity_bytes() -> int:
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit, _ = cgroup_limit_and_usage()
    return min(physical, limit) if limit is not None else physical


def available_bytes() -> int | None:
    free = hardware.free_memory_bytes()
    limit, usage = cgroup_limit_and_usage()
    if limit is not None and usage is not None:
        room = max(limit - usage, 0)
        return room if free is None else min(free, room)
    return free
