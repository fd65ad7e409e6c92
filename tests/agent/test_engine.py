"""The batching engine in-process, on the real tiny model (MLX CPU backend).

Greedy decoding (temperature 0) makes outputs repeatable, so stop strings, samplers,
log-probabilities and the prefix cache can be checked against reference runs. The
scheduling tests use one batch slot, so the queue's order decides who runs next.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path

import pytest

from mlxpool.agent.engine.admission import Outlook
from mlxpool.agent.engine.generation import BatchEngine, EngineConfig
from mlxpool.agent.engine.interface import EngineError, GenerationRequest, SamplingParams, TierTerms, TokenEvent
from mlxpool.agent.engine.prefixcache import MIN_REUSE_TOKENS
from mlxpool.agent.engine.prompts import PromptEncoder
from mlxpool.agent.errors import DeadlineExceeded, DeadlineUnreachable, QueueFull, TargetUnreachable, WaitBound
from mlxpool.priorities import Priority

PROMPT = "Once upon a time"
LONG_PROMPT = ("Kubernetes reconciles the desired state of a fleet of small computers that serve models "
               "quickly and reliably, while routers follow the routing tables the operator writes.")


@pytest.fixture
async def make_engine(tiny_model: Path):
    """Start engines with a given EngineConfig; all stopped after the test."""
    started: list[BatchEngine] = []

    async def make(**config) -> BatchEngine:
        engine = BatchEngine(str(tiny_model), EngineConfig(**config))
        await engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        await engine.stop()


@pytest.fixture
async def engine(tiny_model: Path) -> AsyncIterator[BatchEngine]:
    engine = BatchEngine(str(tiny_model), EngineConfig(max_running=4))
    info = await engine.start()
    assert info.context_length == 2048 and info.memory_bytes > 0
    yield engine
    await engine.stop()


async def prompt_tokens(engine: BatchEngine, text: str = PROMPT) -> tuple[int, ...]:
    encoder = PromptEncoder(engine.tokenizer)
    try:
        return tuple(await encoder.encode_text(text))
    finally:
        encoder.close()


async def run(engine: BatchEngine, request_id: str, tokens: tuple[int, ...], **sampling) -> tuple[str, TokenEvent]:
    sampling.setdefault("temperature", 0.0)
    text, last = "", None
    async for event in engine.submit(GenerationRequest(request_id, tokens, SamplingParams(**sampling))):
        text += event.text
        last = event
    assert last is not None
    return text, last


async def test_max_tokens_ends_with_length(engine):
    tokens = await prompt_tokens(engine)
    text, last = await run(engine, "a", tokens, max_tokens=12)
    assert (last.finish_reason, last.completion_tokens) == ("length", 12)
    assert text
    assert engine.stats.generation_tokens_total == 12
    assert engine.stats.prompt_tokens_total == len(tokens)
    assert engine.stats.requests_finished_total == {"length": 1}


async def test_stop_string_spanning_tokens_ends_early_without_the_stop_text(engine):
    tokens = await prompt_tokens(engine)
    reference, _ = await run(engine, "ref", tokens, max_tokens=24)
    stop = reference[3:6]
    expected = reference[: reference.find(stop)]
    text, last = await run(engine, "stopped", tokens, max_tokens=24, stop=(stop,))
    assert (text, last.finish_reason) == (expected, "stop")
    assert last.completion_tokens < 24
    assert engine.stats.running == 0


async def test_concurrent_requests_share_decode_steps(engine):
    tokens = await prompt_tokens(engine)
    results = await asyncio.gather(*(run(engine, f"r{i}", tokens, max_tokens=20) for i in range(4)))
    assert [last.completion_tokens for _, last in results] == [20] * 4
    stats = engine.stats
    assert stats.generation_tokens_total == 80
    assert stats.decode_steps_total < 80  # sequences were decoded in the same steps
    assert stats.running == stats.waiting == 0


async def test_requests_beyond_max_running_wait_then_complete(engine):  # max_running=4
    tokens = await prompt_tokens(engine)
    results = await asyncio.gather(*(run(engine, f"r{i}", tokens, max_tokens=10) for i in range(7)))
    assert all(last.finish_reason == "length" for _, last in results)
    stats = engine.stats
    assert stats.generation_tokens_total == 70
    assert stats.generation_tokens_total / stats.decode_steps_total <= 4  # never more than 4 per step


async def test_closing_the_stream_removes_the_request_from_the_batch(engine):
    tokens = await prompt_tokens(engine)
    stream = engine.submit(GenerationRequest("long", tokens, SamplingParams(max_tokens=1500, temperature=0.0)))
    async with aclosing(stream):
        async for event in stream:
            if event.completion_tokens == 3:
                break
    for _ in range(200):
        if engine.stats.requests_finished_total.get("cancelled"):
            break
        await asyncio.sleep(0.01)
    assert engine.stats.requests_finished_total == {"cancelled": 1}
    assert engine.stats.running == 0
    generated = engine.stats.generation_tokens_total
    assert generated < 1500
    # The slot is free: the next request runs alone and the counter stays put afterwards.
    await run(engine, "next", tokens, max_tokens=2)
    await asyncio.sleep(0.05)
    assert engine.stats.generation_tokens_total == generated + 2


async def test_submitting_to_a_stopped_engine_fails(engine):
    tokens = await prompt_tokens(engine)
    await engine.stop()
    assert not engine.healthy
    with pytest.raises(EngineError, match="not running"):
        await run(engine, "late", tokens, max_tokens=2)


async def test_a_missing_model_fails_start(tmp_path: Path):
    engine = BatchEngine(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a directory"):
        await engine.start()
    assert not engine.healthy


async def collect(engine: BatchEngine, request: GenerationRequest) -> list[TokenEvent]:
    return [event async for event in engine.submit(request)]


async def wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def request(request_id: str, tokens: tuple[int, ...], priority: Priority = Priority.NORMAL,
            deadline: float | None = None, **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("max_tokens", 4)
    return GenerationRequest(request_id, tokens, SamplingParams(**sampling), priority, deadline)


async def hold_the_only_slot(engine: BatchEngine, tokens: tuple[int, ...]):
    """A long request occupying the engine's one slot; close the returned stream to free it."""
    blocker = engine.submit(request("blocker", tokens, max_tokens=1900))
    await anext(blocker)
    return blocker


