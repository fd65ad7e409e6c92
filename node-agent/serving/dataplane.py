"""The transport-agnostic data plane: OpenAI requests in, OpenAI responses out.

It resolves the model, encodes the prompt, fixes sampling and scheduling defaults
(max_tokens, priority, deadline), checks the context budget, submits the request to the
model's engine (as the model manager serves it, which also counts the request in
flight: `servedengine`), and shapes token events into completion / chat objects, whole
or as a stream of JSON chunks. It knows nothing of HTTP: the routes in `http.app` only
parse, call, and frame, so another transport (or a test) can drive this directly.

A stream is started before it is handed back: the request waits here for its first
token, so queue-full, deadline and engine errors still become a proper HTTP status
instead of an error in the middle of a 200 stream. The engine's refusals are the
client's errors already (`errors.QueueFull`, `errors.DeadlineExceeded`) and pass
through; an `EngineError` becomes `GenerationFailed`. `ChunkStream.aclose()` always
ends the generation and releases its slot, whether or not the stream was read. Its
chunks come in batches: the tokens the engine handed over together (see
`TokenEvent.more`) become one batch, which the transport writes at once.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlxpool.agent.config import LimitsConfig, PriorityScheduling
from mlxpool.agent.engine.interface import EngineError, GenerationRequest, SamplingParams, TierTerms, TokenEvent
from mlxpool.agent.engine.prompts import PromptError
from mlxpool.agent.errors import (
    DeadlineExceeded,
    GenerationFailed,
    InvalidRequest,
    ModelLoading,
    ModelNotFound,
    Refused,
    TierNotAllowed,
)
from mlxpool.agent.serving import openai as api
from mlxpool.agent.serving.lifecycle import Lifecycle, Phase
from mlxpool.agent.serving.policies import SchedulingPolicies, wait_bound
from mlxpool.agent.serving.repository import ModelRepository, ServedModel
from mlxpool.agent.serving.shaping import ChunkTemplate, chat_logprobs, completion_logprobs
from mlxpool.priorities import DEADLINE_HEADER, PRIORITY_HEADER, TENANT_HEADER, Priority

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
DEFAULT_TOP_P = 1.0
ANONYMOUS = "anonymous"
"""The tenant of requests without an API key or allowed `x-tenant` header."""
MAX_TENANT_CHARS = 64
_TENANT = re.compile(rf"^[A-Za-z0-9_.:@-]{{1,{MAX_TENANT_CHARS}}}$")


@dataclass(frozen=True)
class DataPlaneSettings:
    default_max_tokens: int = 256
    """Completion budget when a request gives no max_tokens (capped by the context)."""
    scheduling: PriorityScheduling = field(default_factory=PriorityScheduling)
    """The node's tiers (default priority, targets, deadlines, bounds); a pool's policy for a
    model overrides them (`SchedulingPolicies`)."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Sizes checked before any work (prompt characters before tokenizing, stops, biases)."""

    def __post_init__(self) -> None:
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")


@dataclass(frozen=True)
class RequestHints:
    """What a transport adds to the body: the raw values of the headers we understand."""

    priority: str | None = None
    """The `x-priority` header; the body's `priority` field wins over it."""
    deadline_ms: str | None = None
    """The `x-deadline-ms` header; the body's `deadline_ms` field wins over it."""
    tenant: str | None = None
    """The `x-tenant` header (used only where `priority_scheduling.allow_tenant_header` is on)."""
    key_ref: str | None = None
    """The API key's name (else the key): what `priority_scheduling.key_tiers` is keyed by; None: no key."""
    key_tenant: str | None = None
    """The API key's tenant (its name, or a digest of it); None: no key."""


class RequestObserver(Protocol):
    """Told about every request that reached an engine (metrics implement it)."""

    def request_done(self, model: str, priority: Priority, outcome: str, ttft: float | None,
                     inter_token: list[float], latency: float, ttft_target: float | None = None) -> None: ...


