"""Pool selectors of operator shards (`logic.shards`): the API server's label-selector
grammar, checked at start with a message naming the bad part, and matched like the
API server matches."""

from __future__ import annotations

import pytest

from mlxpool.operator.logic.shards import SELECTOR_LIMIT, parse_selector


@pytest.mark.parametrize(("selector", "labels", "selected"), [
    ("shard=a", {"shard": "a"}, True),
    ("shard==a", {"shard": "b"}, False),
    ("shard!=a", {}, True),  # a missing key is "not a", as for the API server
    ("shard!=a", {"shard": "a"}, False),
    ("mlxpool.dev/shard in (a, b)", {"mlxpool.dev/shard": "b"}, True),
    ("mlxpool.dev/shard notin (a,b)", {"mlxpool.dev/shard": "c"}, True),
    ("tier", {"tier": ""}, True),
    ("!tier", {"tier": "x"}, False),
    ("shard=a,tier in (gold),!canary", {"shard": "a", "tier": "gold"}, True),
    ("shard=a,tier in (gold),!canary", {"shard": "a", "tier": "gold", "canary": "1"}, False),
    ("shard=", {"shard": ""}, True),
])
def test_selectors_match_as_the_api_server_does(selector, labels, selected):
    assert parse_selector(selector).matches(labels) is selected


@pytest.mark.parametrize(("selector", "message"), [
    ("", "empty"),
    ("a,,b", "an empty requirement"),
    ("a=b=c", "'a=b=c': 'b=c' is not a label value"),
    ("-a=b", "'-a' is not a label key"),
    ("a in ()", "at least one value"),
    ("a in (x,,y)", "none empty"),
    ("x" * (SELECTOR_LIMIT + 1), f"at most {SELECTOR_LIMIT}"),
])
def test_a_bad_selector_names_what_is_wrong(selector, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_selector(selector)
