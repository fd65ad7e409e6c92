"""Schemathesis against the agent's and the router's own /openapi.json (made true by
`mlxpool.openapischema`: 400 not 422, the operations API's bodies, the router's body),
real processes: every documented operation gets generated requests, valid and not.

Passes when no answer is a 5xx and every 4xx is JSON in the OpenAI error shape. Bounded:
a few examples per operation, completions clamped to 2 tokens. The operations API runs
against an agent of its own (generated loads, stagings and deletes must not touch the
session's agent).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from mlxpool.dev import components
from mlxpool.dev.processes import Process
from mlxpool.dev.rawhttp import openai_error

pytestmark = pytest.mark.integration

OPS = "ops-schema-fuzzing-4b3a2918"
EXAMPLES = settings(max_examples=6, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
NEVER = "/health/watch"  # a stream that never ends, by design


@pytest.fixture(scope="module")
def ops_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    logs = tmp_path_factory.mktemp("schema-ops")
    token = logs / "ops-token"
    token.write_text(OPS + "\n")
    agent = components.start_agent(None, logs, name="agent-ops", ops_token_file=token)
    yield agent
    agent.stop(10)
    assert OPS not in "".join(p.read_text(errors="replace") for p in Path(logs).rglob("*.log"))


def _schema(url: str) -> Any:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    schema.config.update(base_url=url)
    return schema.exclude(path=NEVER)


@pytest.fixture(scope="module")
def agent_api(stack) -> Any:
    return _schema(stack.agent.base_url).exclude(path_regex="^/v1/node")


@pytest.fixture(scope="module")
def ops_api(ops_agent) -> Any:
    return _schema(ops_agent.base_url).include(path_regex="^/v1/node")


@pytest.fixture(scope="module")
def router_api(stack) -> Any:
    return _schema(stack.router.base_url)


def bounded(case: Any) -> None:
    """Generation stays small: whatever was generated, at most 2 tokens, one choice."""
    if isinstance(case.body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int) and case.body[key] > 2:
                case.body[key] = 2
        if isinstance(case.body.get("n"), int) and case.body["n"] > 1:
            case.body["n"] = 1


STATUSES: dict[int, int] = {}


def check(case: Any, headers: dict[str, str]) -> None:
    bounded(case)
    response = case.call(headers=headers, timeout=30)
    STATUSES[response.status_code] = STATUSES.get(response.status_code, 0) + 1
    where = f"{case.method} {case.formatted_path} body={str(case.body)[:300]}"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        content_type = response.headers.get("content-type") or [""]  # schemathesis: a list per header
        assert str(content_type[0]).startswith("application/json"), f"{where}: {content_type}"
        openai_error(response.content)


def fuzz(schema: Any, headers: dict[str, str]) -> int:
    """Every operation of `schema`, a few generated cases each (valid and not); the count."""
    STATUSES.clear()
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @EXAMPLES
        @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
               | operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        def one(case: Any) -> None:
            check(case, headers)

        one()
    print(f"{operations} operations, answers by status {dict(sorted(STATUSES.items()))}")
    assert any(200 <= s < 300 for s in STATUSES) and any(400 <= s < 500 for s in STATUSES), STATUSES
    return operations


def test_agent_api_never_fails_the_server(agent_api, stack):
    assert fuzz(agent_api, stack.auth) >= 6


def test_operations_api_never_fails_the_server(ops_api):
    assert fuzz(ops_api, {"authorization": f"Bearer {OPS}"}) >= 9


def test_router_api_never_fails_the_server(router_api, stack):
    assert fuzz(router_api, stack.auth) >= 5
