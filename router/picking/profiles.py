"""Strategy profiles: which plugins, with which weights, a table's `strategy` name means.

All plugin types are registered in `PLUGIN_TYPES`, the one list. A profile is data
(`ProfileConfig`), the built-in ones written as YAML below; `--strategies FILE` adds or
replaces profiles by name with the same schema. A table naming a strategy this router
does not know is served with the default profile (logged once), so an operator that
is newer than its routers does not stop traffic.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlxpool.router.picking.filters import CircuitBreakerFilter, ConnectCooldownFilter, MaxInFlightFilter
from mlxpool.router.picking.loadscorers import (
    PredictedTtftScorer,
    QueueDepthScorer,
    SlotUtilisationScorer,
    StickyPrefixScorer,
)
from mlxpool.router.picking.picker import MaxScorePicker, Pipeline, WeightedRandomPicker, WeightedScorer
from mlxpool.router.picking.plugins import Filter, Picker, Plugin, Scorer
from mlxpool.router.picking.prefixindex import PrefixIndex
from mlxpool.router.picking.scorers import (
    LeastInFlightScorer,
    LowLatencyScorer,
    PrefixAffinityScorer,
    SessionAffinityScorer,
    WeightedRoundRobinScorer,
)

log = logging.getLogger(__name__)

PLUGIN_TYPES: tuple[type[Plugin], ...] = (
    ConnectCooldownFilter,
    CircuitBreakerFilter,
    MaxInFlightFilter,
    WeightedRoundRobinScorer,
    LeastInFlightScorer,
    LowLatencyScorer,
    PrefixAffinityScorer,
    QueueDepthScorer,
    SlotUtilisationScorer,
    PredictedTtftScorer,
    StickyPrefixScorer,
    SessionAffinityScorer,
    MaxScorePicker,
    WeightedRandomPicker,
)
REGISTRY: dict[str, type[Plugin]] = {p.type_name: p for p in PLUGIN_TYPES}

BUILTIN_STRATEGIES_YAML = """
default: round-robin
profiles:
  round-robin:
    filters: [{type: circuit-breaker}]
    scorers: [{type: weighted-round-robin}]
  least-loaded:
    filters: [{type: circuit-breaker}]
    scorers:
      - {type: least-in-flight, weight: 1.0}
      - {type: weighted-round-robin, weight: 0.1}  # breaks ties, in proportion to weights
  latency-aware:
    filters: [{type: circuit-breaker}]
    scorers:
      - {type: low-latency, weight: 1.0}
      - {type: least-in-flight, weight: 0.5}
      - {type: weighted-round-robin, weight: 0.1}
  # Affinity against load: least-in-flight gives the least busy endpoint 1 and the busiest
  # 0, so an endpoint recently sent more than half of the prompt (2 x 0.5) wins even when
  # it is the busiest, while a shorter shared opening yields to load. Unmatched prompts
  # are placed by load, then by rotation, which spreads new prefixes over the endpoints.
  # A hard cap per endpoint is a max-in-flight filter in a strategies file: a hot prefix
  # then spills onto a second endpoint, which from then on matches it too.
  # A request naming its conversation (x-session-id) stays on that conversation's
  # endpoint (session-affinity outweighs the rest), the same on every router replica.
  prefix-affinity:
    filters: [{type: circuit-breaker}]
    scorers:
      - {type: prefix-affinity, weight: 2.0}
      - {type: least-in-flight, weight: 1.0}
      - {type: weighted-round-robin, weight: 0.1}
      - {type: session-affinity, weight: 4.0}
  # On the agents' own reports (GET /v1/signals), not this router's view: with several
  # router replicas each sees only its own requests, the agents see them all.
  load-aware:
    filters: [{type: circuit-breaker}]
    scorers:
      - {type: queue-depth, weight: 1.0}
      - {type: slot-utilisation, weight: 1.0}
      - {type: weighted-round-robin, weight: 0.1}
  predicted-latency:
    filters: [{type: circuit-breaker}]
    scorers:
      - {type: predicted-ttft, weight: 2.0}
      - {type: slot-utilisation, weight: 0.5}
      - {type: weighted-round-robin, weight: 0.1}
  # Stay on the warm endpoint until its queued prefill passes the threshold (then it
  # scores 0 on affinity and load decides); new prefixes are spread by load.
  sticky-prefix:
    filters: [{type: circuit-breaker}]
    scorers:
      - {type: sticky-prefix, weight: 3.0}
      - {type: queue-depth, weight: 1.0}
      - {type: slot-utilisation, weight: 0.5}
      - {type: weighted-round-robin, weight: 0.1}
      - {type: session-affinity, weight: 5.0}
