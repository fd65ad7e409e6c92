"""The InferencePool spec as typed values: what the operator reads from a pool.

The API server has already validated and defaulted the object against the CRD
(crds/mlxpool.dev_inferencepools.yaml), so these models only give it types and
Python names; unknown keys are ignored, so an operator older than the CRD still runs.
The defaults here repeat the CRD's for objects built by hand (tests).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from mlxpool.priorities import Priority
from mlxpool.resources import LABEL_POOL

Strategy = Literal["round-robin", "least-loaded", "latency-aware", "prefix-affinity"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
SelectorOperator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class ModelRef(_Spec):
    name: str
    source: str | None = None


class SelectorRequirement(_Spec):
    key: str
    operator: SelectorOperator
    values: tuple[str, ...] = ()


class LabelSelector(_Spec):
    """metav1.LabelSelector: every matchLabels pair and every expression must hold."""

    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: tuple[SelectorRequirement, ...] = ()


class Routing(_Spec):
    strategy: Strategy = "round-robin"


class Tier(_Spec):
    priority: Priority
    deadline_seconds: float | None = None
    max_queue_depth: int | None = None


class Scheduling(_Spec):
    default_priority: Priority = Priority.NORMAL
    tiers: tuple[Tier, ...] = ()


class HealthCheck(_Spec):
    interval_seconds: int = Field(default=1, ge=1)


class PoolSpec(_Spec):
    models: tuple[ModelRef, ...] = Field(min_length=1)
    replicas: int = Field(default=1, ge=0)
    min_replicas: int | None = None
    max_replicas: int | None = None
    node_selector: LabelSelector | None = None
    routing: Routing = Routing()
    scheduling: Scheduling = Scheduling()
    health_check: HealthCheck = HealthCheck()

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    @classmethod
    def from_body(cls, body: Any) -> PoolSpec:
        """Parse `body["spec"]` of an InferencePool object (a dict or kopf's Body)."""
        return cls.model_validate(dict(body.get("spec") or {}))


def pool_selector(pool_name: str) -> str:
    """The label selector (string form) a pool reports for its scale subresource."""
    return f"{LABEL_POOL}={pool_name}"