async def test_waiting_requests_run_by_priority_then_arrival(make_engine):
    engine = await make_engine(max_running=1, prefill_batch_size=1)
    tokens = await prompt_tokens(engine)
    blocker = await hold_the_only_slot(engine, tokens)
    order: list[str] = []

    async def one(name: str, priority: Priority) -> None:
        await collect(engine, request(name, tokens, priority))
        order.append(name)

    tasks = [asyncio.create_task(one(name, priority)) for name, priority in [
        ("low", Priority.LOW), ("normal-1", Priority.NORMAL), ("critical", Priority.CRITICAL),
        ("normal-2", Priority.NORMAL), ("background", Priority.BACKGROUND)]]
    await wait_for(lambda: engine.stats.waiting == 5)
    assert engine.stats.waiting_by_priority == {"critical": 1, "high": 0, "normal": 2, "low": 1, "background": 1}
    await blocker.aclose()  # the slot frees: the queue decides
    await asyncio.gather(*tasks)
    assert order == ["critical", "normal-1", "normal-2", "low", "background"]


async def test_a_deadline_that_cannot_be_met_is_refused_at_once_and_one_that_passes_fails(make_engine, monkeypatch):
    engine = await make_engine(max_running=1, prefill_batch_size=1)
    tokens = await prompt_tokens(engine)
    blocker = await hold_the_only_slot(engine, tokens)
    # Doomed on arrival: the slot is predicted to free long after the deadline (429, no wait).
    started = time.monotonic()
    with pytest.raises(DeadlineUnreachable, match="cannot be met") as refused:
        await collect(engine, request("doomed", tokens, deadline=time.monotonic() + 0.2))
    assert time.monotonic() - started < 0.2 and refused.value.retry_after_s >= 1
    # The engine still enforces a deadline the outlook did not foresee (here: an outlook kept stale).
    monkeypatch.setattr(engine, "_outlook", Outlook())
    monkeypatch.setattr(engine, "_publish_outlook", lambda: None)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="deadline passed while it waited"):
        await collect(engine, request("late", tokens, deadline=time.monotonic() + 0.2))
    assert 0.2 <= time.monotonic() - started < 5
    assert engine.stats.requests_rejected_total == {"deadline_unreachable": 1, "deadline": 1}
    assert engine.stats.waiting == 0 and engine.stats.running == 1  # the blocker still runs
    await blocker.aclose()
    # A deadline that is met does not matter.
    events = await collect(engine, request("on-time", tokens, deadline=time.monotonic() + 60))
    assert events[-1].finish_reason == "length"


