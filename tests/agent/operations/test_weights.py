"""The native weight manager from Python: warm, residency, pin, and an honest refusal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlxpool import _native
from mlxpool.agent.operations.weights import WeightFiles


async def test_warm_brings_every_page_in_and_pin_locks_them(tiny_model: Path):
    weights = await WeightFiles.open(tiny_model)
    # Hidden files (the content-identity cache an agent writes beside them) are not weights.
    assert weights.size == sum(p.stat().st_size for p in tiny_model.iterdir() if not p.name.startswith("."))
    seconds = await weights.warm()
    assert seconds >= 0 and await weights.resident_fraction() == 1.0
    await weights.pin()
    assert weights.pinned
    await weights.unpin()
    assert not weights.pinned
    await weights.pin()
    weights.close()  # unmapping releases the lock
    assert not weights.pinned


def test_failed_system_calls_raise_the_matching_oserror():
    with pytest.raises(FileNotFoundError) as caught:
        _native.WeightSet(["/nonexistent/model.safetensors"])
    assert caught.value.errno == 2 and "/nonexistent/model.safetensors" in str(caught.value)


def memlock_forbidden(argv: list[str]) -> list[str]:
    """`argv` run with RLIMIT_MEMLOCK at one page and (as root) without CAP_IPC_LOCK."""
    prefix = ["prlimit", "--memlock=4096:4096"]
    if os.geteuid() == 0:
        prefix = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", *prefix]
    return [*prefix, *argv]


needs_limits = pytest.mark.skipif(
    not (sys.platform == "linux" and shutil.which("prlimit") and shutil.which("setpriv")),
    reason="needs Linux prlimit and setpriv to forbid mlock",
)


@needs_limits
def test_pin_refused_by_rlimit_memlock_says_which_limit(tiny_model: Path):
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from mlxpool.agent.operations.weights import WeightFiles, PinRefused\n"
        "async def main():\n"
        "    w = await WeightFiles.open(Path(sys.argv[1]))\n"
        "    try:\n"
        "        await w.pin()\n"
        "    except PinRefused as exc:\n"
        "        print('refused:', exc, 'pinned:', w.pinned)\n"
        "        return\n"
        "    print('pinned anyway')\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(memlock_forbidden([sys.executable, "-c", script, str(tiny_model)]),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.startswith("refused:"), out
    assert "RLIMIT_MEMLOCK is 4096 bytes" in out and "CAP_IPC_LOCK" in out and "pinned: False" in out


def test_residency_for_the_status_has_two_significant_figures():
    from mlxpool.agent.engine.interface import WeightResidency
    from mlxpool.agent.operations.weights import status_residency, two_figures

    assert [two_figures(n) for n in (0, 7, 123, 4_567_890, 99_999)] == [0, 7, 120, 4_600_000, 100_000]

    class View:
        report = None

        def residency(self) -> WeightResidency:
            return WeightResidency(total=1_234_567, resident=1_230_001, pinned=65_536, mapped=0)

    assert status_residency(None) is None
    out = status_residency(View())  # type: ignore[arg-type]
    assert out is not None and out.to_wire() == {"totalBytes": 1_200_000, "residentBytes": 1_200_000,
                                                 "pinnedBytes": 66_000, "mappedBytes": 0}
