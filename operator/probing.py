"""Health probes of agents: `GET <endpoint>/health` with a short timeout.

One shared `httpx.AsyncClient`, all of a pass's endpoints probed concurrently. Any
answer other than 2xx, a refused connection or a timeout makes the endpoint unhealthy
at once (no failure threshold): the routing table must drop a dead agent within about
one probe interval. Messages are stable for a repeated failure so they do not cause
status writes on their own. Deciding what to do with a result is not done here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import httpx

from mlxpool.operator import metrics
from mlxpool.operator.endpoints import ProbeResult

HEALTH_PATH = "/health"


class Prober:
    def __init__(self, client: httpx.AsyncClient, timeout: float) -> None:
        self._client = client
        self._timeout = timeout

    async def probe(self, endpoint: str) -> ProbeResult:
        started = time.perf_counter()
        result = await self._get(endpoint)
        metrics.PROBE_SECONDS.observe(time.perf_counter() - started)
        if not result.healthy:
            metrics.PROBE_FAILURES.inc()
        return result

    async def probe_all(self, endpoints: Mapping[str, str]) -> dict[str, ProbeResult]:
        """Probe `{key: endpoint}` concurrently; results under the same keys."""
        keys = list(endpoints)
        results = await asyncio.gather(*(self.probe(endpoints[k]) for k in keys))
        return dict(zip(keys, results))

    async def _get(self, endpoint: str) -> ProbeResult:
        try:
            response = await self._client.get(endpoint.rstrip("/") + HEALTH_PATH, timeout=self._timeout)
        except httpx.TimeoutException:
            return ProbeResult(False, f"no answer to GET {HEALTH_PATH} within {self._timeout:g}s")
        except httpx.ConnectError as exc:
            return ProbeResult(False, f"cannot connect: {exc}")
        except httpx.HTTPError as exc:
            return ProbeResult(False, f"{type(exc).__name__}: {exc}")
        if response.is_success:
            return ProbeResult(True)
        return ProbeResult(False, f"GET {HEALTH_PATH} answered HTTP {response.status_code}")
