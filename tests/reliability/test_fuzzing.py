"""Property-based fuzzing (hypothesis) of the agent and the router with request bodies built
from the wire models' own fields, each given arbitrary JSON as well as plausible values:
no answer is a 5xx, and every 4xx is JSON in the OpenAI error shape. Real processes (the
session's agent and router); bounded in examples, each request bounded in tokens."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxpool.agent.serving.openai import ChatCompletionRequest, CompletionRequest
from mlxpool.dev.rawhttp import openai_error

pytestmark = pytest.mark.integration

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
SMALL_TOKENS = st.integers(min_value=-2, max_value=3) | st.floats(allow_nan=False) | st.text(max_size=5)
PLAUSIBLE = {
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 600), max_size=8) | st.lists(st.text(max_size=8)),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=20),
    "logit_bias": st.dictionaries(st.text(max_size=6), st.floats(allow_nan=False), max_size=4),
    "temperature": st.floats(allow_nan=False), "top_p": st.floats(allow_nan=False),
    "top_k": st.integers(), "seed": st.integers(), "priority": st.text(max_size=10),
    "deadline_ms": st.integers(), "stream": st.booleans(), "logprobs": st.integers(-1, 30) | st.booleans(),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                "content": st.text(max_size=20) | JSON}), max_size=3),
}


def bodies(model: type) -> st.SearchStrategy[dict]:
    optional = {name: (PLAUSIBLE.get(name, JSON) | JSON) for name in model.model_fields
                if name not in ("model", "max_tokens", "max_completion_tokens", "n")}
    return st.fixed_dictionaries(
        {"model": st.just("tiny") | st.text(max_size=10), "max_tokens": SMALL_TOKENS},
        optional=optional)


def check(reply: httpx.Response) -> None:
    assert reply.status_code < 500, reply.text[:500]
    if reply.status_code >= 400:
        assert reply.headers["content-type"].startswith("application/json"), reply.text[:200]
        openai_error(reply.content)


FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("target", ["agent", "router"])
@pytest.mark.parametrize(("path", "model"), [("/v1/completions", CompletionRequest),
                                             ("/v1/chat/completions", ChatCompletionRequest)])
def test_fuzzed_requests_never_fail_the_server(stack, target, path, model):
    url = (stack.agent.url if target == "agent" else stack.router.url) + path

    @FUZZ
    @given(body=bodies(model))
    def run(body: dict) -> None:
        with httpx.Client(timeout=30) as client:
            check(client.post(url, content=json.dumps(body), headers={**stack.auth,
                                                                       "content-type": "application/json"}))

    run()
