"""What machine is this: chip, memory, cores, accelerator, platform, free memory.

The accelerator's facts (kind, name, memory) come from MLX itself through the engine
(`engine.device`) and are passed in here; on a discrete GPU the model's weights and KV
live in device memory, so free memory means the device's there (on unified memory and
the CPU it is the host's).

Parsing is split from reading so the parsers can be tested on captured text. Reading
may run `sysctl` / `vm_stat` on macOS (blocking, quick): call `detect_hardware()` and
`free_memory_bytes()` off the event loop.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

from mlxpool.nodes import Hardware


def platform_tag(system: str, machine: str) -> str:
    """e.g. 'darwin-arm64', 'linux-x86_64'."""
    machine = machine.lower()
    if system.lower() == "linux" and machine == "aarch64":
        machine = "arm64"
    return f"{system.lower()}-{machine}"


def accelerator_for(tag: str) -> str:
    """MLX runs on Metal on Apple Silicon; everywhere else this agent uses the CPU backend."""
    return "metal" if tag == "darwin-arm64" else "cpu"


def parse_cpuinfo_chip(text: str) -> str | None:
    """The CPU model from /proc/cpuinfo ('model name' on x86, 'Model'/'Hardware' on ARM boards)."""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        match = re.search(rf"^{re.escape(key)}\s*:\s*(.+?)\s*$", text, re.MULTILINE)
        if match:
            return match.group(1)
    return None


def parse_meminfo_available(text: str) -> int | None:
    """Bytes of MemAvailable from /proc/meminfo."""
    match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def parse_vm_stat_free(text: str) -> int | None:
    """Bytes the macOS kernel can hand out now: free + inactive + speculative pages."""
    size = re.search(r"page size of (\d+) bytes", text)
    if not size:
        return None
    pages = 0
    for name in ("Pages free", "Pages inactive", "Pages speculative"):
        match = re.search(rf"^{name}:\s+(\d+)\.", text, re.MULTILINE)
        pages += int(match.group(1)) if match else 0
    return pages * int(size.group(1))


def detect_hardware(accelerator: str | None = None, device_name: str | None = None,
                    device_memory_bytes: int | None = None) -> Hardware:
    """This machine; the accelerator as MLX reported it (else guessed from the platform)."""
    tag = platform_tag(platform.system(), platform.machine())
    return Hardware(
        chip=_chip_name(tag) or platform.processor() or platform.machine(),
        memory_bytes=physical_memory_bytes(),
        cpu_cores=os.cpu_count() or 1,
        accelerator=accelerator or accelerator_for(tag),
        platform=tag,
        device_name=device_name,
        device_memory_bytes=device_memory_bytes,
    )


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_free_bytes(total: int, used: int) -> int:
    """What a discrete device can still hold: its memory less what MLX holds there."""
    return max(0, total - used)


def free_memory_bytes() -> int | None:
    """The host's memory the kernel can hand out now."""
    system = platform.system()
    if system == "Linux":
        return parse_meminfo_available(_read("/proc/meminfo"))
    if system == "Darwin":
        return parse_vm_stat_free(_run(["vm_stat"]))
    return None


def _chip_name(tag: str) -> str | None:
    if tag.startswith("darwin"):
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"]).strip() or None
    if tag.startswith("linux"):
        return parse_cpuinfo_chip(_read("/proc/cpuinfo"))
    return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
