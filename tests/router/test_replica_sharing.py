"""Two router replicas place prompts as one: prefixes shared through a real redis-server, sessions by hashing."""

from __future__ import annotations

import asyncio
import uuid

from mlxpool.router.settings import SharingSettings

from .conftest import make_table


def prompt(group: int) -> str:
    """A 6-block system prompt of its own per group, then a question."""
    return (f"group {group} system prompt. " * 40)[:6 * 64] + f" question {uuid.uuid4().hex}"


async def test_replicas_share_prefixes_through_redis_and_keep_sessions(agents, start_router, redis_server):
    fleet = [await agents(n) for n in ("a", "b", "c", "d")]
    table = make_table({"m": [(a.node, a.url) for a in fleet]}, strategy="prefix-affinity")
    sharing = SharingSettings(redis_url=redis_server.url, key=f"test:prefixes:{uuid.uuid4().hex}", interval=0.01)
    one = await start_router(table, sharing=sharing)
    two = await start_router(table, sharing=sharing)
    await two.complete(prompt="hi")  # shorter than a block: it only moves two's rotation off one's


    for group in range(6):  # placed by one; two must send each group's next prompt to the same agent
        first = await one.complete(prompt=prompt(group))
        async with asyncio.timeout(5):
            while two.app.state.sharing.merged < group + 1:
                await asyncio.sleep(0.01)
        second = await two.complete(prompt=prompt(group))
        assert first.status_code == second.status_code == 200
        assert second.headers["x-mlxpool-endpoint"] == first.headers["x-mlxpool-endpoint"], group

    # A conversation (x-session-id) stays on one agent through either replica, whatever the prompt.
    for session in ("conversation-1", "conversation-2", "conversation-3"):
        nodes = {(await router.client.post("/v1/completions", headers={"x-session-id": session}, json={
            "model": "m", "prompt": f"turn {turn}"})).headers["x-mlxpool-endpoint"]
            for turn in range(3) for router in (one, two)}
        assert len(nodes) == 1, (session, nodes)


async def test_a_replica_routes_on_its_own_index_while_redis_is_away(agents, start_router, refused_url):
    agent = await agents("a")
    table = make_table({"m": [("a", agent.url)]}, strategy="prefix-affinity")
    router = await start_router(table, sharing=SharingSettings(redis_url=f"redis://{refused_url.split('//')[1]}/0"))

    response = await router.complete(prompt=prompt(1))

    assert response.status_code == 200
    assert router.app.state.sharing.written == 0
