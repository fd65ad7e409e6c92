"""What a pool asks its nodes' agents to do: load and stage calls, as pure decisions.

Given the chosen nodes (with what their agents last reported) and where each model
comes from, `plan` lists the calls that move the nodes toward serving every pool
model: stage a pool-sourced copy the node lacks, else load the model (a LoRA adapter
only once its base is ready on the node: the agent loads it over the base's arrays). A model the
agent already holds in any phase, or that cannot be loaded there, gets no call, so
repeating the plan against an unchanged report asks for nothing twice, and a
restarted operator that reads the agents' reports first repeats no call either.
Executing the calls is `reconcilers.pools`' job; unloads are decided by the `claims`.

`policy_plan` does the same for the pool's `spec.scheduling`: every chosen node whose
agent does not report the pool's policy for a pool model gets it put (before the model
is even loaded: the agent keeps it by name), so a change of the spec reaches every
agent at the next pass and an unchanged one costs no call.

`prefetch_plan` announces the pool's models to its `next` node (placement: where one more
replica would go): a model that node does not hold, that it could load, and whose files
are on it already (a path, or a cache entry staged there) gets a `POST /v1/node/prefetch`,
so a scale-up or a failover loads it from the page cache instead of the disk. Adapters
are left out (a few MB; the agent prefetches model directories). The reconciler makes
each (pool, node, model) announcement once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mlxpool.agentapi import CachePhase, LoadModelRequest, ModelPhase, PrefetchRequest, SchedulingPolicy, StageRequest
from mlxpool.operator.logic.placement import READY_CACHE_PHASES, Candidate, loadable
from mlxpool.operator.logic.sources import LoadSource


@dataclass(frozen=True)
class LoadAction:
    node: str
    url: str
    model: str
    request: LoadModelRequest


@dataclass(frozen=True)
class StageAction:
    node: str
    url: str
    model: str
    key: str
    request: StageRequest


@dataclass(frozen=True)
class UnloadAction:
    node: str
    url: str
    model: str


@dataclass(frozen=True)
class PolicyAction:
    node: str
    url: str
    model: str
    policy: SchedulingPolicy


@dataclass(frozen=True)
class PrefetchAction:
    node: str
    url: str
    model: str
    request: PrefetchRequest


Action = LoadAction | StageAction


def plan(chosen: Sequence[Candidate], model_names: Sequence[str],
         sources: Mapping[str, LoadSource | None]) -> list[Action]:
    """The calls to make now; none to a node that fails its probe or has no report."""
    actions: list[Action] = []
    for c in chosen:
        if c.agent is None or not c.probe.healthy:
            continue
        for model in model_names:
            source = sources.get(model)
            held = c.agent.models.get(model)
            if (held is not None and held is not ModelPhase.FAILED) or source is None \
                    or loadable(c, model, source) is not None:
                continue
            if source.base is not None and c.agent.models.get(source.base) is not ModelPhase.READY:
                continue  # a LoRA adapter loads over its base: once the base is ready here
            if source.stage is not None and source.cache_key is not None:
                phase = c.agent.cache.get(source.cache_key)
                if phase is None:
                    actions.append(StageAction(c.name, c.view.endpoint, model, source.cache_key, source.stage))
                    continue
                if phase not in READY_CACHE_PHASES:
                    continue  # still downloading or verifying: load when it is there
            actions.append(LoadAction(c.name, c.view.endpoint, model, source.request(model)))
    return actions


def policy_plan(chosen: Sequence[Candidate], model_names: Sequence[str],
                policy: SchedulingPolicy | None) -> list[PolicyAction]:
    """The scheduling calls to make now: none for a pool without a policy, none to a node
    that fails its probe or has no report, none where the agent reports the policy already."""
    if policy is None:
        return []
    return [PolicyAction(c.name, c.view.endpoint, model, policy)
            for c in chosen if c.agent is not None and c.probe.healthy
            for model in model_names if c.agent.scheduling.get(model) != policy]


def progress(chosen: Sequence[Candidate], model_names: Sequence[str],
             sources: Mapping[str, LoadSource | None]) -> tuple[list[str], list[str]]:
    """(`model on node` being loaded or staged, `model on node: why` that failed) for the
    chosen nodes, for the pool's conditions."""
    loading, failed = [], []
    for c in chosen:
        for model in model_names:
            if model in c.served:
                continue
            if (why := c.failure(model)) is not None:
                failed.append(f"{model} on {c.name}: {why}")
            elif model in c.in_transit:
                loading.append(f"{model} on {c.name}")
            elif (c.agent is not None and (source := sources.get(model)) is not None and source.base is not None
                  and c.agent.models.get(source.base) is not ModelPhase.READY):
                loading.append(f"{model} on {c.name} (after its base {source.base})")
            elif c.agent is not None and (source := sources.get(model)) is not None and source.cache_key:
                phase = c.agent.cache.get(source.cache_key)
                if phase is CachePhase.FAILED:
                    failed.append(f"{model} on {c.name}: staging {source.cache_key} failed")
                elif source.stage is not None and phase not in READY_CACHE_PHASES:
                    loading.append(f"{model} on {c.name} (staging)")
    return loading, failed


def prefetch_plan(next_node: Candidate | None, model_names: Sequence[str],
                  sources: Mapping[str, LoadSource | None]) -> list[PrefetchAction]:
    """The prefetch calls announcing the pool's models to the node a replica would go to next."""
    c = next_node
    if c is None or c.agent is None or not c.probe.healthy:
        return []
    actions = []
    for model in model_names:
        source = sources.get(model)
        if source is None or source.base is not None or model in c.agent.models or loadable(c, model, source):
            continue
        if source.cache_key is not None:
            if c.agent.cache.get(source.cache_key) not in READY_CACHE_PHASES:
                continue  # not on the node yet: staging it is a download, not a prefetch
            request = PrefetchRequest(cache_key=source.cache_key)
        elif source.path is not None:
            request = PrefetchRequest(path=source.path)
        else:
            continue
        actions.append(PrefetchAction(c.name, c.view.endpoint, model, request))
    return actions
