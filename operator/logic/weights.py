"""Capacity weights of a pool's endpoints: pure, no I/O.

A big and a small Mac in one pool should not get equal shares: the router's weighted
pickers split traffic by the weight the operator writes in the routing table. A
node's capacity for a model is the decode rate its engine measured (tokens/s, from the
agent's InferenceNode status). Until measured, a prior: decode is bound by memory
bandwidth (every token reads all the weights), so tok/s ~ bandwidth / model bytes,
with the bandwidth from a table of Apple chips. Weights are capacities relative to the
fastest endpoint of the model, on a coarse integer scale (1..WEIGHT_SCALE), so a rate
that drifts a few percent does not rewrite the table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

WEIGHT_SCALE = 10
"""The fastest endpoint of a model weighs this; the others in proportion, at least 1."""

GB = 10**9

# Apple's published unified-memory bandwidth, GB/s. Longest names first so that
# "M2 Ultra" is not read as "M2". Binned Max parts (M3 Max 30-core GPU: 300 GB/s,
# M4 Max 32-core: 410 GB/s) report the same chip name; the table takes the full part.
CHIP_BANDWIDTH_GBPS: dict[str, float] = {
    "M1 Ultra": 800, "M1 Max": 400, "M1 Pro": 200, "M1": 68.25,
    "M2 Ultra": 800, "M2 Max": 400, "M2 Pro": 200, "M2": 100,
    "M3 Ultra": 819, "M3 Max": 400, "M3 Pro": 150, "M3": 100,
    "M4 Max": 546, "M4 Pro": 273, "M4": 120,
}


def chip_bandwidth(chip: str) -> float | None:
    """Bytes/s of memory bandwidth for an Apple chip name ('Apple M2 Ultra'); None if unknown."""
    words = chip.replace("Apple", " ").split()
    for name in sorted(CHIP_BANDWIDTH_GBPS, key=len, reverse=True):
        parts = name.split()
        if any(words[i:i + len(parts)] == parts for i in range(len(words))):
            return CHIP_BANDWIDTH_GBPS[name] * GB
    return None


def capacity(*, measured_tokens_per_second: float | None, chip: str, model_bytes: int | None) -> float | None:
    """Tokens/s one node can decode for one model: measured if it was, else the prior
    bandwidth / model bytes; None when neither is known (unknown chip or model size)."""
    if measured_tokens_per_second is not None and measured_tokens_per_second > 0:
        return measured_tokens_per_second
    bandwidth = chip_bandwidth(chip)
    if bandwidth is None or not model_bytes or model_bytes <= 0:
        return None
    return bandwidth / model_bytes


def weights(capacities: Sequence[float | None]) -> list[int]:
    """Integer weights for one model's endpoints, in the same order.

    All unknown: all 1 (equal shares, as before weights existed). An endpoint without a
    capacity weighs as the mean of the known ones: no evidence it is slower or faster.
    """
    known = [c for c in capacities if c is not None and c > 0]
    if not known:
        return [1] * len(capacities)
    mean = sum(known) / len(known)
    filled = [c if c is not None and c > 0 else mean for c in capacities]
    top = max(filled)
    return [max(1, int(WEIGHT_SCALE * c / top + 0.5)) for c in filled]  # half up, not to even


def model_capacities(*, chip: str, measured: Mapping[str, float], model_bytes: Mapping[str, int],
                     models: Sequence[str]) -> tuple[tuple[str, float | None], ...]:
    """(model, capacity) of one node for each of `models`."""
    return tuple((m, capacity(measured_tokens_per_second=measured.get(m), chip=chip, model_bytes=model_bytes.get(m)))
                 for m in models)
