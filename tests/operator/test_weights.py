"""Capacity weights as pure functions: the chip table, the prior, measured rates, scaling."""

from __future__ import annotations

import pytest

from mlxpool.operator.logic.weights import GB, WEIGHT_SCALE, capacity, chip_bandwidth, weights


@pytest.mark.parametrize(("chip", "gbps"), [
    ("Apple M2 Ultra", 800), ("Apple M2", 100), ("Apple M1", 68.25), ("Apple M3 Pro", 150),
    ("Apple M4 Max", 546), ("M4 Pro", 273), ("Apple M3 Ultra", 819),
    ("Intel(R) Xeon(R) CPU @ 2.20GHz", None), ("test", None), ("", None), ("Apple M20", None),
])
def test_chip_bandwidth(chip: str, gbps: float | None) -> None:
    assert chip_bandwidth(chip) == (None if gbps is None else gbps * GB)


@pytest.mark.parametrize(("measured", "chip", "model_bytes", "expected"), [
    (50.0, "Apple M2", 10**9, 50.0),            # measured wins over the prior
    (None, "Apple M2", 10**9, 100.0),           # prior: 100 GB/s / 1 GB
    (0.0, "Apple M2 Ultra", 4 * 10**9, 200.0),  # 0 means not measured yet
    (None, "Apple M2", None, None),             # no model size: no prior
    (None, "test", 10**9, None),                # unknown chip: no prior
    (None, "Apple M2", 0, None),
])
def test_capacity(measured: float | None, chip: str, model_bytes: int | None, expected: float | None) -> None:
    assert capacity(measured_tokens_per_second=measured, chip=chip, model_bytes=model_bytes) == expected


@pytest.mark.parametrize(("capacities", "expected"), [
    ([], []),
    ([None, None], [1, 1]),                      # nothing known: equal shares, as before
    ([100.0, 100.0], [WEIGHT_SCALE, WEIGHT_SCALE]),
    ([800.0, 100.0], [10, 1]),
    ([100.0, 800.0, 400.0], [1, 10, 5]),
    ([1000.0, 1.0], [10, 1]),                    # never 0: 0 would drain the endpoint
    ([100.0, None, 50.0], [10, 8, 5]),           # unknown weighs as the mean of the known (75)
    ([102.0, 100.0], [10, 10]),                  # a few percent of drift changes nothing
])
def test_weights(capacities: list[float | None], expected: list[int]) -> None:
    assert weights(capacities) == expected
