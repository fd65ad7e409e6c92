"""The decode rate an agent writes into its InferenceNode status: measured, two significant figures."""

from __future__ import annotations

import pytest

from mlxpool.agent.engine.interface import EngineStats
from mlxpool.agent.serving.signals import status_decode_rate


@pytest.mark.parametrize(("tokens", "seconds", "expected"), [
    (0, 0.0, None),          # not measured yet: unset, the operator falls back to the chip prior
    (1863, 10.0, 190.0),     # 186.3 tok/s
    (315, 10.0, 32.0),
    (12345, 1.0, 12000.0),
    (7, 10.0, 0.7),
])
def test_status_decode_rate(tokens: int, seconds: float, expected: float | None) -> None:
    stats = EngineStats()
    stats.decode_only_tokens_total, stats.decode_seconds_total, stats.decode_only_steps_total = tokens, seconds, 10
    assert status_decode_rate(stats) == expected


def test_small_moves_of_the_lifetime_rate_do_not_change_the_status() -> None:
    rates = set()
    for tokens in range(18600, 18800, 7):  # 186.0 .. 188.0 tok/s
        stats = EngineStats()
        stats.decode_only_tokens_total, stats.decode_seconds_total, stats.decode_only_steps_total = tokens, 100.0, 1
        rates.add(status_decode_rate(stats))
    assert rates == {190.0}
