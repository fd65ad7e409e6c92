"""The data plane alone: request shaping, defaults, budgets, priorities, errors, leases.

The engine is the FakeEngine of conftest.py (scripted events, no MLX); the tokenizer is
one token per character, so token counts are easy to state.
"""

from __future__ import annotations

import json
import time

import pytest

from mlxpool.agent.config import PriorityScheduling, TierConfig
from mlxpool.agent.errors import (
    DeadlineExceeded,
    Draining,
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    NotReady,
    QueueFull,
    TierNotAllowed,
)
from mlxpool.agent.serving import openai as api
from mlxpool.agent.serving.dataplane import DataPlane, DataPlaneSettings, RequestHints
from mlxpool.agent.serving.lifecycle import Phase
from mlxpool.priorities import Priority


def completion(**fields) -> api.CompletionRequest:
    return api.CompletionRequest.model_validate({"model": "fake", "prompt": "Hi", **fields})


def chat(**fields) -> api.ChatCompletionRequest:
    return api.ChatCompletionRequest.model_validate(
        {"model": "fake", "messages": [{"role": "user", "content": "hi"}], **fields})


async def batches_of(stream) -> list[list[dict]]:
    try:
        return [[json.loads(c) for c in batch] async for batch in stream]
    finally:
        await stream.aclose()


async def chunks_of(stream) -> list[dict]:
    return [chunk for batch in await batches_of(stream) for chunk in batch]


async def test_completion_joins_events_and_reports_usage(fake_agent):
    fake_agent.engine.cached_tokens = 1
    response = await fake_agent.plane.complete(completion(max_tokens=5))
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.choices[0].text == "Hello world"
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].logprobs is None
    assert response.usage.model_dump() == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
                                           "prompt_tokens_details": {"cached_tokens": 1}}


async def test_defaults_and_sampling_reach_the_engine(fake_agent):
    await fake_agent.plane.complete(completion())
    await fake_agent.plane.complete(completion(temperature=0, top_p=0.5, stop="x", max_tokens=3, top_k=5,
                                               min_p=0.1, seed=42))
    await fake_agent.plane.complete(completion(stop=["a", "b"], prompt=[72, 105], top_k=-1))
    first, second, third = (r.sampling for r in fake_agent.engine.requests)
    assert (first.max_tokens, first.temperature, first.top_p, first.top_k, first.min_p, first.seed, first.stop) == (
        8, 1.0, 1.0, 0, 0.0, None, ())
    assert (second.max_tokens, second.temperature, second.top_p, second.stop) == (3, 0.0, 0.5, ("x",))
    assert (second.top_k, second.min_p, second.seed) == (5, 0.1, 42)
    assert third.stop == ("a", "b") and third.top_k == 0
    assert fake_agent.engine.requests[2].prompt_tokens == (72, 105)


async def test_penalties_and_biases_reach_the_engine(fake_agent):
    await fake_agent.plane.complete(completion(presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2,
                                               logit_bias={"65": 5, "66": -100}))
    await fake_agent.plane.complete(completion())
    penalized, plain = (r.sampling for r in fake_agent.engine.requests)
    assert (penalized.presence_penalty, penalized.frequency_penalty, penalized.repetition_penalty) == (0.5, -1, 1.2)
    assert penalized.logit_bias == ((65, 5.0), (66, -100.0)) and penalized.penalized
    assert not plain.penalized and plain.repetition_penalty == 1.0
    with pytest.raises(InvalidRequest, match="outside the vocabulary") as error:
        await fake_agent.plane.complete(completion(logit_bias={"300": 1}))
    assert error.value.param == "logit_bias"


