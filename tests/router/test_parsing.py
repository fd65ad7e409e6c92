"""What the router reads from requests, and which headers it passes on (pure)."""

from __future__ import annotations

import json

import pytest

from mlxpool.priorities import Priority
from mlxpool.router.errors import BadRequest
from mlxpool.router.parsing import downstream_headers, parse_inference_request, upstream_headers


@pytest.mark.parametrize(("body", "headers", "model", "stream", "priority", "prompt"), [
    ({"model": "m", "prompt": "hello"}, {}, "m", False, None, "hello"),
    ({"model": "m", "prompt": ["a", "b"], "stream": True}, {}, "m", True, None, "a\nb"),
    ({"model": "m", "prompt": [1, 2, 3]}, {}, "m", False, None, ""),
    ({"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     {}, "m", False, None, "be brief\nhi"),
    ({"model": "m", "priority": "low"}, {"x-priority": "high"}, "m", False, Priority.LOW, ""),
    ({"model": "m"}, {"x-priority": "critical"}, "m", False, Priority.CRITICAL, ""),
])
def test_parse_reads_model_stream_priority_prompt(body, headers, model, stream, priority, prompt):
    raw = json.dumps(body).encode()
    request = parse_inference_request(raw, headers)
    assert (request.model, request.stream, request.priority, request.prompt) == (model, stream, priority, prompt)
    assert request.body is raw  # forwarded byte for byte


@pytest.mark.parametrize(("raw", "param", "needle"), [
    (b"", None, "empty"),
    (b"\xff\xfe", None, "not valid JSON"),
    (b'"text"', None, "got str"),
    (b'{"model": 3}', "model", "non-empty string"),
    (b'{"model": ""}', "model", "non-empty string"),
    (b'{"model": "m", "stream": 1}', "stream", "boolean"),
    (b'{"model": "m", "priority": "top"}', "priority", "critical, high, normal, low, background"),
])
def test_parse_rejects_bad_requests_naming_the_problem(raw, param, needle):
    with pytest.raises(BadRequest) as info:
        parse_inference_request(raw, {})
    assert info.value.param == param and needle in info.value.message


def test_upstream_headers_keep_end_to_end_headers_only():
    headers = upstream_headers([
        ("host", "router"), ("content-length", "10"), ("connection", "keep-alive"), ("accept-encoding", "gzip"),
        ("authorization", "Bearer t"), ("x-priority", "low"), ("content-type", "application/json"),
        ("x-request-id", "from-client"), ("traceparent", "00-abc-def-01"),
    ], request_id="rid")
    assert headers == [
        ("authorization", "Bearer t"), ("x-priority", "low"), ("content-type", "application/json"),
        ("traceparent", "00-abc-def-01"), ("accept-encoding", "identity"), ("x-request-id", "rid"),
    ]


def test_downstream_headers_drop_hop_by_hop_and_server_ones():
    assert downstream_headers([
        ("content-type", "text/event-stream"), ("transfer-encoding", "chunked"), ("content-length", "5"),
        ("server", "uvicorn"), ("date", "today"), ("set-cookie", "a=1"), ("set-cookie", "b=2"),
    ]) == [("content-type", "text/event-stream"), ("set-cookie", "a=1"), ("set-cookie", "b=2")]
