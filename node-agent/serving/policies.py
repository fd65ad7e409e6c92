"""The scheduling policy each served model runs under: the node's defaults, or its pool's.

The node's `priority_scheduling` (config/runtime.yaml) is the base. An InferencePool's
`spec.scheduling`, which the operator puts for each of the pool's models
(`PUT /v1/node/scheduling/{model}`), overrides the default tier and, tier by tier, the
keys it names; the rest stays the node's. A policy may arrive before its model is
loaded: it is kept by name and applies from the first request on. The data plane
reads `effective(model)` per request, so a change applies to the next request without
touching the engines; `applied()` is what `GET /v1/node` reports back.
"""

from __future__ import annotations

from mlxpool.agent.config import PriorityScheduling, TierConfig
from mlxpool.agent.engine.scheduling import lane_wait_bound
from mlxpool.agentapi import SchedulingPolicy, TierPolicy
from mlxpool.priorities import Priority

MAX_POLICIES = 1024
"""Models with a pool policy on one node, at most (a bound on what callers can make us keep)."""


class TooManyPolicies(ValueError):
    pass


class SchedulingPolicies:
    def __init__(self, base: PriorityScheduling | None = None) -> None:
        self.base = base or PriorityScheduling()
        self._policies: dict[str, SchedulingPolicy] = {}
        self._effective: dict[str, PriorityScheduling] = {}

    def put(self, model: str, policy: SchedulingPolicy) -> SchedulingPolicy:
        """Apply `policy` to `model` (replacing its previous one); the policy as applied."""
        if model not in self._policies and len(self._policies) >= MAX_POLICIES:
            raise TooManyPolicies(f"at most {MAX_POLICIES} models may carry a scheduling policy")
        self._policies[model] = policy
        self._effective[model] = merge(self.base, policy)
        return policy

    def delete(self, model: str) -> bool:
        """Back to the node's defaults; False if `model` had no policy."""
        self._effective.pop(model, None)
        return self._policies.pop(model, None) is not None

    def get(self, model: str) -> SchedulingPolicy | None:
        return self._policies.get(model)

    def applied(self) -> dict[str, SchedulingPolicy]:
        return dict(self._policies)

    def effective(self, model: str) -> PriorityScheduling:
        return self._effective.get(model, self.base)


def wait_bound(scheduling: PriorityScheduling, priority: Priority) -> tuple[float, Priority] | None:
    """The tier's wait bound under this policy (`scheduling.lane_wait_bound`): past it, a
    request of `priority` would age into the lane of the most urgent tier that preempts."""
    preempting = [p for p in Priority if p.rank < priority.rank and scheduling.tier(p).preempt]
    return lane_wait_bound(priority, scheduling.aging_seconds, preempting,
                           has_target=scheduling.tier(priority).ttft_target_ms is not None)


def merge(base: PriorityScheduling, policy: SchedulingPolicy) -> PriorityScheduling:
    """`base` with the pool's default tier and, per tier, the keys the pool set."""
    tiers = {p: _complete(base.tier(p)) for p in Priority}
    for tier in policy.tiers:
        tiers[tier.priority] = _merge_tier(tiers[tier.priority], tier)
    return base.model_copy(update={"default_priority": policy.default_priority, "tiers": tiers})


def _merge_tier(base: TierConfig, tier: TierPolicy) -> TierConfig:
    update: dict[str, object] = {}
    if tier.ttft_target_ms is not None:
        update["ttft_target_ms"] = tier.ttft_target_ms
    if tier.deadline_seconds is not None:
        update["deadline_seconds"] = tier.deadline_seconds
    if tier.max_queue_depth is not None:
        update["max_waiting"] = tier.max_queue_depth
    if tier.preempt is not None:
        update["preempt"] = tier.preempt
    if tier.sheddable is not None:
        update["sheddable"] = tier.sheddable
    return TierConfig.model_validate({**base.model_dump(), **update})


def _complete(tier: TierConfig) -> TierConfig:
    """The same terms with every key set (so no later merge falls back to a default)."""
    return TierConfig.model_validate(tier.model_dump())