async def test_accepted_requests_are_refused_at_their_wait_bound_or_once_their_sheddable_target_passed(
        make_engine, monkeypatch):
    """Accepted on a prediction that more urgent arrivals then proved wrong: a targeted tier's
    request is refused (429 wait_bound, Retry-After) at its wait bound rather than age into the
    preempting lane, a sheddable one (429 target_unreachable) once its target has passed."""
    engine = await make_engine(max_running=1, prefill_batch_size=1)
    tokens = await prompt_tokens(engine)
    blocker = await hold_the_only_slot(engine, tokens)
    monkeypatch.setattr(engine, "_outlook", Outlook())  # an outlook that foresaw nothing
    monkeypatch.setattr(engine, "_publish_outlook", lambda: None)
    high = replace(request("high", tokens, Priority.HIGH),
                   terms=TierTerms(ttft_target_s=5.0, wait_bound=(0.3, Priority.CRITICAL)))
    low = replace(request("low", tokens, Priority.LOW), terms=TierTerms(ttft_target_s=0.15, sheddable=True))
    started = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(collect(engine, high), collect(engine, low), return_exceptions=True), 10)
    assert isinstance(results[0], WaitBound) and "critical tier's place" in str(results[0])
    assert isinstance(results[1], TargetUnreachable) and results[1].retry_after_s >= 1
    assert results[0].status_code == results[1].status_code == 429
    assert 0.3 <= time.monotonic() - started < 5
    assert engine.stats.requests_rejected_total == {"wait_bound": 1, "target_unreachable": 1}
    assert engine.stats.waiting == 0 and engine.stats.running == 1
    await blocker.aclose()


async def test_a_full_tier_refuses_at_once_while_others_queue(make_engine):
    engine = await make_engine(max_running=1, prefill_batch_size=1, max_waiting={Priority.LOW: 1})
    tokens = await prompt_tokens(engine)
    blocker = await hold_the_only_slot(engine, tokens)
    waiting = asyncio.create_task(collect(engine, request("low-1", tokens, Priority.LOW)))
    await wait_for(lambda: engine.stats.waiting == 1)
    with pytest.raises(QueueFull, match="low tier already has 1"):
        await collect(engine, request("low-2", tokens, Priority.LOW))
    normal = asyncio.create_task(collect(engine, request("normal", tokens)))  # unlimited tier
    await wait_for(lambda: engine.stats.waiting == 2)
    assert engine.stats.requests_rejected_total == {"queue_full": 1}
    await blocker.aclose()
    assert (await waiting)[-1].finish_reason == "length" and (await normal)[-1].finish_reason == "length"


async def test_a_token_budget_of_one_prompt_serves_a_burst_one_prefill_at_a_time(make_engine):
    """Admission under a budget that fits one prompt: every request still runs, also after
    cancellations (their tokens leave the budget too, or the engine would stall)."""
    probe = await make_engine()
    tokens = await prompt_tokens(probe)
    engine = await make_engine(max_running=8, prefill_batch_size=8, prefill_token_budget=len(tokens))

    async def cancelled_after_one(name: str) -> None:
        stream = engine.submit(request(name, tokens, max_tokens=500))
        await anext(stream)
        await stream.aclose()

    for round_ in range(2):
        results = await asyncio.gather(
            *(collect(engine, request(f"r{round_}-{i}", tokens, max_tokens=8)) for i in range(6)),
            *(cancelled_after_one(f"c{round_}-{i}") for i in range(2)),
        )
        assert [events[-1].finish_reason for events in results[:6]] == ["length"] * 6
    await wait_for(lambda: engine.stats.running == 0 and engine.stats.waiting == 0)
    assert engine.stats.requests_finished_total == {"length": 12, "cancelled": 4}