async def test_streamed_completion_chunks_add_up_to_the_whole(fake_agent):
    chunks = await chunks_of(await fake_agent.plane.stream_completion(
        completion(stream=True, stream_options={"include_usage": True})))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == "Hello world"
    assert [c["choices"][0]["finish_reason"] for c in text_chunks] == [None, None, "length"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3
    assert len({c["id"] for c in chunks}) == 1
    # Chunks rendered from the template have the model's exact shape.
    expected = api.CompletionResponse.model_validate(text_chunks[0]).model_dump(mode="json")
    assert text_chunks[0] == expected


async def test_a_stream_says_complete_with_its_last_batch(fake_agent):
    stream = await fake_agent.plane.stream_completion(completion(stream=True))
    try:
        seen = [(len(batch), stream.complete) async for batch in stream]  # `complete` read as each batch comes
    finally:
        await stream.aclose()
    assert seen == [(1, False), (1, False), (1, True)]


async def test_tokens_handed_over_together_make_one_batch(fake_agent):
    plane = fake_agent.plane
    one_by_one = await batches_of(await plane.stream_completion(completion(stream=True)))
    assert [len(b) for b in one_by_one] == [1, 1, 1]
    fake_agent.engine.handed_over_together = True
    together = await batches_of(await plane.stream_completion(
        completion(stream=True, stream_options={"include_usage": True})))
    assert [len(b) for b in together] == [4]  # three tokens and the usage chunk: one write
    assert [c["choices"][0]["text"] for c in together[0][:3]] == ["Hel", "lo", " world"]
    chat_batches = await batches_of(await plane.stream_chat(chat(stream=True)))
    assert [len(b) for b in chat_batches] == [5]  # role, three deltas, the finish


async def test_template_chunks_escape_text_like_json(fake_agent):
    fake_agent.engine.script = ['say "hi"\n', "\\ é ✓", "end"]
    chunks = await chunks_of(await fake_agent.plane.stream_completion(completion(stream=True)))
    assert [c["choices"][0]["text"] for c in chunks] == ['say "hi"\n', "\\ é ✓", "end"]


async def test_chat_uses_the_fallback_template_without_a_chat_template(fake_agent):
    response = await fake_agent.plane.chat(chat())
    assert response.object == "chat.completion"
    assert response.choices[0].message.model_dump() == {"role": "assistant", "content": "Hello world"}
    prompt = "".join(chr(t) for t in fake_agent.engine.requests[0].prompt_tokens)
    assert prompt == "user: hi\nassistant:"
    assert response.usage.prompt_tokens == len(prompt)


async def test_streamed_chat_opens_with_the_role_and_ends_with_an_empty_delta(fake_agent):
    fake_agent.engine.script = ["a", "", "b"]
    chunks = await chunks_of(await fake_agent.plane.stream_chat(chat(stream=True)))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "a"}, {"content": "b"}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


async def test_completion_logprobs_whole_and_streamed(fake_agent):
    whole = await fake_agent.plane.complete(completion(logprobs=2))
    assert fake_agent.engine.requests[0].sampling.logprobs == 2
    logprobs = whole.choices[0].logprobs
    assert logprobs.tokens == ["Hel", "lo", " world"] and logprobs.token_logprobs == [-1.0] * 3
    assert logprobs.top_logprobs == [{"Hel": -1.0}, {"lo": -1.0}, {" world": -1.0}]
    assert logprobs.text_offset == [0, 3, 5]
    chunks = await chunks_of(await fake_agent.plane.stream_completion(completion(logprobs=0, stream=True)))
    assert [c["choices"][0]["logprobs"]["tokens"] for c in chunks] == [["Hel"], ["lo"], [" world"]]
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks] == [[0], [3], [5]]
    assert chunks[0]["choices"][0]["logprobs"]["top_logprobs"] is None


