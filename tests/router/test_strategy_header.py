"""A request choosing its strategy profile with a header, only where the pool allows it."""

from __future__ import annotations

from .conftest import make_table


async def test_the_header_picks_an_allowed_profile_and_a_forbidden_one_is_a_400(agents, start_router):
    a, b = await agents("a"), await agents("b")
    table = make_table({"m": [("a", a.url), ("b", b.url)]}, strategy="round-robin")
    router = await start_router(table.model_copy(update={"selectable_strategies": ["least-loaded"]}))

    chosen = await router.client.post("/v1/completions", json={"model": "m", "prompt": "hi"},
                                      headers={"x-mlxpool-strategy": "least-loaded"})
    assert chosen.status_code == 200
    own = await router.client.post("/v1/completions", json={"model": "m", "prompt": "hi"},
                                   headers={"x-mlxpool-strategy": "round-robin"})
    assert own.status_code == 200  # the table's own strategy is always allowed

    refused = await router.client.post("/v1/completions", json={"model": "m", "prompt": "hi"},
                                       headers={"x-mlxpool-strategy": "sticky-prefix"})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "x-mlxpool-strategy"
    assert "'sticky-prefix' is not selectable in pool ns/pool (allowed: round-robin, least-loaded)" in error["message"]
    assert len(a.received) + len(b.received) == 2
