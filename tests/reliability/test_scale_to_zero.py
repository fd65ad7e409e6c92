"""A pool scaled to zero and back, seen through a real router: while no endpoint is listed
every request is a 503 in the OpenAI shape with Retry-After (never a hang, never a
plain-text error), and traffic flows again within seconds of the table listing one.
Before the fix the router's 503s carried no Retry-After."""

from __future__ import annotations

import time

import httpx
import pytest

from mlxpool.dev.rawhttp import openai_error

pytestmark = pytest.mark.integration


def _completion(stack, client: httpx.Client) -> httpx.Response:
    return client.post(stack.router.url + "/v1/completions", headers=stack.auth,
                       json={"model": stack.model, "prompt": "hi", "max_tokens": 2})


def test_scale_to_zero_and_back(stack):
    with httpx.Client(timeout=10) as client:
        try:
            stack.set_routes([])
            start = time.monotonic()
            while (reply := _completion(stack, client)).status_code == 200:
                assert time.monotonic() - start < 5, "the router kept routing to a pool scaled to zero"
                time.sleep(0.05)
            took = time.monotonic() - start
            assert reply.status_code == 503
            assert reply.headers["retry-after"] == "1"
            assert openai_error(reply.content)["code"] == "no_healthy_endpoint"
            asked = time.monotonic()
            assert _completion(stack, client).status_code == 503
            assert time.monotonic() - asked < 1.0, "a 503 must come at once"
        finally:
            stack.set_routes([stack.agent.url])
        start = time.monotonic()
        while (reply := _completion(stack, client)).status_code != 200:
            assert time.monotonic() - start < 5, f"not recovered: {reply.status_code} {reply.text}"
            time.sleep(0.05)
        print(f"scale to zero: 503 after {took:.2f}s; back: served after {time.monotonic() - start:.2f}s")
