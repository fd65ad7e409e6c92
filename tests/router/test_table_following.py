"""The router follows its routes file: reloads, refusals, readiness."""

from __future__ import annotations

import asyncio
import sys

import httpx
import pytest

from mlxpool.dev.components import start_router as start_router_process

from .conftest import make_table, write_atomically


async def test_routes_file_changes_are_followed(agents, start_router):
    a, b = await agents("a"), await agents("b")
    router = await start_router(make_table({"m": [("a", a.url)]}, revision=1))
    assert (await router.complete()).json()["node"] == "a"

    await router.set_table(make_table({"m": [("b", b.url)]}, revision=2))
    assert (await router.complete()).json()["node"] == "b"

    # A broken file and an older revision are both ignored: b keeps serving.
    write_atomically(router.routes_file, "{ half a table")
    write_atomically(router.routes_file, make_table({"m": [("a", a.url)]}, revision=1).to_json())
    await asyncio.sleep(0.2)  # ten polls of the file
    assert router.app.state.holder.current.revision == 2
    assert (await router.complete()).json()["node"] == "b"
    metrics = await router.metrics()
    assert 'mlxpool_router_table_updates_total{result="stale"} 1.0' in metrics
    assert "mlxpool_router_table_revision 2.0" in metrics


async def test_not_ready_until_a_table_is_loaded(agents, start_router):
    agent = await agents("a")
    router = await start_router(None)

    assert (await router.client.get("/health")).status_code == 200
    assert (await router.client.get("/ready")).status_code == 503
    response = await router.complete()
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_routing_table"
    assert (await router.client.get("/v1/models")).status_code == 503

    await router.set_table(make_table({"m": [("a", agent.url)]}, revision=4))
    assert (await router.client.get("/ready")).json() == {"status": "ready", "revision": 4, "strategy": "round-robin"}
    assert (await router.complete()).status_code == 200


async def test_strategy_change_in_the_table_switches_profile(agents, start_router):
    a, b = await agents("a", release=asyncio.Queue()), await agents("b")
    router = await start_router(make_table({"m": [("a", a.url), ("b", b.url)]}, strategy="least-loaded"))

    # Hold one stream open on a; least-loaded sends every next request to b.
    async with router.client.stream("POST", "/v1/completions", json={"model": "m", "stream": True}) as held:
        assert held.headers["x-mlxpool-endpoint"] == "a"
        nodes = [(await router.complete()).json()["node"] for _ in range(3)]
    assert nodes == ["b", "b", "b"]


async def test_router_process_follows_its_routes_file(agents, tmp_path):
    """`mlxpool router --routes-file PATH --port 0` as users run it."""
    a, b = await agents("a"), await agents("b")
    routes = tmp_path / "routes.json"
    write_atomically(routes, make_table({"m": [("a", a.url)]}, revision=1).to_json())
    process = await asyncio.to_thread(start_router_process, tmp_path / "logs", routes_file=routes)
    try:
        async with httpx.AsyncClient(base_url=process.url, trust_env=False, timeout=10) as client:
            assert (await client.get("/ready")).status_code == 200
            first = await client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
            assert first.json()["node"] == "a"

            write_atomically(routes, make_table({"m": [("b", b.url)]}, revision=2).to_json())
            async with asyncio.timeout(10):
                while (await client.get("/ready")).json()["revision"] != 2:
                    await asyncio.sleep(0.05)
            second = await client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
            assert second.json()["node"] == "b"
    finally:
        await asyncio.to_thread(process.stop)
    # uvicorn shuts down cleanly, then re-raises SIGTERM so the exit status says why it stopped.
    assert "Application shutdown complete" in process.log_text(), process.log_tail()
    assert process.popen.returncode in (0, -15), process.log_tail()


@pytest.mark.parametrize(("argv", "needle"), [
    ([], "give --pool NAMESPACE/NAME"),
    (["--pool", "just-a-name"], "NAMESPACE/NAME"),
    (["--routes-file", "r.json", "--kubeconfig", "k"], "exclude each other"),
    (["--pool", "ns/p", "--kubeconfig", "/does/not/exist"], "no such file"),
    (["--routes-file", "r.json", "--max-attempts", "0"], "max_attempts"),
])
async def test_bad_command_lines_exit_2_naming_the_problem(argv, needle):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlxpool", "router", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert needle in stderr.decode()
