"""The agent's load signals (`GET /v1/signals`): each engine's counters as `AgentSignals`.

Read at request time from every served engine's `EngineStats` (written by the engine
thread, read here without a lock: a value may be one step old, which a router polling
every 100 ms cannot tell apart). Rates are lifetime ratios of those counters, so an
idle node still says what it can do.
"""

from __future__ import annotations

import math

from mlxpool.agent.engine.interface import EngineStats
from mlxpool.agent.serving.lifecycle import Lifecycle, Phase
from mlxpool.agent.serving.repository import ModelRepository
from mlxpool.loadsignals import AgentSignals, ModelSignals
from mlxpool.priorities import Priority


def model_signals(stats: EngineStats) -> ModelSignals:
    computed = stats.prompt_tokens_total - stats.prompt_tokens_cached_total
    prefill_rate = computed / stats.prefill_seconds_total if stats.prefill_seconds_total > 0 else 0.0
    steps, seconds = stats.decode_only_steps_total, stats.decode_seconds_total
    return ModelSignals(
        waiting={Priority(tier): n for tier, n in stats.waiting_by_priority.items() if n > 0},
        running=stats.running,
        slots=stats.max_running,
        queued_prompt_tokens=max(stats.queued_prompt_tokens, 0),
        kv_bytes=stats.kv_cache_bytes,
        prefix_cache_bytes=stats.prompt_cache_bytes,
        prefix_cache_max_bytes=stats.prompt_cache_max_bytes,
        prefill_tokens_per_second=max(prefill_rate, 0.0),
        decode_step_seconds=seconds / steps if steps else 0.0,
        decode_tokens_per_second=stats.decode_only_tokens_total / seconds if seconds > 0 else 0.0,
    )


def agent_signals(models: ModelRepository, lifecycle: Lifecycle) -> AgentSignals:
    return AgentSignals(
        draining=lifecycle.phase in (Phase.DRAINING, Phase.STOPPED),
        models={m.name: model_signals(m.engine.stats) for m in models.all()},
    )


def status_decode_rate(stats: EngineStats) -> float | None:
    """The decode tok/s to write into the InferenceNode status (`models[].decodeTokensPerSecond`),
    from which the operator derives the endpoint's capacity weight; None until measured.

    Two significant figures: the weights are 1..10, and a lifetime ratio that moves in its
    third digit must not make every heartbeat a status write.
    """
    rate = model_signals(stats).decode_tokens_per_second
    if rate <= 0 or not math.isfinite(rate):
        return None
    digits = 1 - math.floor(math.log10(rate))
    return float(round(rate, digits))
