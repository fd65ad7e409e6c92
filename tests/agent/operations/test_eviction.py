"""The admission policy as a table: what is evicted, in which order, and why a load is refused."""

from __future__ import annotations

import pytest

from mlxpool.agent.operations.eviction import Resident, Shortage, admit, eviction_order

MIB = 1024 * 1024


def r(name: str, mib: int = 100, used: float = 0.0, pinned: bool = False, busy: bool = False) -> Resident:
    return Resident(name, mib * MIB, used, pinned=pinned, busy=busy)


@pytest.mark.parametrize(("residents", "need_mib", "max_models", "budget_mib", "victims"), [
    ([], 100, 1, None, ()),                                          # empty node
    ([r("a")], 100, 2, None, ()),                                    # a free slot
    ([r("a", used=2), r("b", used=1)], 100, 2, None, ("b",)),        # full: least recently used goes
    ([r("a", used=1), r("b", used=2)], 100, 2, None, ("a",)),
    ([r("a", used=1), r("b", used=2), r("c", used=3)], 100, 2, None, ("a", "b")),  # over (max lowered)
    ([r("a", used=1, pinned=True), r("b", used=2)], 100, 2, None, ("b",)),  # pinned stays
    ([r("a", used=1, busy=True), r("b", used=2)], 100, 2, None, ("b",)),    # busy stays
    ([r("a", 300, used=1)], 300, 4, 500, ("a",)),                    # memory: evict to fit
    ([r("a", 100, used=1), r("b", 100, used=2)], 250, 4, 400, ("a",)),  # one victim frees enough
    ([r("a", 100, used=1), r("b", 100, used=2)], 350, 4, 400, ("a", "b")),  # both needed
    ([r("a", 100, used=1), r("b", 100, used=2)], 200, 4, 400, ()),   # fits exactly
    ([r("a", 100, used=1), r("b", 300, used=1)], 100, 2, None, ("b",)),  # tie on time: larger first
])
def test_admit_evicts_least_recently_used_idle_unpinned(residents, need_mib, max_models, budget_mib, victims):
    budget = None if budget_mib is None else budget_mib * MIB
    decision = admit(residents, need_mib * MIB, max_models=max_models, budget_bytes=budget)
    assert decision.admitted and decision.victims == victims


@pytest.mark.parametrize(("residents", "need_mib", "max_models", "budget_mib", "shortage", "words"), [
    ([r("a", pinned=True)], 100, 1, None, Shortage.SLOTS, ["maximum of 1", "pinned: a"]),
    ([r("a", busy=True), r("b", pinned=True)], 100, 2, None, Shortage.SLOTS,
     ["maximum of 2", "pinned: b", "busy or loading: a"]),
    ([], 600, 4, 500, Shortage.MEMORY, ["600.0 MiB", "whole memory budget of 500.0 MiB"]),
    ([r("a", 300, pinned=True)], 300, 4, 500, Shortage.MEMORY, ["only 200.0 MiB", "pinned: a"]),
    ([r("a", 300, busy=True), r("b", 100)], 300, 4, 500, Shortage.MEMORY, ["busy or loading: a"]),
])
def test_admit_refuses_naming_what_blocks(residents, need_mib, max_models, budget_mib, shortage, words):
    decision = admit(residents, need_mib * MIB, max_models=max_models,
                     budget_bytes=None if budget_mib is None else budget_mib * MIB)
    assert not decision.admitted and decision.refusal is not None
    assert decision.refusal.shortage is shortage
    for word in words:
        assert word in decision.refusal.message


def test_admit_without_eviction_refuses_when_full_and_says_eviction_is_off():
    decision = admit([r("a")], 100 * MIB, max_models=1, budget_bytes=None, evict=False)
    assert decision.refusal is not None and "eviction is off" in decision.refusal.message
    assert admit([r("a")], 100 * MIB, max_models=2, budget_bytes=None, evict=False).victims == ()


def test_eviction_order_skips_pinned_and_busy_and_orders_by_last_use():
    order = eviction_order([r("c", used=3), r("p", used=0, pinned=True), r("a", used=1), r("x", used=0, busy=True)])
    assert [m.name for m in order] == ["a", "c"]
