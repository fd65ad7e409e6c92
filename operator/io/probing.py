"""Health probes of agents (`GET <endpoint>/health` with a short timeout) and health
watches (`GET <endpoint>/health/watch`: a stream the agent keeps open, one line every
few seconds; it ends the moment the agent dies, which is how the operator hears of a
death without polling every agent every second).

Probes share one `httpx.AsyncClient` with kept-alive connections, at most
`max_in_flight` at a time (a fleet-wide burst of suspicions queues instead of opening
a thousand connections at once); watches have a client of their own without a
connection limit, since each holds one connection for as long as the agent lives. Any answer other than 2xx,
a refused connection or a timeout makes the probe fail; a timeout is marked as such,
since a busy agent times out too (the node monitor wants two in a row for those, and
acts on a refused connection at once: a dead agent leaves the table within about one
probe interval).
Only a connection the agent closed under us is retried, at once, on a fresh one.
Messages are stable for a repeated failure so they do not cause status writes on
their own. Deciding what to do with a result is not done here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from mlxpool.operator.io import metrics
from mlxpool.operator.logic.endpoints import ProbeResult

HEALTH_PATH = "/health"
WATCH_PATH = "/health/watch"
WATCH_SILENCE = 2.5
"""A watch that says nothing for this many of its intervals counts as ended (a hung agent)."""


class WatchUnsupported(Exception):
    """The agent has no health watch (an older agent): it is probed at its pool's interval."""


class Prober:
    def __init__(self, client: httpx.AsyncClient, timeout: float, *, max_in_flight: int = 64,
                 watch_client: httpx.AsyncClient | None = None, watch_interval: float = 10.0) -> None:
        self._client = client
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_in_flight)
        self._watch_client = watch_client
        self.watch_interval = watch_interval

    @property
    def watches(self) -> bool:
        return self._watch_client is not None

    async def probe(self, endpoint: str, reason: str = "scheduled") -> ProbeResult:
        async with self._slots:
            metrics.PROBES.labels(reason).inc()
            started = time.perf_counter()
            result = await self._get(endpoint)
            metrics.PROBE_SECONDS.observe(time.perf_counter() - started)
        if not result.healthy:
            metrics.PROBE_FAILURES.inc()
        return result

    async def watch(self, endpoint: str, alive: Callable[[], None]) -> str:
        """Follow the agent's health watch until it ends; returns why it ended (a message
        for the log). `alive()` is called at every line. Raises WatchUnsupported when the
        agent has none, or when this prober watches nothing."""
        if self._watch_client is None:
            raise WatchUnsupported("health watches are off")
        url = endpoint.rstrip("/") + WATCH_PATH
        silence = self.watch_interval * WATCH_SILENCE
        timeout = httpx.Timeout(self._timeout, read=silence)
        metrics.WATCHES_OPEN.inc()
        try:
            async with self._watch_client.stream("GET", url, params={"interval": f"{self.watch_interval:g}"},
                                                 timeout=timeout) as response:
                if response.status_code in (404, 405):
                    raise WatchUnsupported(f"GET {WATCH_PATH} answered HTTP {response.status_code}")
                if not response.is_success:
                    return f"GET {WATCH_PATH} answered HTTP {response.status_code}"
                async for _ in response.aiter_raw():
                    alive()
            return "the agent ended its health watch"
        except httpx.TimeoutException:
            return f"no word on the health watch for {silence:g}s"
        except httpx.HTTPError as exc:
            return f"the health watch broke: {type(exc).__name__}"
        finally:
            metrics.WATCHES_OPEN.dec()

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
