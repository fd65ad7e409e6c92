"""The agent's one error table: domain errors and validation failures to HTTP responses.

Everything below the routes raises `errors.AgentError` subclasses (or lets request
validation fail); this table turns each into OpenAI's error shape, so every client
library parses our errors like OpenAI's, and anything unexpected into a 500 without
a traceback in the body (`mlxpool.httpguards`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response

from mlxpool.agent.errors import AgentError
from mlxpool.apierrors import error_body

log = logging.getLogger(__name__)


def error_response(error: AgentError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.response_headers())


async def _agent_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AgentError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        message = f"the body is not valid JSON: {detail}".rstrip(": ")
        return JSONResponse(error_body(message, "invalid_request_error"), 400)
    param = _param(first)
    # A value matching no member of a union fails once per member: report them as one.
    same = [e for e in exc.errors() if _param(e) == param]
    message = " or ".join(dict.fromkeys(e.get("msg", "invalid request") for e in same))
    if param:
        message = f"{param}: {message}"
    others = len(exc.errors()) - len(same)
    if others:
        message += f" (and {others} more problem(s))"
    return JSONResponse(error_body(message, "invalid_request_error", param=param), 400)


def _param(error: dict[str, Any]) -> str | None:
    """The field an error is about: its location without the body prefix and union-member tags."""
    loc = [str(p) for p in error.get("loc", ()) if p != "body" and not _UNION_TAG.match(str(p))]
    return ".".join(loc) or None


# pydantic tags a union member's errors with the member's type ("str", "list[int]", ...).
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\])$")


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), error_type), exc.status_code, headers=exc.headers)


# Typed as FastAPI's `exception_handlers` takes it (keys may also be status codes).
EXCEPTION_HANDLERS: dict[int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]] = {
    AgentError: _agent_error,
    RequestValidationError: _validation_error,
    HTTPException: _http_error,
}
"""Anything else is answered by `httpguards.UnexpectedErrorsMiddleware`: a handler for `Exception`
would run in Starlette's outermost middleware, which re-raises, and uvicorn then drops the connection."""
