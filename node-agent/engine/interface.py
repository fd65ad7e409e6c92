"""The engine's typed contract: what goes in (a request), what comes out (token events).

Everything above the engine (data plane, model repository, metrics, and later the
scheduler and model manager) talks to an engine only through these types, so none of
it imports MLX. Plain frozen dataclasses: they cross a thread boundary.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]


class EngineError(RuntimeError):
    """The engine could not run a request (stopped, crashed, or rejected it)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop."""

    max_tokens: int
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 disables it."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; they are not part of the returned text."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate: an already-tokenized prompt plus sampling."""

    request_id: str
    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams

    def __post_init__(self) -> None:
        if not self.prompt_tokens:
            raise ValueError("prompt_tokens must not be empty")


@dataclass(frozen=True)
class TokenEvent:
    """One step of one request: the text it added and, on the last step, why it ended.

    `text` may be empty (a token that completes no character yet, or text held back
    because it might begin a stop string).
    """

    text: str
    token_id: int
    completion_tokens: int
    """Tokens generated so far for this request, this one included."""
    finish_reason: FinishReason | None = None


@dataclass
class EngineStats:
    """Counters an engine keeps; read by /metrics and the readiness probe.

    Written by the engine thread only; readers may see a value one step old.
    """

    running: int = 0
    """Sequences in the batch (prefilling or decoding)."""
    waiting: int = 0
    """Sequences accepted but not yet admitted to the batch."""
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    decode_steps_total: int = 0
    """Batched forward passes that produced tokens; tokens/steps > 1 means batching."""
    requests_finished_total: dict[str, int] = field(default_factory=dict)
    """By finish reason: 'stop', 'length', 'cancelled', 'error'."""


@dataclass(frozen=True)
class ModelInfo:
    """What the engine learned while loading its model."""

    path: str
    memory_bytes: int
    """Bytes of the model's parameters."""
    context_length: int | None
    """Longest sequence the model is configured for (prompt + completion), if known."""


class Engine(Protocol):
    """A running generation engine serving one model."""

    @property
    def stats(self) -> EngineStats: ...

    @property
    def healthy(self) -> bool:
        """False once the generation thread has died."""
        ...

    def submit(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        """Generate for `request`; the last event has a finish reason.

        Closing the iterator early (client gone) removes the request from the batch.
        Raises EngineError if the engine cannot run it.
        """
        ...
