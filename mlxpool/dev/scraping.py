"""Read a component's Prometheus `/metrics` over HTTP: for tests and benchmarks.

Figures are summed over every label set, which is what a check "did the agent count
this" wants; parsing is prometheus-client's own.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric_total(url: str, *names: str, timeout: float = 10.0) -> float:
    """The sum of every sample named one of `names` (sample names: counters end in `_total`)
    in `<url>/metrics`; 0 when there is none."""
    text = httpx.get(f"{url}/metrics", timeout=timeout, trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in names)
