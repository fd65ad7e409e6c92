"""A pool's scheduling policy over the node's `priority_scheduling` (pure)."""

from __future__ import annotations

import pytest

from mlxpool.agent.config import PriorityScheduling, TierConfig
from mlxpool.agent.serving.policies import MAX_POLICIES, SchedulingPolicies, TooManyPolicies, merge
from mlxpool.agentapi import SchedulingPolicy, TierPolicy
from mlxpool.priorities import Priority

NODE = PriorityScheduling(default_priority=Priority.LOW, tiers={
    Priority.HIGH: TierConfig(ttft_target_ms=900, max_waiting=7, deadline_seconds=5)})


def test_the_pool_overrides_only_what_it_names():
    policy = SchedulingPolicy(default_priority=Priority.HIGH, tiers=[
        TierPolicy(priority=Priority.HIGH, max_queue_depth=3, preempt=True)])
    merged = merge(NODE, policy)
    assert merged.default_priority is Priority.HIGH
    high = merged.tier(Priority.HIGH)
    assert (high.ttft_target_ms, high.max_waiting, high.deadline_seconds, high.preempt) == (900, 3, 5, True)
    assert merged.tier(Priority.CRITICAL) == NODE.tier(Priority.CRITICAL)  # the default's
    assert merged.aging_seconds == NODE.aging_seconds


def test_policies_by_model_and_back_to_the_node_defaults():
    policies = SchedulingPolicies(NODE)
    assert policies.effective("m") is NODE
    policy = SchedulingPolicy(tiers=[TierPolicy(priority=Priority.LOW, ttft_target_ms=50)])
    assert policies.put("m", policy) == policy
    assert policies.effective("m").tier(Priority.LOW).ttft_target_ms == 50
    assert policies.effective("m").default_priority is Priority.NORMAL  # the pool's default tier
    assert policies.effective("other") is NODE
    assert policies.applied() == {"m": policy}
    assert policies.delete("m") and not policies.delete("m")
    assert policies.effective("m") is NODE


def test_the_number_of_policies_is_bounded():
    policies = SchedulingPolicies()
    for i in range(MAX_POLICIES):
        policies.put(f"m{i}", SchedulingPolicy())
    policies.put("m0", SchedulingPolicy(default_priority=Priority.HIGH))  # replacing one is fine
    with pytest.raises(TooManyPolicies, match=str(MAX_POLICIES)):
        policies.put("one-more", SchedulingPolicy())


@pytest.mark.asyncio
async def test_the_data_plane_runs_each_request_under_its_models_policy(fake_agent):
    from mlxpool.agent.serving import openai as api

    fake_agent.plane.policies.put("fake", SchedulingPolicy(default_priority=Priority.BACKGROUND, tiers=[
        TierPolicy(priority=Priority.BACKGROUND, ttft_target_ms=1234, max_queue_depth=2, sheddable=False),
        TierPolicy(priority=Priority.CRITICAL, deadline_seconds=3)]))
    await fake_agent.plane.complete(api.CompletionRequest(model="fake", prompt="hi"))
    await fake_agent.plane.complete(api.CompletionRequest(model="fake", prompt="hi", priority="critical"))
    background, critical = fake_agent.engine.requests
    assert background.priority is Priority.BACKGROUND and background.terms is not None
    assert (background.terms.ttft_target_s, background.terms.max_waiting, background.terms.sheddable) == \
        (1.234, 2, False)
    assert critical.terms is not None and critical.terms.preempt  # the node default for critical
    assert critical.deadline is not None and critical.arrival is not None
    assert critical.deadline - critical.arrival == pytest.approx(3)