async def test_chat_logprobs_whole_and_streamed(fake_agent):
    whole = await fake_agent.plane.chat(chat(logprobs=True, top_logprobs=1))
    content = whole.choices[0].logprobs.content
    assert [e.token for e in content] == ["Hel", "lo", " world"]
    assert content[0].bytes == list(b"Hel") and content[0].top_logprobs[0].token == "Hel"
    plain = await fake_agent.plane.chat(chat(logprobs=True))
    assert fake_agent.engine.requests[-1].sampling.logprobs == 0
    assert plain.choices[0].logprobs.content[0].top_logprobs == []
    chunks = await chunks_of(await fake_agent.plane.stream_chat(chat(logprobs=True, stream=True)))
    assert [c["choices"][0]["logprobs"]["content"][0]["token"] for c in chunks[1:-1]] == ["Hel", "lo", " world"]
    none = await fake_agent.plane.chat(chat())
    assert none.choices[0].logprobs is None and fake_agent.engine.requests[-1].sampling.logprobs is None


async def test_context_budget(fake_agent):  # FAKE_MODEL_INFO.context_length == 64
    with pytest.raises(InvalidRequest, match="context") as too_long:
        await fake_agent.plane.complete(completion(prompt="x" * 64))
    assert too_long.value.param == "prompt"
    with pytest.raises(InvalidRequest, match="exceed") as too_many:
        await fake_agent.plane.complete(completion(prompt="x" * 60, max_tokens=5))
    assert too_many.value.param == "max_tokens"
    await fake_agent.plane.complete(completion(prompt="x" * 60))  # default 8 capped to the 4 left
    assert fake_agent.engine.requests[-1].sampling.max_tokens == 4


async def test_bad_prompts(fake_agent):
    with pytest.raises(InvalidRequest, match="empty"):
        await fake_agent.plane.complete(completion(prompt=""))
    with pytest.raises(InvalidRequest, match="vocabulary"):
        await fake_agent.plane.complete(completion(prompt=[1, 999]))
    assert fake_agent.engine.requests == []


async def test_unknown_model_and_phases(fake_agent):
    with pytest.raises(ModelNotFound, match="'other'"):
        await fake_agent.plane.complete(completion(model="other"))
    fake_agent.lifecycle.set_phase(Phase.LOADING)
    with pytest.raises(NotReady):
        await fake_agent.plane.complete(completion())
    fake_agent.lifecycle.set_phase(Phase.DRAINING)
    with pytest.raises(Draining):
        await fake_agent.plane.stream_chat(chat(stream=True))


async def test_priority_from_body_then_header_then_default(fake_agent):
    plane = fake_agent.plane
    await plane.complete(completion(priority="low"), RequestHints(priority="critical"))
    await plane.complete(completion(), RequestHints(priority="HIGH"))
    await plane.complete(completion())
    assert [r.priority for r in fake_agent.engine.requests] == [Priority.LOW, Priority.HIGH, Priority.NORMAL]
    with pytest.raises(InvalidRequest, match="x-priority: must be one of") as bad:
        await plane.complete(completion(), RequestHints(priority="urgent"))
    assert bad.value.param == "x-priority"


async def test_deadline_from_body_then_header_then_the_tier_default(fake_agent):
    scheduling = PriorityScheduling(default_priority=Priority.LOW,
                                    tiers={Priority.LOW: TierConfig(deadline_seconds=30)})
    plane = DataPlane(fake_agent.models, fake_agent.lifecycle, DataPlaneSettings(8, scheduling))
    before = time.monotonic()
    await plane.complete(completion(deadline_ms=2000), RequestHints(deadline_ms="9000"))
    await plane.complete(completion(), RequestHints(deadline_ms="5000"))
    await plane.complete(completion())
    await plane.complete(completion(priority="normal"))
    after = time.monotonic()
    body, header, tier, none = (r.deadline for r in fake_agent.engine.requests)
    assert before + 2 <= body <= after + 2
    assert before + 5 <= header <= after + 5
    assert before + 30 <= tier <= after + 30
    assert none is None
    for bad in ("soon", "0", "-5"):
        with pytest.raises(InvalidRequest, match="x-deadline-ms") as error:
            await plane.complete(completion(), RequestHints(deadline_ms=bad))
        assert error.value.param == "x-deadline-ms"


