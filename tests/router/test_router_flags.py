"""The router's command line: circuit-breaker and shedding flags reach the settings; bad ones are named."""

from __future__ import annotations

import pytest

from mlxpool.priorities import Priority
from mlxpool.router.app import shedding_policy
from mlxpool.router.main import build_parser, settings_from_args


def settings(*flags: str):
    parser = build_parser()
    return settings_from_args(parser, parser.parse_args(["--routes-file", "routes.json", *flags]))


def test_defaults_shed_background_then_low_and_trip_after_three_failures():
    s = settings()
    assert (s.upstream.breaker_failures, s.upstream.breaker_open_seconds) == (3, 5.0)
    assert shedding_policy(s.shedding).thresholds == {Priority.BACKGROUND: 1.0, Priority.LOW: 1.5}


def test_breaker_and_shedding_flags_reach_the_settings():
    s = settings("--breaker-failures", "5", "--breaker-open-seconds", "2.5", "--shed-background", "0.8",
                 "--shed-low", "1.2", "--shed-normal", "2", "--shed-high", "off", "--shed-mean-output-tokens", "64")
    assert (s.upstream.breaker_failures, s.upstream.breaker_open_seconds) == (5, 2.5)
    policy = shedding_policy(s.shedding)
    assert policy.thresholds == {Priority.BACKGROUND: 0.8, Priority.LOW: 1.2, Priority.NORMAL: 2.0}
    assert policy.mean_output_tokens == 64
    assert shedding_policy(settings("--shed-background", "off", "--shed-low", "off").shedding).thresholds == {}


@pytest.mark.parametrize(("flags", "message"), [
    (["--shed-low", "0.5"], "more urgent tier must not have a lower threshold"),
    (["--shed-background", "off"], "tier background has no threshold while a more urgent tier has one"),
    (["--shed-low", "lots"], "expected a slot usage"),
    (["--shed-normal", "0"], "must be in (0, 1000]"),
    (["--breaker-failures", "0"], "breaker_failures must be at least 1"),
])
def test_bad_flags_are_refused_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit):
        settings(*flags)
    assert message in capsys.readouterr().err
