"""Generate the agent's and the router's API reference from their own OpenAPI documents.

    python -m mlxpool.dev.apiref          # rewrites docs/api-reference.md and docs/openapi/*.json

The documents come from real processes, as a client would see them: an agent (no model,
with an ops token, so the operations API under `/v1/node` is included) and a router
following an empty routes file are started on loopback, asked for `/openapi.json`, and
stopped (about 3 s). `docs/openapi/agent.json` and `router.json` are those documents as
served (for client generators); `docs/api-reference.md` renders them: each operation with
its parameters, body and answers, then each schema's fields with type, bounds, default
and description. A test fails when any of the three files is stale, like the CRD
reference (`mlxpool.dev.crdref`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from mlxpool.dev import components
from mlxpool.dev.controlplane import REPO_ROOT
from mlxpool.routing import RoutingTable

DOCS = REPO_ROOT / "docs"
REFERENCE = DOCS / "api-reference.md"
OPENAPI_DIR = DOCS / "openapi"
HEADER = """# API reference: node agent and router

Generated from the `/openapi.json` that a running agent and router serve
(`python -m mlxpool.dev.apiref`, `make api-reference`; a test fails when this file is stale).
The raw documents are in [`openapi/agent.json`](openapi/agent.json) and
[`openapi/router.json`](openapi/router.json). Errors are in the OpenAI shape everywhere
(`{"error": {"message", "type", "param", "code"}}`); a bad request is a 400, never a 422.

