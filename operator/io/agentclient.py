"""Calls to an agent's operations API (`mlxpool.agentapi`): one typed method per route.

Async httpx with the operator's bearer token (`--agent-token-file` or
`MLXPOOL_AGENT_TOKEN`). Answers are parsed into the contract's models; an error answer
raises `AgentError` with the agent's own message, a connection failure or timeout
raises `AgentUnreachable`. Every call is counted by operation and outcome. No retries
here: callers retry at their next pass, after looking at the agent's state again.
"""

from __future__ import annotations

from typing import TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from mlxpool.agentapi import (
    OPS_PREFIX,
    CacheEntry,
    LoadModelRequest,
    ModelState,
    NodeReport,
    PrefetchRequest,
    PrefetchState,
    SchedulingPolicy,
    StageRequest,
)
from mlxpool.operator.io import metrics

M = TypeVar("M", bound=BaseModel)


class AgentError(Exception):
    """The agent answered with an error (or with something that is not the contract)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


class AgentUnreachable(AgentError):
    def __init__(self, message: str) -> None:
        super().__init__(0, message)


class AgentClient:
    def __init__(self, client: httpx.AsyncClient, token: str | None, timeout: float = 5.0,
                 owner: str | None = None) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._owner = owner
        """Stamped on every load, so the agents report what this operator loaded."""

    async def node(self, url: str) -> NodeReport:
        return await self._call("report", "GET", url, "", NodeReport)

    async def load(self, url: str, request: LoadModelRequest) -> ModelState:
        if self._owner is not None and request.owner is None:
            request = request.model_copy(update={"owner": self._owner})
        return await self._call("load", "POST", url, "/models", ModelState, request)

    async def unload(self, url: str, model: str) -> ModelState:
        return await self._call("unload", "DELETE", url, f"/models/{quote(model, safe='')}", ModelState)

    async def stage(self, url: str, key: str, request: StageRequest) -> CacheEntry:
        return await self._call("stage", "PUT", url, f"/cache/{key}", CacheEntry, request)

    async def prefetch(self, url: str, request: PrefetchRequest) -> PrefetchState:
        """Announce a model as next: the agent reads its files into the page cache (202)."""
        return await self._call("prefetch", "POST", url, "/prefetch", PrefetchState, request)

    async def put_scheduling(self, url: str, model: str, policy: SchedulingPolicy) -> SchedulingPolicy:
        return await self._call("scheduling", "PUT", url, f"/scheduling/{quote(model, safe='')}",
                                SchedulingPolicy, policy)

    async def cache_entry(self, url: str, key: str) -> CacheEntry | None:
        """The entry, or None when the agent does not hold `key`."""
        try:
            return await self._call("cache-get", "GET", url, f"/cache/{key}", CacheEntry)
        except AgentError as exc:
            if exc.status == 404:
                return None
            raise

    async def delete_cache(self, url: str, key: str) -> bool:
        """Remove the copy; False when the agent did not hold it."""
        try:
            await self._call("cache-delete", "DELETE", url, f"/cache/{key}", None)
            return True
        except AgentError as exc:
            if exc.status == 404:
                return False
            raise

    async def metrics_text(self, url: str) -> str:
        """The agent's Prometheus `/metrics` (no token needed)."""
        try:
            response = await self._client.get(f"{url.rstrip('/')}/metrics", timeout=self._timeout)
        except httpx.HTTPError as exc:
            metrics.AGENT_REQUESTS.labels("metrics", "unreachable").inc()
            raise AgentUnreachable(f"GET /metrics: {type(exc).__name__}: {exc}") from exc
        metrics.AGENT_REQUESTS.labels("metrics", str(response.status_code)).inc()
        if not response.is_success:
            raise AgentError(response.status_code, "GET /metrics failed")
        return response.text

    async def _call(self, operation: str, method: str, url: str, path: str, answer: type[M] | None,
                    body: BaseModel | None = None) -> M:
        target = f"{url.rstrip('/')}{OPS_PREFIX}{path}"
        try:
            response = await self._client.request(
                method, target, headers=self._headers, timeout=self._timeout,
                json=body.model_dump(mode="json", exclude_none=True) if body is not None else None,
            )
        except httpx.HTTPError as exc:
            metrics.AGENT_REQUESTS.labels(operation, "unreachable").inc()
            raise AgentUnreachable(f"{method} {OPS_PREFIX}{path}: {type(exc).__name__}: {exc}") from exc
        metrics.AGENT_REQUESTS.labels(operation, str(response.status_code)).inc()
        if not response.is_success:
            raise AgentError(response.status_code, _error_message(response))
        if answer is None:
            return None  # type: ignore[return-value]
        try:
            return TypeAdapter(answer).validate_json(response.content)
        except ValidationError as exc:
            raise AgentError(response.status_code, f"answer is not a {answer.__name__}: {exc.errors()[0]['msg']}") \
                from exc


def _error_message(response: httpx.Response) -> str:
    """The contract's `{"error": {"message"}}`, FastAPI's `{"detail"}`, or the raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        if body.get("detail"):
            return str(body["detail"])[:500]
    return str(body)[:300]
