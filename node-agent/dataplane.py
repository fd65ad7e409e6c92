"""The transport-agnostic data plane: OpenAI requests in, OpenAI responses out.

It resolves the model, encodes the prompt, fixes sampling defaults, checks the context
budget, runs the request on the model's engine under an in-flight lease, and shapes
token events into completion / chat objects (whole or as stream chunks). It knows
nothing of HTTP: the routes in `app` only parse, call, and serialize, so another
transport (or a test) can drive this directly.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from mlxpool.agent import openai_api as api
from mlxpool.agent.engine.interface import EngineError, GenerationRequest, SamplingParams, TokenEvent
from mlxpool.agent.engine.prompts import PromptError
from mlxpool.agent.errors import GenerationFailed, InvalidRequest
from mlxpool.agent.lifecycle import Lifecycle, Phase
from mlxpool.agent.models import ModelRepository, ServedModel

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
DEFAULT_TOP_P = 1.0


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready for the engine."""

    model: ServedModel
    request: GenerationRequest
    response_id: str
    created: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_tokens)


class DataPlane:
    def __init__(self, models: ModelRepository, lifecycle: Lifecycle, default_max_tokens: int) -> None:
        if default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        self.models = models
        self.lifecycle = lifecycle
        self.default_max_tokens = default_max_tokens

    # ---- completions ----

    async def complete(self, body: api.CompletionRequest) -> api.CompletionResponse:
        prepared = await self.prepare_completion(body)
        text, last = await self._collect(prepared)
        return api.CompletionResponse(
            id=prepared.response_id, created=prepared.created, model=body.model,
            choices=[api.CompletionChoice(text=text, finish_reason=last.finish_reason)],
            usage=api.Usage.of(prepared.prompt_tokens, last.completion_tokens),
        )

    async def stream_completion(self, body: api.CompletionRequest) -> AsyncIterator[api.CompletionResponse]:
        """Validate now (errors are raised here), then return the chunk stream."""
        prepared = await self.prepare_completion(body)

        def chunk(text: str, finish: str | None = None) -> api.CompletionResponse:
            return api.CompletionResponse(
                id=prepared.response_id, created=prepared.created, model=body.model,
                choices=[api.CompletionChoice(text=text, finish_reason=finish)],
            )

        async def chunks() -> AsyncIterator[api.CompletionResponse]:
            async with aclosing(self.generate(prepared)) as events:
                async for event in events:
                    if event.finish_reason is not None:
                        yield chunk(event.text, event.finish_reason)
                        if body.include_usage_chunk:
                            yield api.CompletionResponse(
                                id=prepared.response_id, created=prepared.created, model=body.model,
                                choices=[], usage=api.Usage.of(prepared.prompt_tokens, event.completion_tokens),
                            )
                    elif event.text:
                        yield chunk(event.text)

        return chunks()

    async def prepare_completion(self, body: api.CompletionRequest) -> Prepared:
        self.lifecycle.check_accepting()
        model = self.models.get(body.model)
        if isinstance(body.prompt, str):
            tokens = await model.encoder.encode_text(body.prompt)
        else:
            tokens = list(body.prompt)
            if tokens and max(tokens) >= model.encoder.vocab_size:
                raise InvalidRequest(
                    f"prompt: token id {max(tokens)} is outside the vocabulary (size {model.encoder.vocab_size})",
                    param="prompt",
                )
        return self._prepare(body, model, tokens, prompt_param="prompt", id_prefix="cmpl")

    # ---- chat ----

    async def chat(self, body: api.ChatCompletionRequest) -> api.ChatCompletionResponse:
        prepared = await self.prepare_chat(body)
        text, last = await self._collect(prepared)
        return api.ChatCompletionResponse(
            id=prepared.response_id, created=prepared.created, model=body.model,
            choices=[api.ChatChoice(message=api.AssistantMessage(content=text), finish_reason=last.finish_reason)],
            usage=api.Usage.of(prepared.prompt_tokens, last.completion_tokens),
        )

    async def stream_chat(self, body: api.ChatCompletionRequest) -> AsyncIterator[api.ChatCompletionChunk]:
        """Validate now (errors are raised here), then return the chunk stream."""
        prepared = await self.prepare_chat(body)

        def chunk(delta: api.ChatDelta, finish: str | None = None) -> api.ChatCompletionChunk:
            return api.ChatCompletionChunk(
                id=prepared.response_id, created=prepared.created, model=body.model,
                choices=[api.ChatChunkChoice(delta=delta, finish_reason=finish)],
            )

        async def chunks() -> AsyncIterator[api.ChatCompletionChunk]:
            yield chunk(api.ChatDelta(role="assistant", content=""))
            async with aclosing(self.generate(prepared)) as events:
                async for event in events:
                    if event.text:
                        yield chunk(api.ChatDelta(content=event.text))
                    if event.finish_reason is not None:
                        yield chunk(api.ChatDelta(), event.finish_reason)
                        if body.include_usage_chunk:
                            yield api.ChatCompletionChunk(
                                id=prepared.response_id, created=prepared.created, model=body.model,
                                choices=[], usage=api.Usage.of(prepared.prompt_tokens, event.completion_tokens),
                            )

        return chunks()

    async def prepare_chat(self, body: api.ChatCompletionRequest) -> Prepared:
        self.lifecycle.check_accepting()
        model = self.models.get(body.model)
        try:
            tokens = await model.encoder.encode_chat(body.template_messages())
        except PromptError as exc:
            raise InvalidRequest(str(exc), param="messages") from exc
        return self._prepare(body, model, tokens, prompt_param="messages", id_prefix="chatcmpl")

    # ---- models and readiness ----

    def list_models(self) -> api.ModelList:
        return api.ModelList(data=[api.ModelCard(id=m.name, created=m.created) for m in self.models.all()])

    def readiness(self) -> tuple[bool, dict]:
        phase = self.lifecycle.phase
        ready = phase is Phase.READY and self.models.healthy()
        status = "ready" if ready else ("unhealthy" if phase is Phase.READY else phase.value)
        return ready, {"status": status, "models": [m.name for m in self.models.all()],
                       "in_flight": self.lifecycle.in_flight}

    # ---- shared ----

    def _prepare(
        self, body: api.CompletionRequest | api.ChatCompletionRequest, model: ServedModel,
        tokens: list[int], *, prompt_param: str, id_prefix: str,
    ) -> Prepared:
        if not tokens:
            raise InvalidRequest(f"{prompt_param}: the prompt is empty", param=prompt_param)
        max_tokens = self._max_tokens(body.requested_max_tokens(), len(tokens), model, prompt_param)
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            top_p=DEFAULT_TOP_P if body.top_p is None else body.top_p,
            stop=body.stop_strings(),
        )
        request = GenerationRequest(request_id=uuid.uuid4().hex, prompt_tokens=tuple(tokens), sampling=sampling)
        return Prepared(model, request, api.new_id(id_prefix), api.now())

    def _max_tokens(self, requested: int | None, prompt_tokens: int, model: ServedModel, prompt_param: str) -> int:
        context = model.info.context_length
        if context is None:
            return requested or self.default_max_tokens
        room = context - prompt_tokens
        if room < 1:
            raise InvalidRequest(
                f"{prompt_param}: the prompt has {prompt_tokens} tokens; the model's context is {context}",
                param=prompt_param,
            )
        if requested is None:
            return min(self.default_max_tokens, room)
        if requested > room:
            raise InvalidRequest(
                f"max_tokens: {requested} completion tokens + {prompt_tokens} prompt tokens exceed "
                f"the model's context of {context}",
                param="max_tokens",
            )
        return requested

    async def generate(self, prepared: Prepared) -> AsyncIterator[TokenEvent]:
        """The engine's events for one request, counted as in-flight while iterated."""
        async with self.lifecycle.lease():
            try:
                async with aclosing(prepared.model.engine.submit(prepared.request)) as events:
                    async for event in events:
                        yield event
            except EngineError as exc:
                log.error("generation failed model=%s request_id=%s error=%s",
                          prepared.model.name, prepared.request.request_id, exc)
                raise GenerationFailed(str(exc)) from exc

    async def _collect(self, prepared: Prepared) -> tuple[str, TokenEvent]:
        parts: list[str] = []
        last: TokenEvent | None = None
        async with aclosing(self.generate(prepared)) as events:
            async for event in events:
                parts.append(event.text)
                last = event
        if last is None:  # the engine ends every request with a finish event
            raise GenerationFailed("the engine returned no tokens")
        return "".join(parts), last
