"""The macOS wired-limit path (engine/wiredlimit.py) with the machine faked: the sysctl's
answer, MLX's recommended working set and its `set_wired_limit`. The real Metal calls
never run here (no Mac); only that `raise_wired_limit` leaves a Linux machine alone."""

from __future__ import annotations

import subprocess

from mlxpool.agent.engine import wiredlimit
from mlxpool.agent.engine.wiredlimit import Machine, parse_sysctl, raise_wired_limit, wired_limit_bytes

GIB = 1 << 30


def mac(sysctl_mb: int | None, recommended: int | None, calls: list[int], fail: Exception | None = None) -> Machine:
    def sysctl() -> int | None:
        if fail is not None:
            raise fail
        return sysctl_mb

    def set_limit(limit: int) -> int:
        calls.append(limit)
        return 0

    return Machine(metal=lambda: True, sysctl_mb=sysctl, recommended=lambda: recommended, set_wired_limit=set_limit)


def test_the_limit_stays_within_what_macos_allows():
    assert wired_limit_bytes(None, None) is None
    assert wired_limit_bytes(0, 48 * GIB) == 48 * GIB  # sysctl unset: the working set
    assert wired_limit_bytes(40 * 1024, 48 * GIB) == 40 * GIB  # the sysctl caps it
    assert wired_limit_bytes(60 * 1024, 48 * GIB) == 48 * GIB
    assert wired_limit_bytes(40 * 1024, None) == 40 * GIB


def test_the_sysctl_answer_is_read_as_mib_or_unknown():
    assert parse_sysctl(0, "40960\n") == 40960
    assert parse_sysctl(0, "0\n") == 0
    assert parse_sysctl(1, "") is None  # sysctl: unknown oid 'iogpu.wired_limit_mb' (before macOS 14)
    assert parse_sysctl(0, "garbage") is None


def test_on_a_mac_mlx_is_asked_for_the_smaller_limit_and_the_log_says_why():
    calls: list[int] = []
    said = raise_wired_limit(10 * GIB, mac(40 * 1024, 48 * GIB, calls))
    assert calls == [40 * GIB]
    assert said is not None and f"wired limit {40 * GIB} bytes" in said and "iogpu.wired_limit_mb=40960" in said
    assert "exceed" not in said

    calls.clear()
    too_big = raise_wired_limit(50 * GIB, mac(40 * 1024, 48 * GIB, calls))
    assert calls == [40 * GIB] and too_big is not None and "exceed it: raise iogpu.wired_limit_mb" in too_big
    near = raise_wired_limit(37 * GIB, mac(40 * 1024, 48 * GIB, []))
    assert near is not None and "little is left for the KV cache" in near

    calls.clear()
    assert raise_wired_limit(GIB, mac(None, None, calls)) == "wired limit left at MLX's default (no limit known)"
    assert calls == []


def test_a_failure_is_a_message_never_an_exception():
    calls: list[int] = []
    said = raise_wired_limit(GIB, mac(None, None, calls, fail=subprocess.TimeoutExpired(wiredlimit.SYSCTL, 5)))
    assert said is not None and said.startswith("wired limit not raised:") and calls == []

    def refused(limit: int) -> int:
        raise ValueError("[set_wired_limit] Setting a wired limit larger than the maximum working set size")

    machine = Machine(metal=lambda: True, sysctl_mb=lambda: None, recommended=lambda: 48 * GIB,
                      set_wired_limit=refused)
    said = raise_wired_limit(GIB, machine)
    assert said is not None and "larger than the maximum working set size" in said


def test_off_metal_nothing_is_read_or_set():
    def untouched() -> int | None:
        raise AssertionError("read on a machine without Metal")

    assert raise_wired_limit(GIB, Machine(metal=lambda: False, sysctl_mb=untouched, recommended=untouched)) is None
    assert raise_wired_limit(GIB) is None  # this Linux machine, with the real MLX: no Metal
