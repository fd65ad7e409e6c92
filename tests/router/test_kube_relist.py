"""ConfigMap following against a scripted API server: errors, backoff, 410 Gone, re-list.

The real apiserver (test_kube_watch.py) cannot be made to expire a watch on demand, so
here a fake one answers the router's real kubernetes_asyncio requests from a script.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from kubernetes_asyncio import client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlxpool.router.settings import PoolRef, TableSourceSettings
from mlxpool.router.tables.configmaps import ConfigMapFollower
from mlxpool.router.tables.holder import TableHolder

from .conftest import make_table, serving


def configmap(revision: int, uid: str, resource_version: str) -> dict[str, Any]:
    table = make_table({"m": [("a", "http://a")]}, revision=revision, namespace="ns", pool="pool")
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "pool-routes", "namespace": "ns", "uid": uid, "resourceVersion": resource_version},
            "data": {"routes.json": table.to_json()}}


class ScriptedApiServer:
    """Answers list and watch requests for ConfigMaps from a fixed script, recording them."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.idle = asyncio.Event()
        self.script = [
            ("list", JSONResponse({"kind": "Status", "code": 500, "message": "etcd is sad"}, status_code=500)),
            ("list", self._list([configmap(1, "u1", "5")], "5")),
            ("watch", [{"type": "MODIFIED", "object": configmap(2, "u1", "7")},
                       {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                    "message": "too old resource version: 5 (8)"}}]),
            ("list", self._list([configmap(3, "u1", "9")], "9")),
            ("watch", None),  # held open until the test ends
        ]

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/api/v1/namespaces/ns/configmaps", self._configmaps)])

    @staticmethod
    def _list(items: list[dict[str, Any]], resource_version: str) -> JSONResponse:
        return JSONResponse({"apiVersion": "v1", "kind": "ConfigMapList",
                             "metadata": {"resourceVersion": resource_version}, "items": items})

    async def _configmaps(self, request: Request) -> Response:
        params = dict(request.query_params)
        self.requests.append(params)
        kind = "watch" if params.get("watch", "").lower() == "true" else "list"
        expected, answer = self.script.pop(0)
        assert kind == expected, f"expected a {expected}, got {params}"
        if kind == "list":
            return answer
        return StreamingResponse(self._events(answer), media_type="application/json")

    async def _events(self, events: list[dict[str, Any]] | None):
        if events is None:
            self.idle.set()
            await asyncio.Event().wait()
        for event in events or []:
            yield json.dumps(event) + "\n"


async def test_follower_retries_errors_and_relists_after_410():
    server = ScriptedApiServer()
    holder = TableHolder(PoolRef("ns", "pool"))
    revisions: list[int] = []
    holder.on_accept(lambda t: revisions.append(t.revision))
    async with serving(server.app()) as url, client.ApiClient(client.Configuration(host=url)) as api:
        settings = TableSourceSettings(pool=PoolRef("ns", "pool"), backoff_initial=0.01, backoff_max=0.05)
        follower = asyncio.create_task(ConfigMapFollower(api, holder, PoolRef("ns", "pool"), settings).run())
        try:
            await asyncio.wait_for(server.idle.wait(), 10)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)

    assert revisions == [1, 2, 3]
    assert [(r.get("watch", "").lower(), r.get("resourceVersion")) for r in server.requests] == [
        ("", None), ("", None), ("true", "5"), ("", None), ("true", "9")]
    assert {r["fieldSelector"] for r in server.requests} == {"metadata.name=pool-routes"}
