"""Stop strings over streamed text: what may be sent now, and whether to stop.

Generated text arrives in pieces that do not line up with stop strings ("Hel" + "lo"),
so text that could be the start of a stop string is held back until the next piece
settles it. Matching is on decoded text, not token ids: a stop string can be spelled by
many different token sequences. Pure logic, no MLX; EOS tokens are handled by the
batch generator, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class StopStringMatcher:
    """Per-request state: feed text deltas, get back the text safe to emit."""

    stops: Sequence[str]
    stopped: bool = False
    _pending: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if any(not s for s in self.stops):
            raise ValueError("stop strings must not be empty")

    def feed(self, text: str) -> str:
        """Consume `text`; return what can be emitted. Sets `stopped` on a match.

        On a match the returned text ends right before the stop string, and
        everything after it is dropped.
        """
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self._pending + text
        cut = _earliest_match(buffer, self.stops)
        if cut is not None:
            self.stopped = True
            self._pending = ""
            return buffer[:cut]
        held = _longest_suffix_prefix(buffer, self.stops)
        self._pending = buffer[len(buffer) - held :] if held else ""
        return buffer[: len(buffer) - held]

    def flush(self) -> str:
        """The text still held back (call when generation ends for another reason)."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text


def _earliest_match(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _longest_suffix_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best
