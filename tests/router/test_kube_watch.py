"""The router follows its pool's ConfigMap through a real kube-apiserver (tests/conftest.py).

The router runs as a process with the router's own identity, so the RBAC of
manifests/rbac is exercised too; the agents are the fakes of this folder's conftest.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import yaml

from mlxpool.dev.components import start_router as start_router_process
from mlxpool.resources import ROUTES_DATA_KEY, routes_configmap_name

from .conftest import make_table

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


async def test_router_follows_the_pool_configmap(controlplane, namespace, agents, tmp_path):
    a, b, c = await agents("a"), await agents("b"), await agents("c")
    name = routes_configmap_name("pool")

    async def kubectl(*args: str, input: str | None = None) -> None:
        await asyncio.to_thread(controlplane.kubectl, *args, "-n", namespace, input=input)

    async def put_routes(text: str) -> None:
        manifest = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                    "data": {ROUTES_DATA_KEY: text}}
        await kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def routes(node: str, url: str, revision: int) -> str:
        return make_table({"m": [(node, url)]}, revision=revision, namespace=namespace).to_json()

    # Started before its ConfigMap exists: alive, not ready.
    router = await asyncio.to_thread(
        start_router_process, tmp_path / "logs", pool=f"{namespace}/pool", kubeconfig=controlplane.kubeconfig("router"))
    try:
        async with httpx.AsyncClient(base_url=router.url, trust_env=False, timeout=10) as client:
            async def wait_for(predicate, what: str) -> None:
                try:
                    async with asyncio.timeout(15):
                        while not await predicate():
                            await asyncio.sleep(0.05)
                except TimeoutError:
                    raise AssertionError(f"router never saw {what}; log:\n{router.log_tail()}") from None

            async def revision() -> int | None:
                return (await client.get("/ready")).json().get("revision")

            async def node() -> str:
                return (await client.post("/v1/completions", json={"model": "m", "prompt": "hi"})).json()["node"]

            async def updates(result: str) -> float:
                for line in (await client.get("/metrics")).text.splitlines():
                    if line.startswith(f'mlxpool_router_table_updates_total{{result="{result}"}}'):
                        return float(line.split()[-1])
                return 0.0

            assert (await client.get("/ready")).status_code == 503

            await put_routes(routes("a", a.url, 1))
            await wait_for(lambda: _eq(revision(), 1), "revision 1")
            assert await node() == "a"

            await put_routes(routes("b", b.url, 2))
            await wait_for(lambda: _eq(revision(), 2), "revision 2")
            assert await node() == "b"

            # An unparsable table and an older revision are refused; the last good table stays.
            await put_routes("{ not a table")
            await wait_for(lambda: _eq(updates("invalid"), 1.0), "the invalid table")
            await put_routes(routes("a", a.url, 1))
            await wait_for(lambda: _eq(updates("stale"), 1.0), "the stale table")
            assert await revision() == 2 and await node() == "b"

            # Deleted and created again (the pool re-created): a new object, a new revision history.
            await kubectl("delete", "configmap", name)
            await put_routes(routes("c", c.url, 1))
            await wait_for(lambda: _eq(node(), "c"), "the re-created ConfigMap")
            assert await revision() == 1
    finally:
        await asyncio.to_thread(router.stop)
    log = router.log_text()
    assert "Traceback" not in log, log


async def _eq(awaitable, expected) -> bool:
    return await awaitable == expected
