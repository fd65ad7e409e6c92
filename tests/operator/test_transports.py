"""`io.transports.PerHostTransport`: one pool per agent origin behind one client, kept
alive, bounded in count (real HTTP servers on loopback)."""

from __future__ import annotations

import asyncio

import httpx
from aiohttp import web

from mlxpool.operator.io.transports import PerHostTransport


async def _servers(count: int) -> tuple[list[web.AppRunner], list[str]]:
    async def health(request: web.Request) -> web.Response:
        assert request.transport is not None
        return web.json_response({"status": "ok", "port": request.transport.get_extra_info("sockname")[1],
                                  "peer": request.transport.get_extra_info("peername")[1]})

    runners, urls = [], []
    for _ in range(count):
        app = web.Application()
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
    return runners, urls


def test_each_origin_has_its_own_kept_alive_pool_and_the_oldest_goes_beyond_the_bound():
    async def scenario() -> None:
        runners, urls = await _servers(3)
        transport = PerHostTransport(max_hosts=2)
        try:
            async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
                for url in urls[:2]:
                    for _ in range(3):
                        assert (await client.get(f"{url}/health")).json()["status"] == "ok"
                assert len(transport) == 2
                await client.get(f"{urls[2]}/health")  # a third origin: the least recently used pool goes
                assert len(transport) == 2
                answers = await asyncio.gather(*(client.get(f"{u}/health") for u in urls[1:] for _ in range(5)))
                assert all(a.status_code == 200 for a in answers)
                assert len(transport) == 2
            assert len(transport) == 0  # closed with the client
        finally:
            for runner in runners:
                await runner.cleanup()

    asyncio.run(scenario())


def test_requests_do_not_search_sys_path_for_sniffio_on_every_call():
    """httpcore imports sniffio per request; uninstalled, that was a sys.path search each time."""
    import sys

    searched: list[str] = []

    class Recorder:
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            if name == "sniffio":
                searched.append(name)
            return None

    async def scenario() -> None:
        runners, urls = await _servers(1)
        sys.meta_path.insert(0, Recorder())  # type: ignore[arg-type]
        try:
            async with httpx.AsyncClient(transport=PerHostTransport(), trust_env=False) as client:
                for _ in range(3):
                    assert (await client.get(f"{urls[0]}/health")).status_code == 200
        finally:
            sys.meta_path.pop(0)
            for runner in runners:
                await runner.cleanup()

    asyncio.run(scenario())
    assert searched == []


def test_idle_connections_are_kept_for_the_keepalive_expiry_given():
    """The operator keeps its probe connections 60 s (under the agents' 75 s): probes of a watched agent come every
    ~20 s at 1,000 nodes, and with httpx's 5 s each one connected afresh."""
    async def peers(expiry: float) -> set[int]:
        runners, urls = await _servers(1)
        try:
            transport = PerHostTransport(keepalive_expiry=expiry)
            async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
                seen = set()
                for _ in range(2):
                    seen.add((await client.get(f"{urls[0]}/health")).json()["peer"])
                    await asyncio.sleep(0.3)
                return seen
        finally:
            for runner in runners:
                await runner.cleanup()

    assert len(asyncio.run(peers(0.1))) == 2  # expired between the two: a new connection
    assert len(asyncio.run(peers(60.0))) == 1  # kept: the same connection
