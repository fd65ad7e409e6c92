"""Who is woken when a node changes (pure bookkeeping of the daemons)."""

from __future__ import annotations

from mlxpool.operator.reconcilers.runtimes import CacheRuntime, PoolRuntime, Runtimes


def woken(runtimes: Runtimes, node: str) -> set[str]:
    for r in (*runtimes.pools.values(), *runtimes.caches.values()):
        r.woken.clear()
    runtimes.node_changed(node)
    named = {**{f"pool:{k[1]}": r for k, r in runtimes.pools.items()},
             **{f"cache:{k[1]}": r for k, r in runtimes.caches.items()}}
    return {name for name, r in named.items() if r.woken.is_set()}


async def test_a_node_change_wakes_only_the_daemons_it_concerns():
    runtimes = Runtimes()
    seen = frozenset({"a", "b", "c", "x"})
    runtimes.pools["ns", "settled"] = PoolRuntime(holds=frozenset({"a"}), interest=frozenset({"a", "b"}), seen=seen,
                                                  settled=True)
    runtimes.pools["ns", "converging"] = PoolRuntime(holds=frozenset({"a"}), interest=frozenset({"a", "b"}),
                                                     seen=seen, settled=False)
    runtimes.caches["ns", "done"] = CacheRuntime(holds=frozenset({"c"}), interest=frozenset({"b", "c"}), seen=seen,
                                                 settled=True)
    assert woken(runtimes, "a") == {"pool:settled", "pool:converging"}
    assert woken(runtimes, "b") == {"pool:converging", "cache:done"}  # a settled pool needs no other node
    assert woken(runtimes, "x") == set()  # outside every selector
    assert woken(runtimes, "new") == {"pool:converging", "cache:done"}


def test_caches_by_model_in_a_namespace():
    from mlxpool.operator.logic.sources import CacheRef

    runtimes = Runtimes()
    runtimes.cache_refs["ns", "b"] = CacheRef("ns", "b", "m", "ns.b.1")
    runtimes.cache_refs["ns", "a"] = CacheRef("ns", "a", "m", "ns.a.1")
    runtimes.cache_refs["other", "c"] = CacheRef("other", "c", "m", "other.c.1")
    assert runtimes.caches_by_model("ns") == {"m": runtimes.cache_refs["ns", "a"]}


async def test_a_residency_change_wakes_only_the_caches_holding_a_copy_there():
    runtimes = Runtimes()
    runtimes.pools["ns", "p"] = PoolRuntime(holds=frozenset({"a"}), settled=False)
    runtimes.caches["ns", "here"] = CacheRuntime(holds=frozenset({"a"}), settled=True)
    runtimes.caches["ns", "elsewhere"] = CacheRuntime(holds=frozenset({"b"}), settled=True)
    runtimes.residency_changed("a")
    assert [k[1] for k, r in runtimes.caches.items() if r.woken.is_set()] == ["here"]
    assert not runtimes.pools["ns", "p"].woken.is_set()
