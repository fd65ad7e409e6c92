"""The operations API's HTTP routes (`/v1/node`, contract in `mlxpool.agentapi`).

Thin: check the ops token, parse, call the manager or the cache store, serialize.
The token is checked before the body is even read, so an unauthenticated caller
learns nothing (401/403 whatever it sent); bodies are then parsed with the contract's
models and bad ones answer 400 naming the field, through the agent's error table.
"""

from __future__ import annotations

import logging
import re
from typing import TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from mlxpool.agent.errors import InvalidRequest
from mlxpool.agent.http.auth import require_ops_token
from mlxpool.agent.operations.errors import PolicyNotFound
from mlxpool.agent.operations.manager import ModelManager
from mlxpool.agent.operations.reports import NodeReporter
from mlxpool.agent.operations.sources import SourceError
from mlxpool.agent.operations.staging import ModelCacheStore
from mlxpool.agent.serving.policies import TooManyPolicies
from mlxpool.agentapi import (
    CACHE_KEY_PATTERN,
    OPS_PREFIX,
    LoadModelRequest,
    PrefetchRequest,
    SchedulingPolicy,
    StageRequest,
)

M = TypeVar("M", bound=BaseModel)

_CACHE_KEY = re.compile(CACHE_KEY_PATTERN)
MAX_MODEL_NAME = 253  # as LoadModelRequest.name
log = logging.getLogger(__name__)

OPS_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("POST", OPS_PREFIX + "/models"): LoadModelRequest,
    ("POST", OPS_PREFIX + "/prefetch"): PrefetchRequest,
    ("PUT", OPS_PREFIX + "/scheduling/{model}"): SchedulingPolicy,
    ("PUT", OPS_PREFIX + "/cache/{key}"): StageRequest,
}
"""The bodies these routes parse themselves (after the token check), for the OpenAPI document."""


def ops_router(manager: ModelManager, cache: ModelCacheStore, reporter: NodeReporter) -> APIRouter:
    router = APIRouter(prefix=OPS_PREFIX, dependencies=[Depends(require_ops_token)])

    @router.get("")
    async def node() -> Response:
        return _json(await reporter.report())

    @router.post("/models")
    async def load_model(request: Request) -> Response:
        body = await _parse(request, LoadModelRequest)
        state, ready = await manager.load(body)
        return _json(state, 200 if ready else 202)

    @router.post("/prefetch", status_code=202)
    async def prefetch(request: Request) -> Response:
        """Read a model's weight files into the page cache ahead of its load (202; the state
        is in `GET /v1/node`'s `prefetches`)."""
        return _json(await manager.prefetch(await _parse(request, PrefetchRequest)), 202)

    @router.delete("/models/{name:path}")
    async def unload_model(name: str) -> Response:
        return _json(await manager.unload(name))

    @router.put("/scheduling/{model:path}")
    async def put_scheduling(model: str, request: Request) -> Response:
        _check_model(model)
        body = await _parse(request, SchedulingPolicy)
        try:
            applied = reporter.policies.put(model, body)
        except TooManyPolicies as exc:
            raise InvalidRequest(str(exc), param="model") from None
        log.info("scheduling policy applied model=%s default_priority=%s tiers=%s", model,
                 applied.default_priority.value, ",".join(t.priority.value for t in applied.tiers) or "-")
        return _json(applied)

    @router.get("/scheduling/{model:path}")
    async def get_scheduling(model: str) -> Response:
        policy = reporter.policies.get(model)
        if policy is None:
            raise _no_policy(model)
        return _json(policy)

    @router.delete("/scheduling/{model:path}")
    async def delete_scheduling(model: str) -> Response:
        if not reporter.policies.delete(model):
            raise _no_policy(model)
        return Response(status_code=200, content="{}", media_type="application/json")

    @router.get("/cache")
    async def list_cache() -> Response:
        entries = cache.entries()
        return Response("[" + ",".join(e.model_dump_json() for e in entries) + "]", media_type="application/json")

    @router.put("/cache/{key}")
    async def stage(key: str, request: Request) -> Response:
        _check_key(key)
        body = await _parse(request, StageRequest)
        try:
            entry = await cache.stage(key, body)
        except SourceError as exc:
            raise InvalidRequest(str(exc), param=exc.param) from None
        return _json(entry, 202)

    @router.get("/cache/{key}")
    async def get_entry(key: str) -> Response:
        _check_key(key)
        return _json(cache.get(key))

    @router.delete("/cache/{key}")
    async def delete_entry(key: str) -> Response:
        _check_key(key)
        return _json(await cache.delete(key))

    return router


async def _parse(request: Request, model: type[M]) -> M:
    """The body as `model`; errors go through the agent's validation handler (400 naming the field)."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _no_policy(model: str) -> PolicyNotFound:
    return PolicyNotFound(f"model {model!r} has no scheduling policy (it uses the node's defaults)", param="model")


def _check_model(model: str) -> None:
    if not 0 < len(model) <= MAX_MODEL_NAME:
        raise InvalidRequest(f"model: the name must have 1 to {MAX_MODEL_NAME} characters", param="model")


def _check_key(key: str) -> None:
    if not _CACHE_KEY.match(key):
        raise InvalidRequest(
            f"key: {key!r} is not a cache key (lowercase letters, digits, '.', '_', '-'; "
            "starting and ending with a letter or digit; at most 253)", param="key")


def _json(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")