CHARS_PER_TOKEN_ESTIMATE = 4
"""Characters per token to estimate a prompt's tokens before tokenizing (refusals only)."""


@dataclass(frozen=True, slots=True)
class _Terms:
    priority: Priority
    tenant: str
    terms: TierTerms
    deadline: float | None
    arrival: float


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready for the engine."""

    model: ServedModel
    request: GenerationRequest
    response_id: str
    created: int
    arrival: float
    """`time.perf_counter()` when the request reached the data plane."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_tokens)

    @property
    def logprobs(self) -> bool:
        return self.request.sampling.logprobs is not None


class ChunkStream:
    """The JSON chunks of one streamed response, in batches: the chunks of the tokens the
    engine handed over together, for one write. Iterate it; always `aclose()` it.

    `complete` turns true as the last batch is handed out, so a transport can write its
    end-of-stream marker with it.
    """

    def __init__(self, batches: AsyncGenerator[tuple[list[str], bool], None],
                 events: AsyncGenerator[TokenEvent, None]) -> None:
        self._batches = batches
        """(batch, whether it is the last) pairs."""
        self._events = events
        self.complete = False

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> list[str]:
        batch, self.complete = await anext(self._batches)
        return batch

    async def aclose(self) -> None:
        await self._batches.aclose()
        await self._events.aclose()  # also when the chunks were never read