Authentication: on the agent, the inference routes (`/v1/models`, `/v1/completions`,
`/v1/chat/completions`) need `Authorization: Bearer <API key>` when the agent has API keys
(`auth.api_keys_file`); the operations API (`/v1/node...`) always needs the ops token
(`--ops-token-file`); `/health`, `/ready`, `/metrics` and `/v1/signals` are open. The
router passes the client's `Authorization` through to the agent.
"""


def fetch_documents() -> dict[str, dict[str, Any]]:
    """{'agent': ..., 'router': ...}: the documents served by a real agent and router."""
    with tempfile.TemporaryDirectory(prefix="mlxpool-apiref-") as tmp:
        work = Path(tmp)
        token = work / "ops-token"
        token.write_text("apiref-" + "0" * 32 + "\n")
        routes = work / "routes.json"
        routes.write_text(RoutingTable(pool="apiref", namespace="default", revision=1).to_json())
        agent = components.start_agent(None, work, ops_token_file=token)
        try:
            router = components.start_router(work, routes_file=routes)
            try:
                return {"agent": _get(agent.base_url), "router": _get(router.base_url)}
            finally:
                router.stop(10)
        finally:
            agent.stop(10)


def _get(url: str) -> dict[str, Any]:
    response = httpx.get(url + "/openapi.json", timeout=30, trust_env=False)
    response.raise_for_status()
    document: dict[str, Any] = response.json()
    return document


# ---- rendering ----


def type_of(schema: dict[str, Any]) -> str:
    """A short type: `string`, `integer ≥ 1 ≤ 1048576`, `array of string`, `TierPolicy`, `string | null`."""
    if "$ref" in schema:
        return f"[{schema['$ref'].rsplit('/', 1)[-1]}](#{schema['$ref'].rsplit('/', 1)[-1].lower()})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " \\| ".join(dict.fromkeys(type_of(s) for s in schema[key]))
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return type_of(schema["allOf"][0])
    if "enum" in schema:
        return "one of " + ", ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        return " \\| ".join(kind)
    if kind == "array":
        text = f"array of {type_of(schema.get('items', {}))}"
    elif kind == "object" and "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
        text = f"map of {type_of(schema['additionalProperties'])}"
    else:
        text = str(kind)
    bounds = [f"{sign} {_number(schema[key])}" for key, sign in (
        ("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"),
        ("minLength", "length ≥"), ("maxLength", "length ≤"), ("minItems", "items ≥"), ("maxItems", "items ≤"),
        ("minProperties", "entries ≥"), ("maxProperties", "entries ≤")) if key in schema]
    if "pattern" in schema:
        bounds.append(f"matching `{schema['pattern']}`")
    return text + (" " + ", ".join(bounds) if bounds else "")


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _ref_name(content: dict[str, Any]) -> str:
    schema = (content.get("application/json") or {}).get("schema") or {}
    return type_of(schema) if schema else ""


def render_document(name: str, document: dict[str, Any]) -> str:
    info = document.get("info", {})
    lines = [f"## {info.get('title', name)}", ""]
    lines += ["| method | path | what | body |", "|---|---|---|---|"]
    for path, item in document.get("paths", {}).items():
        for method, op in item.items():
            body = _ref_name((op.get("requestBody") or {}).get("content") or {})
            anchor = f"#{name}-{method}-{path}".lower().replace("/", "").replace("{", "").replace("}", "")
            what = op.get("summary", "")
            lines.append(f"| {method.upper()} | [`{path}`]({_anchor(anchor)}) | {_cell(what)} | {body} |")
    lines.append("")
    for path, item in document.get("paths", {}).items():
        for method, op in item.items():
            lines += _operation(name, path, method, op)
    schemas = document.get("components", {}).get("schemas", {})
    if schemas:
        lines += [f"### {info.get('title', name)}: schemas", ""]
        for schema_name, schema in schemas.items():
            lines += _schema(schema_name, schema)
    return "\n".join(lines)


def _anchor(text: str) -> str:
    return "".join(c for c in text if c.isalnum() or c in "-#_")


def _operation(name: str, path: str, method: str, op: dict[str, Any]) -> list[str]:
    lines = [f'<a id="{_anchor(f"{name}-{method}-{path}".lower().replace("/", ""))}"></a>',
             f"### {name}: `{method.upper()} {path}`", ""]
    if op.get("description"):
        lines += [" ".join(op["description"].split()), ""]
    params = op.get("parameters") or []
    if params:
        lines += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
        for p in params:
            lines.append(f"| `{p['name']}` | {p.get('in', '')} | {type_of(p.get('schema', {}))} | "
                         f"{'yes' if p.get('required') else 'no'} | {_cell(p.get('description', ''))} |")
        lines.append("")
    body = op.get("requestBody")
    if body:
        schema = ((body.get("content") or {}).get("application/json") or {}).get("schema") or {}
        if "$ref" in schema:
            lines += [f"Body: {type_of(schema)} (JSON).", ""]
        else:
            lines += ["Body (JSON): " + _cell(schema.get("description", "")), ""]
            lines += _fields(schema)
    answers = []
    for code, response in (op.get("responses") or {}).items():
        shape = _ref_name(response.get("content") or {})
        answers.append(f"`{code}` {_cell(response.get('description', ''))}" + (f" ({shape})" if shape else ""))
    if answers:
        lines += ["Answers: " + "; ".join(answers) + ".", ""]
    return lines


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f'<a id="{name.lower()}"></a>', f"#### {name}", ""]
    if schema.get("description"):
        lines += [" ".join(schema["description"].split()), ""]
    if "enum" in schema:
        lines += ["One of " + ", ".join(f"`{v}`" for v in schema["enum"]) + ".", ""]
    return lines + _fields(schema)


def _fields(schema: dict[str, Any]) -> list[str]:
    properties = schema.get("properties") or {}
    if not properties:
        return []
    required = set(schema.get("required") or [])
    lines = ["| field | type | required | default | description |", "|---|---|---|---|---|"]
    for field, sub in properties.items():
        default = f"`{json.dumps(sub['default'])}`" if "default" in sub else ""
        lines.append(f"| `{field}` | {type_of(sub)} | {'yes' if field in required else 'no'} | {default} | "
                     f"{_cell(sub.get('description', ''))} |")
    if schema.get("additionalProperties") is True:
        lines.append("| (any other) | | | | relayed as given |")
    return [*lines, ""]


def render(documents: dict[str, dict[str, Any]]) -> str:
    return HEADER + "\n" + "\n".join(render_document(n, d) for n, d in documents.items()).rstrip() + "\n"


def raw(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=False) + "\n"


def current() -> dict[Path, str]:
    """What the three generated files must hold: {path: text}."""
    documents = fetch_documents()
    return {REFERENCE: render(documents), **{OPENAPI_DIR / f"{n}.json": raw(d) for n, d in documents.items()}}


def main(argv: list[str] | None = None) -> int:
    files = current()
    OPENAPI_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
