"""mlxpool.progress: the lines and the bar a transfer reports (a fake clock; pure)."""

from __future__ import annotations

import io

from mlxpool.progress import ByteMeter, TerminalBar, human_bytes, human_seconds, meter_for_stream

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_units() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * MIB, 3 << 30)] == ["0 B", "1023 B", "1.5 KiB", "5.0 MiB",
                                                                            "3.0 GiB"]
    assert [human_seconds(s) for s in (0.4, 59, 61, 3725, float("inf"))] == ["0s", "59s", "1m01s", "1h02m", "?"]


def test_a_line_every_interval_with_rate_and_eta_then_one_final_line() -> None:
    clock, lines = Clock(), []
    meter = ByteMeter("model", 100 * MIB, lambda m, final: lines.append((m.line(), final)), interval_s=5,
                      clock=clock)
    clock.now += 2
    meter.advance(10 * MIB)  # before the interval: nothing
    assert lines == []
    clock.now += 3
    meter.advance(15 * MIB)
    assert lines == [("model 25.0 MiB / 100.0 MiB (25%) 5.0 MiB/s eta 15s", False)]
    clock.now += 1
    meter.advance(MIB)  # within the next interval: nothing
    clock.now += 14
    meter.advance(74 * MIB)
    meter.finish()
    meter.finish()  # once only
    assert lines[1:] == [("model 100.0 MiB / 100.0 MiB (100%) 5.0 MiB/s eta 0s", False),
                         ("model 100.0 MiB / 100.0 MiB (100%) 5.0 MiB/s in 20s", True)]


def test_an_unknown_total_reports_bytes_and_rate_only() -> None:
    clock, lines = Clock(), []
    meter = ByteMeter("x", None, lambda m, final: lines.append(m.line()), interval_s=0, clock=clock)
    clock.now += 2
    meter.advance(3 * MIB)
    assert lines == ["x 3.0 MiB 1.5 MiB/s"]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_redrawn_in_place_and_a_log_gets_lines() -> None:
    clock, out = Clock(), Tty()
    meter = ByteMeter("m", 4 * MIB, TerminalBar(out), interval_s=0, clock=clock)
    clock.now += 1
    meter.advance(MIB)
    meter.advance(3 * MIB)
    meter.finish()
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "m [######------------------] 1.0 MiB / 4.0 MiB (25%)" in text
    assert "[########################] 4.0 MiB / 4.0 MiB (100%) 4.0 MiB/s in 1s\n" in text

    assert isinstance(meter_for_stream("m", 1, Tty())._sink, TerminalBar)
    log = io.StringIO()
    plain = meter_for_stream("m", MIB, log, log_interval_s=0)
    plain.advance(MIB)
    plain.finish()
    assert log.getvalue().count("\n") == 2 and "\r" not in log.getvalue()