@pytest.mark.parametrize(("engine_error", "agent_error", "status"), [
    (QueueFull(Priority.LOW, 2), QueueFull, 429),
    (DeadlineExceeded(), DeadlineExceeded, 504),
])
async def test_refusals_surface_before_a_stream_starts(fake_agent, engine_error, agent_error, status):
    fake_agent.engine.fail_with = engine_error
    with pytest.raises(agent_error) as raised:
        await fake_agent.plane.stream_completion(completion(stream=True))
    assert raised.value is engine_error and raised.value.status_code == status  # passed through as it is
    with pytest.raises(agent_error):
        await fake_agent.plane.chat(chat())
    assert fake_agent.lifecycle.in_flight == 0


async def test_a_refusal_is_decided_before_tokenizing(fake_agent, monkeypatch):
    async def never(*_):
        raise AssertionError("tokenized a request refused on arrival")

    monkeypatch.setattr(fake_agent.encoder, "encode_text", never)
    monkeypatch.setattr(fake_agent.encoder, "encode_chat", never)
    fake_agent.engine.refuse_with = QueueFull(Priority.LOW, 2, 3)
    with pytest.raises(QueueFull):
        await fake_agent.plane.stream_completion(completion(stream=True, prompt="x" * 400))
    with pytest.raises(QueueFull):
        await fake_agent.plane.chat(chat())
    assert fake_agent.engine.refused_estimates[0] == 100  # 400 characters, ~4 a token
    assert fake_agent.engine.requests == [] and fake_agent.lifecycle.in_flight == 0


async def test_a_started_stream_holds_a_lease_until_closed_even_unread(fake_agent):
    stream = await fake_agent.plane.stream_completion(completion(stream=True))
    assert fake_agent.lifecycle.in_flight == 1  # started: waiting for its first token already
    await stream.aclose()  # never iterated
    assert fake_agent.lifecycle.in_flight == 0
    assert fake_agent.engine.closed_early == [fake_agent.engine.requests[0].request_id]


async def test_closing_a_stream_early_cancels_the_request(fake_agent):
    stream = await fake_agent.plane.stream_completion(completion(stream=True))
    [first] = [json.loads(c) for c in await anext(aiter(stream))]
    assert first["choices"][0]["text"] == "Hel"
    await stream.aclose()
    assert fake_agent.lifecycle.in_flight == 0
    assert fake_agent.engine.closed_early == [fake_agent.engine.requests[0].request_id]


async def test_drain_waits_for_the_lease(fake_agent):
    stream = await fake_agent.plane.stream_completion(completion(stream=True))
    assert not await fake_agent.lifecycle.drain(timeout=0.05)
    await chunks_of(stream)
    assert await fake_agent.lifecycle.drain(timeout=1)


async def test_idle_waits_return_at_once_whatever_the_timeout(fake_agent):
    lifecycle = fake_agent.lifecycle
    assert await lifecycle.wait_idle("fake", 0) and await lifecycle.wait_idle("never-served", 0)
    stream = await fake_agent.plane.stream_completion(completion(stream=True))
    assert (lifecycle.in_flight, lifecycle.in_flight_of("fake")) == (1, 1)  # one count: in total and per model
    assert not await lifecycle.wait_idle("fake", 0)
    await stream.aclose()
    assert await lifecycle.wait_idle("fake", 0) and await lifecycle.drain(timeout=0)


async def test_engine_failure_becomes_generation_failed(fake_agent):
    fake_agent.engine.fail_with = "the engine stopped"
    with pytest.raises(GenerationFailed, match="stopped"):
        await fake_agent.plane.complete(completion())
    assert fake_agent.lifecycle.in_flight == 0


