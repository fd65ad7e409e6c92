"""The data plane alone: request shaping, defaults, budgets, errors, in-flight leases.

The engine is the FakeEngine of conftest.py (scripted events, no MLX); the tokenizer is
one token per character, so token counts are easy to state.
"""

from __future__ import annotations

from contextlib import aclosing

import pytest

from mlxpool.agent import openai_api as api
from mlxpool.agent.errors import Draining, GenerationFailed, InvalidRequest, ModelNotFound, NotReady
from mlxpool.agent.lifecycle import Phase


def completion(**fields) -> api.CompletionRequest:
    return api.CompletionRequest.model_validate({"model": "fake", "prompt": "Hi", **fields})


def chat(**fields) -> api.ChatCompletionRequest:
    return api.ChatCompletionRequest.model_validate(
        {"model": "fake", "messages": [{"role": "user", "content": "hi"}], **fields})


async def test_completion_joins_events_and_reports_usage(fake_agent):
    response = await fake_agent.plane.complete(completion(max_tokens=5))
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.choices[0].text == "Hello world"
    assert response.choices[0].finish_reason == "length"
    assert response.usage.model_dump() == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


async def test_defaults_and_sampling_reach_the_engine(fake_agent):
    await fake_agent.plane.complete(completion())
    await fake_agent.plane.complete(completion(temperature=0, top_p=0.5, stop="x", max_tokens=3))
    await fake_agent.plane.complete(completion(stop=["a", "b"], prompt=[72, 105]))
    first, second, third = (r.sampling for r in fake_agent.engine.requests)
    assert (first.max_tokens, first.temperature, first.top_p, first.stop) == (8, 1.0, 1.0, ())
    assert (second.max_tokens, second.temperature, second.top_p, second.stop) == (3, 0.0, 0.5, ("x",))
    assert third.stop == ("a", "b")
    assert fake_agent.engine.requests[2].prompt_tokens == (72, 105)


async def test_streamed_completion_chunks_add_up_to_the_whole(fake_agent):
    chunks = [c async for c in await fake_agent.plane.stream_completion(
        completion(stream=True, stream_options={"include_usage": True}))]
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == "Hello world"
    assert [c.choices[0].finish_reason for c in text_chunks] == [None, None, "length"]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1


async def test_chat_uses_the_fallback_template_without_a_chat_template(fake_agent):
    response = await fake_agent.plane.chat(chat())
    assert response.object == "chat.completion"
    assert response.choices[0].message.model_dump() == {"role": "assistant", "content": "Hello world"}
    prompt = "".join(chr(t) for t in fake_agent.engine.requests[0].prompt_tokens)
    assert prompt == "user: hi\nassistant:"
    assert response.usage.prompt_tokens == len(prompt)


async def test_streamed_chat_opens_with_the_role_and_ends_with_an_empty_delta(fake_agent):
    fake_agent.engine.script = ["a", "", "b"]
    chunks = [c async for c in await fake_agent.plane.stream_chat(chat(stream=True))]
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "a"}, {"content": "b"}, {}]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


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


async def test_stream_holds_a_lease_and_closing_early_cancels_the_request(fake_agent):
    stream = await fake_agent.plane.stream_completion(completion(stream=True))
    assert fake_agent.lifecycle.in_flight == 0  # nothing runs until the body is iterated
    async with aclosing(stream):
        first = await anext(stream)
        assert first.choices[0].text == "Hel"
        assert fake_agent.lifecycle.in_flight == 1
    assert fake_agent.lifecycle.in_flight == 0
    assert fake_agent.engine.closed_early == [fake_agent.engine.requests[0].request_id]


async def test_drain_waits_for_the_lease(fake_agent):
    stream = await fake_agent.plane.stream_completion(completion(stream=True))
    await anext(stream)
    assert not await fake_agent.lifecycle.drain(timeout=0.05)
    async for _ in stream:
        pass
    assert await fake_agent.lifecycle.drain(timeout=1)


async def test_engine_failure_becomes_generation_failed(fake_agent):
    fake_agent.engine.fail_with = "the engine stopped"
    with pytest.raises(GenerationFailed, match="stopped"):
        await fake_agent.plane.complete(completion())
    assert fake_agent.lifecycle.in_flight == 0


def test_models_list_and_readiness(fake_agent):
    assert fake_agent.plane.list_models().model_dump() == {
        "object": "list", "data": [{"id": "fake", "object": "model", "created": 1700000000, "owned_by": "mlxpool"}]}
    assert fake_agent.plane.readiness() == (True, {"status": "ready", "models": ["fake"], "in_flight": 0})
    fake_agent.engine.healthy = False
    assert fake_agent.plane.readiness()[1]["status"] == "unhealthy"