async def test_a_tier_limit_counts_only_requests_that_must_wait(make_engine):
    # No low request may wait; with free slots, low requests run (none of them waits).
    engine = await make_engine(max_running=4, prefill_batch_size=2, max_waiting={Priority.LOW: 0})
    tokens = await prompt_tokens(engine)
    results = await asyncio.gather(*(collect(engine, request(f"low-{i}", tokens, Priority.LOW)) for i in range(3)))
    assert all(events[-1].finish_reason == "length" for events in results)
    blocker = await make_engine(max_running=1, prefill_batch_size=1, max_waiting={Priority.LOW: 0})
    held = await hold_the_only_slot(blocker, tokens)
    with pytest.raises(QueueFull):
        await collect(blocker, request("low", tokens, Priority.LOW))
    await held.aclose()


async def test_a_seed_fixes_the_tokens_whatever_shares_the_batch(engine):
    tokens = await prompt_tokens(engine)

    def seeded(name: str, seed: int) -> GenerationRequest:
        return request(name, tokens, temperature=1.0, max_tokens=24, seed=seed)

    alone = [e.token_id for e in await collect(engine, seeded("alone", 7))]
    together = await asyncio.gather(
        collect(engine, seeded("again", 7)),
        collect(engine, request("noise-1", tokens, temperature=1.0, max_tokens=24)),
        collect(engine, seeded("other-seed", 8)),
        collect(engine, request("noise-2", tokens, temperature=0.7, top_p=0.9, max_tokens=24)),
    )
    again, _, other, _ = ([e.token_id for e in events] for events in together)
    assert again == alone
    assert other != alone
    # Sampling with a seed still samples: not the greedy choice throughout.
    greedy = [e.token_id for e in await collect(engine, request("greedy", tokens, max_tokens=24))]
    assert alone != greedy


async def test_top_k_1_and_min_p_1_are_greedy(engine):
    tokens = await prompt_tokens(engine)
    greedy = [e.token_id for e in await collect(engine, request("greedy", tokens, max_tokens=16))]
    top_k = await collect(engine, request("top-k", tokens, temperature=1.5, top_k=1, max_tokens=16))
    min_p = await collect(engine, request("min-p", tokens, temperature=1.5, min_p=1.0, max_tokens=16, seed=3))
    assert [e.token_id for e in top_k] == greedy
    assert [e.token_id for e in min_p] == greedy
    huge_k = await collect(engine, request("huge-k", tokens, temperature=0.0, top_k=100000, max_tokens=16))
    assert [e.token_id for e in huge_k] == greedy  # k beyond the vocabulary keeps everything


async def test_logit_bias_and_penalties_reshape_the_choice(engine):
    tokens = await prompt_tokens(engine)
    greedy = [e.token_id for e in await collect(engine, request("greedy", tokens, max_tokens=12))]
    forced = greedy[0] + 1
    biased = await collect(engine, request("biased", tokens, max_tokens=6, logit_bias=((forced, 100.0),)))
    assert [e.token_id for e in biased] == [forced] * 6
    # Greedy text from random weights repeats itself; a strong penalty on repeats avoids it.
    assert len(set(greedy)) < len(greedy), greedy
    penalized = [e.token_id for e in await collect(engine, request("penalized", tokens, max_tokens=12,
                                                                     presence_penalty=50.0))]
    assert len(set(penalized)) == len(penalized)  # no token twice within the 20-token window
    repeated = [e.token_id for e in await collect(engine, request("repetition", tokens, max_tokens=12,
                                                                    repetition_penalty=10.0))]
    assert repeated != greedy
    # Penalized and plain requests share a batch; the plain one is unaffected.
    plain, _ = await asyncio.gather(
        collect(engine, request("plain", tokens, max_tokens=12)),
        collect(engine, request("with-bias", tokens, max_tokens=12, logit_bias=((forced, 100.0),))),
    )
    assert [e.token_id for e in plain] == greedy


