"""The memory the scheduler may spend on KV it keeps: a small protocol and its trivial form.

The scheduler holds KV beyond the running batch in two ways: a paused (preempted)
sequence keeps its cache until it resumes, and an admitted request's projected KV
(prompt plus `max_tokens`) will grow into memory. Before it does either it asks the
node's memory books whether the bytes fit (`can_hold`), takes them (`reserve`) and
gives them back (`release`) when the sequence resumes, finishes or is dropped. A
refused reservation is not an error: a paused sequence that cannot be kept is
recomputed instead (and counted as such), a projection that does not fit waits.

`UnlimitedBudget` says yes to everything and only keeps the books (what a node without
a memory model has; tests use it). The node's real books, weights and prefix cache and
OS headroom included, implement this protocol in `engine.memory` (issue 10).

Pure: no MLX, no clock, no I/O. Called from the engine thread only, so no locking.
"""

from __future__ import annotations

from typing import Protocol


class MemoryBudget(Protocol):
    """Bytes the engine may hold for paused and projected KV, by key (a request id)."""

    def can_hold(self, nbytes: int) -> bool:
        """Whether `nbytes` more would fit now (nothing is taken)."""
        ...

    def reserve(self, key: str, nbytes: int) -> bool:
        """Take `nbytes` for `key` (replacing what `key` held); False, and nothing taken, if they do not fit."""
        ...

    def release(self, key: str) -> int:
        """Give back what `key` holds; the bytes given back (0 if it held nothing)."""
        ...

    @property
    def reserved_bytes(self) -> int:
        """Bytes held for all keys."""
        ...


class UnlimitedBudget:
    """A budget without a limit (or with `limit_bytes`): keeps the books, refuses only past the limit."""

    def __init__(self, limit_bytes: int | None = None) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError("limit_bytes must be >= 0")
        self._limit = limit_bytes
        self._held: dict[str, int] = {}
        self._total = 0

    def can_hold(self, nbytes: int) -> bool:
        return self._limit is None or self._total + max(nbytes, 0) <= self._limit

    def reserve(self, key: str, nbytes: int) -> bool:
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        previous = self._held.get(key, 0)
        if self._limit is not None and self._total - previous + nbytes > self._limit:
            return False
        self._held[key] = nbytes
        self._total += nbytes - previous
        return True

    def release(self, key: str) -> int:
        nbytes = self._held.pop(key, 0)
        self._total -= nbytes
        return nbytes

    @property
    def reserved_bytes(self) -> int:
        return self._total

    def held(self, key: str) -> int:
        """What `key` holds (0 if nothing)."""
        return self._held.get(key, 0)