async def test_observer_hears_every_request_once(fake_agent):
    seen: list[tuple] = []

    class Observer:
        def request_done(self, model, priority, outcome, ttft, inter_token, latency, ttft_target=None):
            seen.append((model, priority, outcome, ttft is not None, len(inter_token), latency >= (ttft or 0)))

    plane = DataPlane(fake_agent.models, fake_agent.lifecycle, DataPlaneSettings(8), observer=Observer())
    await plane.complete(completion(priority="high"))
    await chunks_of(await plane.stream_chat(chat(stream=True)))
    stream = await plane.stream_completion(completion(stream=True))
    await stream.aclose()
    fake_agent.engine.fail_with = QueueFull(Priority.NORMAL, 1)
    with pytest.raises(QueueFull):
        await plane.complete(completion())
    assert seen == [
        ("fake", Priority.HIGH, "length", True, 2, True),
        ("fake", Priority.NORMAL, "length", True, 2, True),
        ("fake", Priority.NORMAL, "cancelled", True, 0, True),
        ("fake", Priority.NORMAL, "queue_full", False, 0, True),
    ]


def test_models_list_and_readiness(fake_agent):
    assert fake_agent.plane.list_models().model_dump() == {
        "object": "list", "data": [{"id": "fake", "object": "model", "created": 1700000000, "owned_by": "mlxpool"}]}
    assert fake_agent.plane.readiness() == (True, {"status": "ready", "models": ["fake"], "in_flight": 0})
    fake_agent.engine.healthy = False
    assert fake_agent.plane.readiness()[1]["status"] == "unhealthy"


async def test_a_key_is_served_at_most_at_its_tier_or_refused(fake_agent):
    scheduling = PriorityScheduling(key_tiers={"bronze": Priority.LOW}, default_key_tier=Priority.HIGH)
    plane = DataPlane(fake_agent.models, fake_agent.lifecycle, DataPlaneSettings(8, scheduling))
    asks = [("bronze", "critical"), ("bronze", "background"), ("other", "critical"), (None, "critical")]
    for key, tier in asks:
        await plane.complete(completion(priority=tier), RequestHints(key_ref=key, key_tenant=key))
    served = [(r.priority, r.tenant) for r in fake_agent.engine.requests]
    assert served == [(Priority.LOW, "bronze"), (Priority.BACKGROUND, "bronze"), (Priority.HIGH, "other"),
                      (Priority.HIGH, "anonymous")]
    strict = DataPlane(fake_agent.models, fake_agent.lifecycle,
                       DataPlaneSettings(8, scheduling.model_copy(update={"over_tier": "reject"})))
    with pytest.raises(TierNotAllowed, match="at most the low tier; it asked for high") as refused:
        await strict.complete(completion(priority="high"), RequestHints(key_ref="bronze"))
    assert refused.value.status_code == 403 and refused.value.param == "priority"
    await strict.complete(completion(priority="low"), RequestHints(key_ref="bronze"))  # within its tier


async def test_the_tenant_is_the_header_where_allowed_else_the_key(fake_agent):
    closed = DataPlane(fake_agent.models, fake_agent.lifecycle, DataPlaneSettings(8))
    opened = DataPlane(fake_agent.models, fake_agent.lifecycle,
                       DataPlaneSettings(8, PriorityScheduling(allow_tenant_header=True)))
    await closed.complete(completion(), RequestHints(tenant="team-a", key_tenant="key-1"))
    await closed.complete(completion(), RequestHints(tenant="team-a"))
    await opened.complete(completion(), RequestHints(tenant="team-a", key_tenant="key-1"))
    await opened.complete(completion(), RequestHints(key_tenant="key-1"))
    assert [r.tenant for r in fake_agent.engine.requests] == ["key-1", "anonymous", "team-a", "key-1"]
    for bad in ("", "a b", "x" * 65, "é"):
        with pytest.raises(InvalidRequest, match="x-tenant") as error:
            await opened.complete(completion(), RequestHints(tenant=bad))
        assert error.value.param == "x-tenant"
