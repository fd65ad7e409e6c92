"""Byte progress for long transfers: a bar on a terminal, periodic lines in a log.

One `ByteMeter` per transfer. The thread moving the bytes calls `advance(n)`; the meter
formats done/total, percent, rate (over the whole transfer so far) and ETA, and hands a
line to its sink at most every `interval_s` (and once at the end, `finish()`). Two sinks:
`TerminalBar` (one line redrawn with `\\r`, for a person watching) and a logging
callback (for an agent's log or a CI log, where redrawing would be noise).
`meter_for_stream` picks between them by `isatty()`, like pip and Ollama do.

Deliberately small: no threads of its own, no knowledge of what is transferred. It is
called from worker threads (downloads run on `asyncio.to_thread`), so `advance` does
only integer arithmetic and, when a line is due, a write or a log call (both thread-safe).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24
UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, one decimal (none for plain bytes)."""
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {UNITS[unit]}"


def human_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = max(0, round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ByteMeter:
    """Counts bytes of one transfer and reports it through `sink(meter, final)`."""

    def __init__(self, label: str, total: int | None, sink: Callable[[ByteMeter, bool], None], *,
                 interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._sink = sink
        self._interval = interval_s
        self._clock = clock
        self._start = clock()
        self._last_report = self._start
        self._lock = threading.Lock()
        self._finished = False

    def rate(self) -> float:
        """Bytes per second since the start (0 before any time passed)."""
        elapsed = self._clock() - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def fraction(self) -> float | None:
        return min(self.done / self.total, 1.0) if self.total else None

    def line(self, with_label: bool = True) -> str:
        """`label 12.0 MiB / 48.0 MiB (25%) 6.0 MiB/s eta 6s` (`in 8s` once finished)."""
        rate = self.rate()
        parts = [self.label] if with_label else []
        if self.total:
            parts.append(f"{human_bytes(self.done)} / {human_bytes(self.total)} ({self.fraction():.0%})")
        else:
            parts.append(human_bytes(self.done))
        parts.append(f"{human_bytes(rate)}/s")
        if self.total and not self._finished:
            left = max(self.total - self.done, 0)
            parts.append(f"eta {human_seconds(left / rate) if rate > 0 else '?'}")
        if self._finished:
            parts.append(f"in {human_seconds(self._clock() - self._start)}")
        return " ".join(parts)

    def advance(self, n: int) -> None:
        self.done += n
        now = self._clock()
        if now - self._last_report < self._interval:
            return
        with self._lock:
            if now - self._last_report < self._interval or self._finished:
                return
            self._last_report = now
        self._sink(self, False)

    def finish(self) -> None:
        """Report the final line once (bytes moved, average rate, duration)."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._sink(self, True)


class TerminalBar:
    """A sink that redraws one line on a terminal: `label [#####-----] 12.0 MiB / ...`."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, meter: ByteMeter, final: bool) -> None:
        fraction = meter.fraction()
        bar = ""
        if fraction is not None:
            filled = round(fraction * BAR_WIDTH)
            bar = "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "] "
        self.stream.write(f"\r\x1b[2K{meter.label} {bar}{meter.line(with_label=False)}" + ("\n" if final else ""))
        self.stream.flush()


def log_sink(emit: Callable[[str], None]) -> Callable[[ByteMeter, bool], None]:
    """A sink that hands each line to `emit` (a logger's method, `print`)."""
    return lambda meter, _final: emit(meter.line())


def meter_for_stream(label: str, total: int | None, stream: TextIO, *, log: Callable[[str], None] | None = None,
                     bar_interval_s: float = 0.2, log_interval_s: float = 5.0) -> ByteMeter:
    """A bar redrawn every `bar_interval_s` when `stream` is a terminal, else a line every
    `log_interval_s` through `log` (default: written to `stream`)."""
    if stream.isatty():
        return ByteMeter(label, total, TerminalBar(stream), interval_s=bar_interval_s)

    def write_line(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    return ByteMeter(label, total, log_sink(log or write_line), interval_s=log_interval_s)
