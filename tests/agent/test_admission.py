"""FIFO admission of waiting sequences into free batch slots (pure logic)."""

from __future__ import annotations

import pytest

from mlxpool.agent.engine.scheduling import FifoAdmission


def test_pops_in_arrival_order_up_to_free_slots():
    queue: FifoAdmission[str] = FifoAdmission()
    for name in "abcd":
        queue.push(name, name.upper())
    assert queue.pop(3) == ["A", "B", "C"]
    assert len(queue) == 1
    assert queue.pop(0) == []
    assert queue.pop(5) == ["D"]


def test_remove_takes_a_waiting_item_out():
    queue: FifoAdmission[str] = FifoAdmission()
    queue.push("a", "A")
    queue.push("b", "B")
    assert queue.remove("a") == "A"
    assert queue.remove("a") is None
    assert queue.drain() == ["B"]
    assert len(queue) == 0


def test_duplicate_request_ids_are_refused():
    queue: FifoAdmission[str] = FifoAdmission()
    queue.push("a", "A")
    with pytest.raises(ValueError, match="already waiting"):
        queue.push("a", "A2")