"""


class FilterRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    params: dict[str, Any] = Field(default_factory=dict)


class ScorerRef(FilterRef):
    weight: float = Field(default=1.0, gt=0)


class ProfileConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filters: list[FilterRef] = Field(default_factory=list)
    scorers: list[ScorerRef] = Field(min_length=1)
    picker: FilterRef = Field(default_factory=lambda: FilterRef(type="max-score"))


class StrategiesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str = "round-robin"
    profiles: dict[str, ProfileConfig] = Field(default_factory=dict)


def load_strategies(path: Path | None = None) -> StrategiesConfig:
    """The built-in profiles, with those of the YAML file at `path` added or replacing them."""
    config = StrategiesConfig.model_validate(yaml.safe_load(BUILTIN_STRATEGIES_YAML))
    if path is None:
        return config
    try:
        override = StrategiesConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"{path}: invalid strategies file: {exc}") from exc
    fields = override.model_fields_set
    return StrategiesConfig(
        default=override.default if "default" in fields else config.default,
        profiles={**config.profiles, **override.profiles},
    )


def _instantiate(profile: str, ref: FilterRef, kind: str) -> Plugin:
    plugin_type = REGISTRY.get(ref.type)
    if plugin_type is None:
        known = ", ".join(sorted(REGISTRY))
        raise ValueError(f"strategy {profile!r}: unknown plugin type {ref.type!r} (known: {known})")
    try:
        params = plugin_type.Params.model_validate(ref.params)
    except ValidationError as exc:
        raise ValueError(f"strategy {profile!r}: plugin {ref.type!r}: invalid params: {exc}") from exc
    plugin = plugin_type(params)
    if not isinstance(plugin, _KINDS[kind]):
        raise ValueError(f"strategy {profile!r}: {ref.type!r} is not a {kind}")
    return plugin


_KINDS: dict[str, type[Plugin]] = {"filter": Filter, "scorer": Scorer, "picker": Picker}


def build_pipeline(name: str, profile: ProfileConfig) -> Pipeline:
    filters = tuple(cast(Filter, _instantiate(name, ref, "filter")) for ref in profile.filters)
    scorers = tuple(WeightedScorer(cast(Scorer, _instantiate(name, ref, "scorer")), ref.weight)
                    for ref in profile.scorers)
    picker = cast(Picker, _instantiate(name, profile.picker, "picker"))
    return Pipeline(name, filters, scorers, picker)


class Strategies:
    """One pipeline per profile, built once (stateful scorers keep their state across picks)."""

    def __init__(self, config: StrategiesConfig) -> None:
        if config.default not in config.profiles:
            have = ", ".join(sorted(config.profiles))
            raise ValueError(f"default strategy {config.default!r} is not a profile (have: {have})")
        self.default = config.default
        self.pipelines = {name: build_pipeline(name, p) for name, p in config.profiles.items()}
        self._warned: set[str] = set()

    def prefix_indexes(self) -> dict[str, PrefixIndex]:
        """Every scorer's prefix index, named `profile/position/type` (the same on replicas of one file)."""
        found: dict[str, PrefixIndex] = {}
        for name, pipeline in self.pipelines.items():
            for position, weighted in enumerate(pipeline.scorers):
                index = getattr(weighted.scorer, "index", None)
                if isinstance(index, PrefixIndex):
                    found[f"{name}/{position}/{weighted.scorer.type_name}"] = index
        return found

    def known(self, name: str) -> bool:
        return name in self.pipelines

    def for_name(self, name: str) -> Pipeline:
        pipeline = self.pipelines.get(name)
        if pipeline is not None:
            return pipeline
        if name not in self._warned:
            self._warned.add(name)
            log.warning("unknown routing strategy, using the default strategy=%s default=%s", name, self.default)
        return self.pipelines[self.default]
