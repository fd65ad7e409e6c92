"""The specs of InferencePool and ModelCache as typed values: what the operator reads.

The API server has already validated and defaulted the objects against the CRDs
(crds/), so these models only give them types and Python names; unknown keys are
ignored, so an operator older than the CRD still runs. The defaults here repeat the
CRDs' for objects built by hand (tests).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from mlxpool.agentapi import SchedulingPolicy, StageRequest, TierPolicy
from mlxpool.priorities import Priority
from mlxpool.resources import LABEL_POOL

Strategy = Literal["round-robin", "least-loaded", "latency-aware", "prefix-affinity", "load-aware",
                   "predicted-latency", "sticky-prefix"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
SelectorOperator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
DIGEST_PREFIX = "sha256:"


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class ModelRef(_Spec):
    name: str
    source: str | None = None
    """Where agents get the weights when no ModelCache of the namespace provides the model."""
    base: str | None = None
    """Set for a LoRA adapter: the pool model (not itself an adapter) it is loaded over, on
    the same node (the CRD's CEL rule checks it names one)."""


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
    selectable_strategies: tuple[Strategy, ...] = ()
    """Strategies a request may choose instead with the `x-mlxpool-strategy` header."""


class Tier(_Spec):
    priority: Priority
    deadline_seconds: float | None = None
    max_queue_depth: int | None = None
    ttft_target_ms: float | None = None
    preempt: bool | None = None
    sheddable: bool | None = None


class Scheduling(_Spec):
    default_priority: Priority = Priority.NORMAL
    tiers: tuple[Tier, ...] = ()

    def policy(self) -> SchedulingPolicy:
        """What the agents of the pool get for each of its models (`PUT /v1/node/scheduling/{model}`)."""
        return SchedulingPolicy(default_priority=self.default_priority, tiers=[
            TierPolicy(priority=t.priority, ttft_target_ms=t.ttft_target_ms, deadline_seconds=t.deadline_seconds,
                       max_queue_depth=t.max_queue_depth, preempt=t.preempt, sheddable=t.sheddable)
            for t in self.tiers])


class HealthCheck(_Spec):
    interval_seconds: int = Field(default=1, ge=1)


class PoolSpec(_Spec):
    models: tuple[ModelRef, ...] = Field(min_length=1)
    replicas: int = Field(default=1, ge=0)
    min_replicas: int | None = None
    max_replicas: int | None = None
    node_selector: LabelSelector | None = None
    routing: Routing = Routing()
    scheduling: Scheduling | None = None
    """None (the pool sets none): the agents' own `priority_scheduling` applies."""
    health_check: HealthCheck = HealthCheck()

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    @classmethod
    def from_body(cls, body: Any) -> PoolSpec:
        """Parse `body["spec"]` of an InferencePool object (a dict or kopf's Body)."""
        return cls.model_validate(dict(body.get("spec") or {}))


class CacheSpec(_Spec):
    model: str | None = None
    """The name agents serve the model under; None means the ModelCache's own name."""
    source: str
    revision: str | None = None
    digests: dict[str, str] = Field(default_factory=dict)
    """sha256 per file, `sha256:<hex>` or bare hex (the CRD checks the form)."""
    node_selector: LabelSelector | None = None
    warm: bool = False
    pin: bool = False

    @classmethod
    def from_body(cls, body: Any) -> CacheSpec:
        return cls.model_validate(dict(body.get("spec") or {}))

    def model_name(self, object_name: str) -> str:
        return self.model or object_name

    def stage_request(self) -> StageRequest:
        """What `PUT /v1/node/cache/{key}` gets: the agent API takes bare sha256 hex."""
        return StageRequest(
            source=self.source, revision=self.revision, warm=self.warm, pin=self.pin,
            digests={path: d.removeprefix(DIGEST_PREFIX) for path, d in sorted(self.digests.items())},
        )

    def content_id(self) -> str:
        """Identifies the bytes: source, revision and digests (not warm/pin, which an agent
        applies to the copy it has). A change gives the cache a new key on the agents."""
        text = "\n".join([self.source, self.revision or "",
                          *(f"{p}={d.removeprefix(DIGEST_PREFIX)}" for p, d in sorted(self.digests.items()))])
        return hashlib.sha256(text.encode()).hexdigest()


def pool_selector(pool_name: str) -> str:
    """The label selector (string form) a pool reports for its scale subresource."""
    return f"{LABEL_POOL}={pool_name}"
