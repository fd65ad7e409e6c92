"""What the router reads from an inference request, and which headers cross it.

The body is forwarded byte for byte; the router only parses it to learn the model (which
picks the endpoint list), whether it streams, its priority, and the prompt text (for
affinity plugins). Validation is limited to what the router itself needs; the agent
validates the rest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mlxpool.priorities import PRIORITY_HEADER, Priority
from mlxpool.router.errors import BadRequest

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade",
})
"""Headers that describe one connection, never forwarded (RFC 9110 §7.6.1)."""

NOT_FORWARDED_UPSTREAM = HOP_BY_HOP | {"host", "content-length", "accept-encoding"}
NOT_RELAYED_DOWNSTREAM = HOP_BY_HOP | {"content-length", "server", "date"}


MAX_MODEL_CHARS = 512
"""As the agent's: a longer name is no model's, and is never echoed back."""

STRATEGY_HEADER = "x-mlxpool-strategy"
"""Names the strategy profile for this request, among those the pool's table allows."""

SESSION_HEADER = "x-session-id"
"""Names the conversation a request belongs to: `session-affinity` keeps it on one endpoint."""

MAX_SESSION_CHARS = 256


@dataclass(frozen=True)
class InferenceRequest:
    model: str
    stream: bool
    priority: Priority | None
    prompt: str
    body: bytes
    strategy: str | None = None
    """The profile the request asked for (`STRATEGY_HEADER`), not yet checked against the table."""
    session: str | None = None
    """The conversation (`SESSION_HEADER`), for session affinity."""


def parse_inference_request(body: bytes, headers: Mapping[str, str]) -> InferenceRequest:
    """Read what routing needs from an OpenAI completions or chat request; `BadRequest` names what is wrong."""
    if not body:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # Python's parser has a nesting limit; no request of ours nests that deep
        raise BadRequest("request body is nested too deeply") from None
    if not isinstance(document, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(document).__name__}")
    model = document.get("model")
    if model is None:
        raise BadRequest("missing required field 'model'", param="model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string", param="model")
    if len(model) > MAX_MODEL_CHARS:
        raise BadRequest(f"'model' has {len(model)} characters; at most {MAX_MODEL_CHARS} are accepted", param="model")
    stream = document.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    priority = _priority(document.get("priority"), "priority")
    header_priority = _priority(headers.get(PRIORITY_HEADER), PRIORITY_HEADER)
    strategy = headers.get(STRATEGY_HEADER)
    if strategy is not None and not (0 < len(strategy) <= 63):
        raise BadRequest(f"{STRATEGY_HEADER} must name a strategy (1 to 63 characters)", param=STRATEGY_HEADER)
    session = headers.get(SESSION_HEADER) or None
    if session is not None and len(session) > MAX_SESSION_CHARS:
        raise BadRequest(f"{SESSION_HEADER} has {len(session)} characters; at most {MAX_SESSION_CHARS} are accepted",
                         param=SESSION_HEADER)
    return InferenceRequest(model, stream, priority or header_priority, _prompt_text(document), body, strategy,
                            session)


def _priority(value: Any, where: str) -> Priority | None:
    if value is None:
        return None
    try:
        return Priority(value)
    except ValueError:
        allowed = ", ".join(p.value for p in Priority)
        raise BadRequest(f"{where} must be one of {allowed}; got {str(value)[:64]!r}", param=where) from None


def _prompt_text(document: dict[str, Any]) -> str:
    """The prompt as text, best effort (token-id prompts and image parts give '')."""
    prompt = document.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    parts: list[str] = []
    messages = document.get("messages")
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "\n".join(parts)


def upstream_headers(headers: Iterable[tuple[str, str]], request_id: str) -> list[tuple[str, str]]:
    """The client's end-to-end headers (authorization, x-priority, ...) for the agent.

    Bodies are relayed as they are, so the agent is asked for an uncompressed one.
    """
    forwarded = [(k, v) for k, v in headers if k.lower() not in NOT_FORWARDED_UPSTREAM and k.lower() != "x-request-id"]
    return [*forwarded, ("accept-encoding", "identity"), ("x-request-id", request_id)]


def downstream_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The agent's response headers fit for the client."""
    return [(k, v) for k, v in headers if k.lower() not in NOT_RELAYED_DOWNSTREAM]