async def test_logprobs_of_greedy_tokens_are_the_top_choices(engine):
    tokens = await prompt_tokens(engine)
    events = await collect(engine, request("lp", tokens, max_tokens=6, logprobs=3))
    plain = await collect(engine, request("plain", tokens, max_tokens=6))
    assert [e.token_id for e in events] == [e.token_id for e in plain]
    assert all(e.logprob is None for e in plain)
    decode = engine.tokenizer.decode
    for event in events:
        lp = event.logprob
        assert lp is not None and lp.logprob <= 0
        assert lp.token == decode([event.token_id])
        assert len(lp.top) == 3
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert lp.top[0] == (lp.token, pytest.approx(lp.logprob))  # greedy took the most likely
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-5
    only_chosen = await collect(engine, request("lp0", tokens, max_tokens=2, logprobs=0))
    assert only_chosen[0].logprob.top == () and only_chosen[0].logprob.logprob == pytest.approx(
        events[0].logprob.logprob, abs=1e-4)


async def test_the_prefix_cache_reuses_a_shared_prompt_and_gives_the_same_tokens(make_engine):
    engine = await make_engine(max_running=4)
    uncached = await make_engine(max_running=4, prompt_cache_bytes=0)
    prefix = await prompt_tokens(engine, LONG_PROMPT)
    assert len(prefix) > MIN_REUSE_TOKENS
    first = await collect(engine, request("first", prefix, max_tokens=4))
    assert first[-1].cached_tokens == 0
    assert engine.stats.prompt_cache_entries == 1 and engine.stats.prompt_cache_bytes > 0
    follow_up = prefix + await prompt_tokens(engine, " And then the pool scaled out.")
    second = await collect(engine, request("second", follow_up, max_tokens=8))
    assert second[-1].cached_tokens >= len(prefix)  # only the new tokens were computed
    assert engine.stats.prompt_tokens_cached_total == second[-1].cached_tokens
    assert engine.stats.prompt_cache_hits_total == 1 and engine.stats.prompt_cache_lookups_total == 2
    reference = await collect(uncached, request("reference", follow_up, max_tokens=8))
    assert [e.token_id for e in second] == [e.token_id for e in reference]
    assert reference[-1].cached_tokens == 0 and uncached.stats.prompt_cache_lookups_total == 0
    # The whole of a cached sequence (prompt + completion) is an exact hit: all but one token reused.
    exact = prefix + tuple(e.token_id for e in first)
    again = await collect(engine, request("exact", exact, max_tokens=2))
    assert again[-1].cached_tokens == len(exact) - 1


async def test_a_repeated_short_prompt_skips_its_prefill_and_a_parked_engine_keeps_its_prefix_cache(make_engine):
    engine = await make_engine(max_running=2)
    short = await prompt_tokens(engine)  # "Once upon a time": shorter than MIN_REUSE_TOKENS
    assert 2 < len(short) < MIN_REUSE_TOKENS
    first = await collect(engine, request("first", short, max_tokens=1))
    again = await collect(engine, request("again", short, max_tokens=2))
    # All but its last token came from the cache (no prefill pass), and the tokens are the same.
    assert (first[-1].cached_tokens, again[-1].cached_tokens) == (0, len(short) - 1)
    assert again[0].token_id == first[0].token_id
    # A short match that leaves more than the last token to compute is not reused (not worth a copy).
    other = (*short[:-2], short[0], short[0])
    assert (await collect(engine, request("other", other, max_tokens=1)))[-1].cached_tokens == 0
    await engine.park()
    await engine.resume()
    woken = await collect(engine, request("woken", short, max_tokens=3))
    assert woken[-1].cached_tokens == len(short) - 1  # what it cached before the park
    assert woken[0].token_id == first[0].token_id


