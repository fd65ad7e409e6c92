"""Admission: which waiting sequences enter the batch when slots free up.

The engine thread keeps accepted requests here and asks for at most `free_slots` of
them before every step. This walking skeleton admits first-come first-served; the
priority scheduler (SLA tiers, preemption) replaces `FifoAdmission` behind the same
small interface. Pure logic, no MLX, used from the engine thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class Admission(Protocol[T]):
    """A queue of waiting items keyed by request id."""

    def push(self, request_id: str, item: T) -> None: ...

    def pop(self, free_slots: int) -> list[T]:
        """Up to `free_slots` items to admit now, removed from the queue."""
        ...

    def remove(self, request_id: str) -> T | None:
        """Drop a waiting item (its client went away); None if it is not waiting."""
        ...

    def drain(self) -> list[T]:
        """Remove and return everything (engine stopping)."""
        ...

    def __len__(self) -> int: ...


class FifoAdmission(Generic[T]):
    """First come, first served."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, T] = OrderedDict()

    def push(self, request_id: str, item: T) -> None:
        if request_id in self._items:
            raise ValueError(f"request {request_id!r} is already waiting")
        self._items[request_id] = item

    def pop(self, free_slots: int) -> list[T]:
        taken: list[T] = []
        while self._items and len(taken) < free_slots:
            taken.append(self._items.popitem(last=False)[1])
        return taken

    def remove(self, request_id: str) -> T | None:
        return self._items.pop(request_id, None)

    def drain(self) -> list[T]:
        items = list(self._items.values())
        self._items.clear()
        return items

    def __len__(self) -> int:
        return len(self._items)