class DataPlane:
    def __init__(self, models: ModelRepository, lifecycle: Lifecycle, settings: DataPlaneSettings | None = None,
                 observer: RequestObserver | None = None, policies: SchedulingPolicies | None = None) -> None:
        self.models = models
        self.lifecycle = lifecycle
        self.settings = settings or DataPlaneSettings()
        self.observer = observer
        self.policies = policies or SchedulingPolicies(self.settings.scheduling)
        self.load_on_request: Callable[[str], Awaitable[bool]] | None = None
        """Asked for a model that is not served (the model manager's `load_for_request`): True
        once it is ready; None: such a request fails at once (404, or 503 while it loads)."""

    # ---- completions ----

    async def complete(self, body: api.CompletionRequest,
                       hints: RequestHints = RequestHints()) -> api.CompletionResponse:
        prepared = await self.prepare_completion(body, hints)
        events = await self._collect(prepared)
        last = events[-1]
        logprobs = completion_logprobs([e.logprob for e in events if e.logprob]) if prepared.logprobs else None
        return api.CompletionResponse(
            id=prepared.response_id, created=prepared.created, model=body.model,
            choices=[api.CompletionChoice(text="".join(e.text for e in events), finish_reason=last.finish_reason,
                                          logprobs=logprobs)],
            usage=api.Usage.of(prepared.prompt_tokens, last.completion_tokens, last.cached_tokens),
        )

    async def stream_completion(self, body: api.CompletionRequest, hints: RequestHints = RequestHints()) -> ChunkStream:
        """Validate and start (errors are raised here), then return the chunk stream."""
        prepared = await self.prepare_completion(body, hints)
        first, events = await self._start(prepared)

        def chunk(text: str, finish: str | None = None,
                  logprobs: api.CompletionLogprobs | None = None) -> api.CompletionResponse:
            return api.CompletionResponse(
                id=prepared.response_id, created=prepared.created, model=body.model,
                choices=[api.CompletionChoice(text=text, finish_reason=finish, logprobs=logprobs)],
            )

        template = ChunkTemplate(chunk)

        async def chunks() -> AsyncGenerator[tuple[list[str], bool], None]:
            offset = 0
            batch: list[str] = []
            event: TokenEvent | None = first
            while event is not None:
                if event.finish_reason is not None or event.logprob is not None:
                    logprobs = completion_logprobs([event.logprob], offset) if event.logprob else None
                    batch.append(chunk(event.text, event.finish_reason, logprobs).model_dump_json())
                elif event.text:
                    batch.append(template.render(event.text))
                offset += len(event.text)
                if event.finish_reason is not None:
                    if body.include_usage_chunk:
                        batch.append(self._usage_chunk(api.CompletionResponse, prepared, body.model, event))
                    yield batch, True
                    return
                if batch and not event.more:
                    yield batch, False
                    batch = []
                event = await anext(events, None)

        return ChunkStream(chunks(), events)

    async def _model(self, name: str) -> ServedModel:
        try:
            return self.models.get(name)
        except (ModelNotFound, ModelLoading):
            if self.load_on_request is None or not await self.load_on_request(name):
                raise
        return self.models.get(name)

    async def prepare_completion(self, body: api.CompletionRequest, hints: RequestHints = RequestHints()) -> Prepared:
        self.lifecycle.check_accepting()
        model = await self._model(body.model)
        prompt = body.text_or_tokens()
        self._check_sizes(body, len(prompt) if isinstance(prompt, str) else 0, "prompt")
        terms = self._terms(body, hints, model, len(prompt) if isinstance(prompt, str)
                            else len(prompt) * CHARS_PER_TOKEN_ESTIMATE)
        if isinstance(prompt, str):
            tokens = await model.encoder.encode_text(prompt)
        else:
            tokens = list(prompt)
            if tokens and max(tokens) >= model.encoder.vocab_size:
                raise InvalidRequest(
                    f"prompt: token id {max(tokens)} is outside the vocabulary (size {model.encoder.vocab_size})",
                    param="prompt",
                )
        return self._prepare(body, hints, model, tokens, terms, prompt_param="prompt", id_prefix="cmpl")

    # ---- chat ----

    async def chat(self, body: api.ChatCompletionRequest,
                   hints: RequestHints = RequestHints()) -> api.ChatCompletionResponse:
        prepared = await self.prepare_chat(body, hints)
        events = await self._collect(prepared)
        last = events[-1]
        logprobs = chat_logprobs([e.logprob for e in events if e.logprob]) if prepared.logprobs else None
        message = api.AssistantMessage(content="".join(e.text for e in events))
        return api.ChatCompletionResponse(
            id=prepared.response_id, created=prepared.created, model=body.model,
            choices=[api.ChatChoice(message=message, finish_reason=last.finish_reason, logprobs=logprobs)],
            usage=api.Usage.of(prepared.prompt_tokens, last.completion_tokens, last.cached_tokens),
        )

    async def stream_chat(self, body: api.ChatCompletionRequest, hints: RequestHints = RequestHints()) -> ChunkStream:
        """Validate and start (errors are raised here), then return the chunk stream."""
        prepared = await self.prepare_chat(body, hints)
        first, events = await self._start(prepared)

        def chunk(delta: api.ChatDelta, finish: str | None = None,
                  logprobs: api.ChatLogprobs | None = None) -> api.ChatCompletionChunk:
            return api.ChatCompletionChunk(
                id=prepared.response_id, created=prepared.created, model=body.model,
                choices=[api.ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)],
            )

        template = ChunkTemplate(lambda text: chunk(api.ChatDelta(content=text)))

        async def chunks() -> AsyncGenerator[tuple[list[str], bool], None]:
            batch = [chunk(api.ChatDelta(role="assistant", content="")).model_dump_json()]
            event: TokenEvent | None = first
            while event is not None:
                if event.logprob is not None:
                    batch.append(chunk(api.ChatDelta(content=event.text), None,
                                       chat_logprobs([event.logprob])).model_dump_json())
                elif event.text:
                    batch.append(template.render(event.text))
                if event.finish_reason is not None:
                    batch.append(chunk(api.ChatDelta(), event.finish_reason).model_dump_json())
                    if body.include_usage_chunk:
                        batch.append(self._usage_chunk(api.ChatCompletionChunk, prepared, body.model, event))
                    yield batch, True
                    return
                if batch and not event.more:
                    yield batch, False
                    batch = []
                event = await anext(events, None)

        return ChunkStream(chunks(), events)

    async def prepare_chat(self, body: api.ChatCompletionRequest, hints: RequestHints = RequestHints()) -> Prepared:
        self.lifecycle.check_accepting()
        model = await self._model(body.model)
        limits = self.settings.limits
        if len(body.messages) > limits.max_messages:
            raise InvalidRequest(f"messages: {len(body.messages)} messages; this server accepts at most "
                                 f"{limits.max_messages} (limits.max_messages)", param="messages")
        chars = sum(len(m.text()) for m in body.messages)
        self._check_sizes(body, chars, "messages")
        terms = self._terms(body, hints, model, chars)
        try:
            tokens = await model.encoder.encode_chat(body.template_messages())
        except PromptError as exc:
            raise InvalidRequest(str(exc), param="messages") from exc
        return self._prepare(body, hints, model, tokens, terms, prompt_param="messages", id_prefix="chatcmpl")

    def _check_sizes(self, body: api.CompletionRequest | api.ChatCompletionRequest, prompt_chars: int,
                     prompt_param: str) -> None:
        """The configured limits, checked before tokenizing: one request cannot hold the tokenizer long."""
        limits = self.settings.limits
        if prompt_chars > limits.max_prompt_chars:
            raise InvalidRequest(f"{prompt_param}: the prompt has {prompt_chars} characters; this server accepts "
                                 f"at most {limits.max_prompt_chars} (limits.max_prompt_chars)", param=prompt_param)
        stops = body.stop_strings()
        if len(stops) > limits.max_stop_strings:
            raise InvalidRequest(f"stop: {len(stops)} stop sequences; this server accepts at most "
                                 f"{limits.max_stop_strings} (limits.max_stop_strings)", param="stop")
        longest = max((len(s) for s in stops), default=0)
        if longest > limits.max_stop_chars:
            raise InvalidRequest(f"stop: a stop sequence has {longest} characters; this server accepts at most "
                                 f"{limits.max_stop_chars} (limits.max_stop_chars)", param="stop")
        biases = len(body.logit_bias or {})
        if biases > limits.max_logit_bias:
            raise InvalidRequest(f"logit_bias: {biases} entries; this server accepts at most "
                                 f"{limits.max_logit_bias} (limits.max_logit_bias)", param="logit_bias")

    # ---- models and readiness ----

    def list_models(self) -> api.ModelList:
        return api.ModelList(data=[api.ModelCard(id=m.name, created=m.created) for m in self.models.all()])

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        phase = self.lifecycle.phase
        ready = phase is Phase.READY and self.models.healthy()
        status = "ready" if ready else ("unhealthy" if phase is Phase.READY else phase.value)
        return ready, {"status": status, "models": [m.name for m in self.models.all()],
                       "in_flight": self.lifecycle.in_flight}

    # ---- shared ----

    def _prepare(
        self, body: api.CompletionRequest | api.ChatCompletionRequest, hints: RequestHints, model: ServedModel,
        tokens: list[int], terms: _Terms, *, prompt_param: str, id_prefix: str,
    ) -> Prepared:
        arrival = time.perf_counter()
        if not tokens:
            raise InvalidRequest(f"{prompt_param}: the prompt is empty", param=prompt_param)
        max_tokens = self._max_tokens(body.requested_max_tokens(), len(tokens), model, prompt_param)
        top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
        biases = body.token_biases()
        if biases and max(t for t, _ in biases) >= model.encoder.vocab_size:
            raise InvalidRequest(
                f"logit_bias: token id {max(t for t, _ in biases)} is outside the vocabulary "
                f"(size {model.encoder.vocab_size})", param="logit_bias",
            )
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            top_p=DEFAULT_TOP_P if body.top_p is None else body.top_p,
            top_k=top_k,
            min_p=body.min_p or 0.0,
            seed=body.seed,
            stop=body.stop_strings(),
            logprobs=body.requested_logprobs(),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            logit_bias=biases,
        )
        t = terms
        request = GenerationRequest(
            request_id=uuid.uuid4().hex, prompt_tokens=tuple(tokens), sampling=sampling, priority=t.priority,
            deadline=t.deadline, terms=t.terms, arrival=t.arrival, tenant=t.tenant,
        )
        return Prepared(model, request, api.new_id(id_prefix), api.now(), arrival)

    def _terms(self, body: api.CompletionRequest | api.ChatCompletionRequest, hints: RequestHints,
               model: ServedModel, prompt_chars: int) -> _Terms:
        """The request's tier, tenant, deadline and tier terms, decided before tokenizing, and a 429
        at once if the engine's last outlook refuses it: the refusal waits for no tokenizer lane
        (its prompt's tokens estimated from its characters; the exact count only once admitted)."""
        scheduling = self.policies.effective(model.name)
        priority = self._allowed_tier(body.priority or _header_priority(hints.priority) or scheduling.default_priority,
                                      hints, scheduling)
        tenant = _tenant(hints, scheduling)
        wait_s = _wait_seconds(body.deadline_ms, hints.deadline_ms, scheduling, priority)
        tier = scheduling.tier(priority)
        terms = TierTerms(
            ttft_target_s=None if tier.ttft_target_ms is None else tier.ttft_target_ms / 1000,
            max_waiting=tier.max_waiting, preempt=tier.preempt, sheddable=tier.sheddable,
            wait_bound=wait_bound(scheduling, priority),
        )
        now = time.monotonic()
        deadline = None if wait_s is None else now + wait_s
        try:
            model.engine.refuse_early(priority, terms, deadline, prompt_chars // CHARS_PER_TOKEN_ESTIMATE)
        except Refused as refused:  # counted as `generate` counts the refusals `submit` raises
            if self.observer is not None:
                self.observer.request_done(model.name, priority, refused.code or "refused", None, [],
                                           time.monotonic() - now, ttft_target=terms.ttft_target_s)
            raise
        return _Terms(priority, tenant, terms, deadline, now)

    @staticmethod
    def _allowed_tier(asked: Priority, hints: RequestHints, scheduling: PriorityScheduling) -> Priority:
        """The tier the request is served at: what it asked for, at most what its key may claim."""
        allowed = scheduling.default_key_tier
        if hints.key_ref is not None:
            allowed = scheduling.key_tiers.get(hints.key_ref, allowed)
        if asked.rank >= allowed.rank:
            return asked
        if scheduling.over_tier == "reject":
            raise TierNotAllowed(asked, allowed)
        return allowed

    def _max_tokens(self, requested: int | None, prompt_tokens: int, model: ServedModel, prompt_param: str) -> int:
        context = model.info.context_length
        if context is None:
            return requested or self.settings.default_max_tokens
        room = context - prompt_tokens
        if room < 1:
            raise InvalidRequest(
                f"{prompt_param}: the prompt has {prompt_tokens} tokens; the model's context is {context}",
                param=prompt_param,
            )
        if requested is None:
            return min(self.settings.default_max_tokens, room)
        if requested > room:
            raise InvalidRequest(
                f"max_tokens: {requested} completion tokens + {prompt_tokens} prompt tokens exceed "
                f"the model's context of {context}",
                param="max_tokens",
            )
        return requested

    async def generate(self, prepared: Prepared) -> AsyncGenerator[TokenEvent, None]:
        """The engine's events for one request, timed while iterated and told to the observer."""
        request = prepared.request
        outcome = "cancelled"
        first: float | None = None
        last = prepared.arrival
        gaps: list[float] = []
        clock = time.perf_counter
        try:
            async with aclosing(prepared.model.engine.submit(request)) as events:
                async for event in events:
                    now = clock()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
                    if event.finish_reason is not None:
                        outcome = event.finish_reason
                    yield event
        except Refused as refused:  # 429 before waiting: queue_full or target_unreachable
            outcome = refused.code or "refused"
            raise
        except DeadlineExceeded:
            outcome = "deadline"
            raise
        except EngineError as exc:
            outcome = "error"
            log.error("generation failed model=%s request_id=%s error=%s", prepared.model.name, request.request_id, exc)
            raise GenerationFailed(str(exc)) from exc
        finally:
            if self.observer is not None:
                self.observer.request_done(
                    prepared.model.name, request.priority, outcome,
                    None if first is None else first - prepared.arrival, gaps, clock() - prepared.arrival,
                    ttft_target=None if request.terms is None else request.terms.ttft_target_s,
                )

    async def _start(self, prepared: Prepared) -> tuple[TokenEvent, AsyncGenerator[TokenEvent, None]]:
        """Submit and wait for the first event; on any failure the generation is closed."""
        events = self.generate(prepared)
        try:
            first = await anext(events, None)
        except BaseException:
            await events.aclose()
            raise
        if first is None:
            await events.aclose()
            raise GenerationFailed("the engine returned no tokens")
        return first, events

    async def _collect(self, prepared: Prepared) -> list[TokenEvent]:
        async with aclosing(self.generate(prepared)) as events:
            collected = [event async for event in events]
        if not collected:  # the engine ends every request with a finish event
            raise GenerationFailed("the engine returned no tokens")
        return collected

    @staticmethod
    def _usage_chunk(kind: type[api.CompletionResponse] | type[api.ChatCompletionChunk], prepared: Prepared,
                     model: str, last: TokenEvent) -> str:
        usage = api.Usage.of(prepared.prompt_tokens, last.completion_tokens, last.cached_tokens)
        return kind(id=prepared.response_id, created=prepared.created, model=model, choices=[],
                    usage=usage).model_dump_json()


def _tenant(hints: RequestHints, scheduling: PriorityScheduling) -> str:
    """The fair-share tenant: the `x-tenant` header where allowed, else the API key's, else anonymous."""
    if hints.tenant is not None and scheduling.allow_tenant_header:
        value = hints.tenant.strip()
        if not _TENANT.match(value):
            raise InvalidRequest(f"{TENANT_HEADER}: 1 to {MAX_TENANT_CHARS} characters of letters, digits and "
                                 f"'_.:@-'; got {hints.tenant[:64]!r}", param=TENANT_HEADER)
        return value
    return hints.key_tenant or ANONYMOUS


def _header_priority(value: str | None) -> Priority | None:
    if value is None:
        return None
    try:
        return Priority(value.strip().lower())
    except ValueError:
        allowed = ", ".join(p.value for p in Priority)
        raise InvalidRequest(f"{PRIORITY_HEADER}: must be one of {allowed}; got {value[:64]!r}",
                             param=PRIORITY_HEADER) from None


def _wait_seconds(body_ms: int | None, header_ms: str | None, scheduling: PriorityScheduling,
                  priority: Priority) -> float | None:
    """How long the request may wait for a batch slot: body, header, else its tier's default."""
    if body_ms is not None:
        return body_ms / 1000
    if header_ms is not None:
        text = header_ms.strip()
        # Digits only, and few of them: int() of a 4,300-digit header is refused by Python, and
        # one of 400 digits overflows the float arithmetic of the deadline.
        value = int(text) if text.isascii() and text.isdigit() and len(text) <= 12 else 0
        if not 0 < value <= api.MAX_DEADLINE_MS:
            raise InvalidRequest(f"{DEADLINE_HEADER}: must be an integer of milliseconds from 1 to "
                                 f"{api.MAX_DEADLINE_MS}; got {header_ms[:64]!r}", param=DEADLINE_HEADER)
        return value / 1000
    return scheduling.tier(priority).deadline_seconds