async def test_a_repeated_prompt_asking_one_token_is_answered_without_a_forward_pass(make_engine):
    engine = await make_engine(max_running=2)
    reference = await make_engine(max_running=2, prompt_cache_bytes=0)
    tokens = await prompt_tokens(engine, LONG_PROMPT)
    first = await collect(engine, request("first", tokens, max_tokens=1, logprobs=3))
    steps = engine.stats.decode_steps_total
    again = await collect(engine, request("again", tokens, max_tokens=1, logprobs=3))
    # Drawn from the first one's kept log-probabilities: no step ran, every prompt token counts cached.
    assert engine.stats.decode_steps_total == steps and engine.stats.instant_answers_total == 1
    assert (again[-1].cached_tokens, again[-1].finish_reason, again[-1].completion_tokens) == (len(tokens), "length", 1)
    assert again[0].token_id == first[0].token_id and again[0].text == first[0].text
    assert [t for t, _ in again[0].logprob.top] == [t for t, _ in first[0].logprob.top]
    assert again[0].logprob.logprob == pytest.approx(first[0].logprob.logprob, abs=1e-5)
    # A seeded draw from them is the draw the forward pass would have given (same seed, same row).
    seeded: dict = {"max_tokens": 1, "temperature": 1.0, "seed": 7}
    drawn = await collect(engine, request("seeded", tokens, **seeded))
    assert drawn[0].token_id == (await collect(reference, request("ref", tokens, **seeded)))[0].token_id
    assert engine.stats.instant_answers_total == 2
    # Not for a penalty (it changes the row), nor for more than one token (the KV must hold the
    # prompt's last token): those run as before, from the prefix cache.
    await collect(engine, request("penalized", tokens, max_tokens=1, repetition_penalty=1.3))
    longer = await collect(engine, request("longer", tokens, max_tokens=2))
    assert engine.stats.instant_answers_total == 2 and longer[0].token_id == first[0].token_id
    assert engine.stats.decode_steps_total > steps
    # Kept across a park and wake, like the rest of the prefix cache.
    await engine.park()
    await engine.resume()
    woken = await collect(engine, request("woken", tokens, max_tokens=1))
    assert woken[0].token_id == first[0].token_id and engine.stats.instant_answers_total == 3


async def test_the_prefix_cache_byte_cap_holds(make_engine):
    cap = 150_000  # about two of these sequences (~60 KB each on the tiny model)
    engine = await make_engine(max_running=2, prompt_cache_bytes=cap)
    sizes = []
    for i in range(8):
        tokens = await prompt_tokens(engine, f"{LONG_PROMPT} Request number {i} asks something else.")
        await collect(engine, request(f"r{i}", tokens, max_tokens=6))
        sizes.append(engine.stats.prompt_cache_bytes)
    assert all(0 < size <= cap for size in sizes), sizes
    assert engine.stats.prompt_cache_entries < 8  # older sequences were evicted to stay under the cap
    assert engine.stats.prompt_cache_entries >= 1


async def test_a_stream_interval_hands_tokens_over_together(make_engine):
    engine = await make_engine(max_running=2, stream_interval_s=10.0)  # longer than the whole request
    tokens = await prompt_tokens(engine)
    events = await collect(engine, request("batched", tokens, max_tokens=20))
    assert len(events) == 20 and [e.completion_tokens for e in events] == list(range(1, 21))
    assert not events[0].more  # the first token goes at once
    assert all(e.more for e in events[1:-1]) and not events[-1].more  # the rest with the last one
    assert events[-1].finish_reason == "length"
    plain = await collect(engine, request("plain", tokens, max_tokens=20))
    assert [e.token_id for e in plain] == [e.token_id for e in events]
    unbatched = await make_engine(max_running=2)
    assert not any(e.more for e in await collect(unbatched, request("each", tokens, max_tokens=8)))


async def test_within_a_tier_the_shortest_predicted_job_goes_first(make_engine):
    """Against the real engine: same tier, a long job queued before a short one; the short one
    runs first (its predicted duration, from the engine's own speed model, is shorter)."""
    engine = await make_engine(max_running=1, prefill_batch_size=1)
    tokens = await prompt_tokens(engine)
    blocker = await hold_the_only_slot(engine, tokens)
    order: list[str] = []

    async def one(name: str, max_tokens: int) -> None:
        await collect(engine, request(name, tokens, Priority.NORMAL, max_tokens=max_tokens))
        order.append(name)

    long = asyncio.create_task(one("long", 64))
    await wait_for(lambda: engine.stats.waiting == 1)
    short = asyncio.create_task(one("short", 2))
    await wait_for(lambda: engine.stats.waiting == 2)
    await blocker.aclose()
    await asyncio.gather(long, short)
    assert order == ["short", "long"]
