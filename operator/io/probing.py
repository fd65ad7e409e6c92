"""Health probes of agents: `GET <endpoint>/health` with a short timeout.

One shared `httpx.AsyncClient` with kept-alive connections. Any answer other than 2xx,
a refused connection or a timeout makes the probe fail; a timeout is marked as such,
since a busy agent times out too (the node monitor wants two in a row for those, and
acts on a refused connection at once: a dead agent leaves the table within about one
probe interval).
Only a connection the agent closed under us is retried, at once, on a fresh one.
Messages are stable for a repeated failure so they do not cause status writes on
their own. Deciding what to do with a result is not done here.
"""

from __future__ import annotations

import time

import httpx

from mlxpool.operator.io import metrics
from mlxpool.operator.logic.endpoints import ProbeResult

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

    async def _get(self, endpoint: str) -> ProbeResult:
        url = endpoint.rstrip("/") + HEALTH_PATH
        try:
            try:
                response = await self._client.get(url, timeout=self._timeout)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                # A kept-alive connection the agent closed (it restarted, or just died): ask
                # once more on a fresh one, so the verdict and its message are about the agent.
                response = await self._client.get(url, timeout=self._timeout)
        except httpx.TimeoutException:
            return ProbeResult(False, f"no answer to GET {HEALTH_PATH} within {self._timeout:g}s", timed_out=True)
        except httpx.ConnectError as exc:
            return ProbeResult(False, f"cannot connect: {exc}")
        except httpx.HTTPError as exc:
            return ProbeResult(False, f"{type(exc).__name__}: {exc}")
        if response.is_success:
            return ProbeResult(True)
        return ProbeResult(False, f"GET {HEALTH_PATH} answered HTTP {response.status_code}")
