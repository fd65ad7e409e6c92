"""OpenAPI documents that say what mlxpool's servers really answer.

FastAPI's generated document promises a 422 with its own validation shape for every
route with parameters; the agent and the router answer a bad request with 400 in the
OpenAI error shape (`apierrors`). Routes that read their body themselves (the operations
API parses with the contract's models after the token check; the router only looks at a
few fields and relays the rest) have no body in the generated document at all. This
rewrites both, so a client generator or a schema-driven fuzzer (schemathesis, in
tests/reliability) gets the truth: bodies documented, 400/413/default errors in the one
error shape, no 422.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

__all__ = ["ERROR_SCHEMA", "install_openapi"]

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}

BodySchema = type[BaseModel] | dict[str, Any]
"""A route's request body: a pydantic model, or a JSON schema written out."""


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _body_ref(body: BodySchema, components: dict[str, Any]) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    schema = body.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    components[body.__name__] = schema
    return {"$ref": f"#/components/schemas/{body.__name__}"}


def openapi_document(app: FastAPI, bodies: Mapping[tuple[str, str], BodySchema]) -> dict[str, Any]:
    """`app`'s document with `bodies` ((METHOD, path) -> schema) added and the errors made true."""
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["Error"] = ERROR_SCHEMA
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            body = bodies.get((method.upper(), path))
            if body is not None:
                operation["requestBody"] = {"required": True,
                                            "content": {"application/json": {"schema": _body_ref(body, components)}}}
            if "requestBody" in operation or operation.get("parameters"):
                responses["400"] = _error("Invalid request (the body does not parse, a field is out of "
                                          "range or over a limit); `param` names the field")
            if "requestBody" in operation:
                responses["413"] = _error("Request body larger than the server's limit")
            responses["default"] = _error("Any other error (401, 403, 404, 429, 431, 503, ...): the OpenAI "
                                          "error shape")
    return document


def install_openapi(app: FastAPI, bodies: Mapping[tuple[str, str], BodySchema] | None = None) -> None:
    """Serve `openapi_document` (built once, on the first request) as the app's /openapi.json."""
    given = dict(bodies or {})

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app, given)
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
