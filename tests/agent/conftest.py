"""Node agent tests.

Real here: the tiny MLX model (`tiny_model`, made by `mlxpool.tinymodel`), the engine
(mlx-lm's BatchGenerator on MLX's CPU backend) and, for the HTTP tests, whole agent
processes (`python -m mlxpool agent --port 0`) on 127.0.0.1, stopped after.
Faked here: only in the data-plane and readiness unit tests, an in-memory `FakeEngine`
that replays scripted token events (no MLX), served as the model manager serves real
engines (`ServedEngine`: counted in flight, local-only prompt cache), so response
shaping, validation and phases are tested alone and fast. Registration against the real API server lives in
tests/integration/.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlxpool.agent.engine.interface import (
    EngineError,
    EngineStats,
    GenerationRequest,
    ModelInfo,
    TokenEvent,
    TokenLogprob,
)
from mlxpool.dev import components
from mlxpool.dev.processes import Process


def start_agent(model_path: Path, extra_args: Sequence[str] = (), log_dir: Path | None = None,
                name: str = "agent", timeout: float = 60.0) -> Process:
    """Start `mlxpool agent --port 0` on the model; returns once its ready line names the URL.

    The result has `.url`, `.pid`, `.popen`, `.log_text()` and `.stop()` (SIGTERM, then
    SIGKILL); it is `mlxpool.dev.components.start_agent` with a test-friendly signature.
    """
    return components.start_agent(model_path, log_dir or model_path.parent / "logs", name=name,
                                  extra=list(extra_args), timeout=timeout)


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator:
    """Start agents for one test (`agent_factory(model, [args])`); all stopped after."""
    started: list[Process] = []

    def start(model_path: Path, extra_args: Sequence[str] = ()) -> Process:
        agent = start_agent(model_path, extra_args, tmp_path / "logs", name=f"agent-{len(started)}")
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop(10)


@pytest.fixture(scope="module")
def agent(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """One agent serving the tiny model, shared by a test module (tests must not stop it)."""
    process = start_agent(tiny_model, ["--max-tokens-default", "16"], tmp_path_factory.mktemp("agent"))
    yield process
    process.stop(10)


# ---- fakes for unit tests ----


@dataclass
class FakeEngine:
    """Replays `script` (texts, then a finish) for every request; records requests.

    `fail_with` fails a request before its first event (a message: EngineError; or an
    exception, e.g. the agent's QueueFull); `fail_after` fails it after that many
    events. Requests asking for log-probabilities get -1.0 per token and, as
    alternatives, the token text repeated.
    """

    script: list[str] = field(default_factory=lambda: ["Hel", "lo", " world"])
    finish: str = "length"
    fail_with: str | Exception | None = None
    fail_after: int | None = None
    cached_tokens: int = 0
    handed_over_together: bool = False
    """Mark every event but the last `more`, as the engine does for events it holds."""
    healthy: bool = True
    requests: list[GenerationRequest] = field(default_factory=list)
    closed_early: list[str] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)

    refuse_with: Exception | None = None
    """Raised by `refuse_early` (the data plane's check before tokenizing)."""
    refused_estimates: list[int] = field(default_factory=list)

    def refuse_early(self, priority: object, terms: object, deadline: float | None, prompt_tokens: int) -> None:
        self.refused_estimates.append(prompt_tokens)
        if self.refuse_with is not None:
            raise self.refuse_with

    async def submit(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        self.requests.append(request)
        if self.fail_with:
            raise self.fail_with if isinstance(self.fail_with, Exception) else EngineError(self.fail_with)
        done = False
        top = request.sampling.logprobs
        try:
            for i, text in enumerate(self.script, start=1):
                if self.fail_after is not None and i > self.fail_after:
                    done = True
                    raise EngineError("the engine crashed: scripted")
                done = i == len(self.script)
                await asyncio.sleep(0)
                logprob = None if top is None else TokenLogprob(text, -1.0, tuple((text, -1.0) for _ in range(top)))
                yield TokenEvent(text, token_id=i, completion_tokens=i, finish_reason=self.finish if done else None,
                                 logprob=logprob, cached_tokens=self.cached_tokens,
                                 more=self.handed_over_together and not done)
        finally:
            if not done:
                self.closed_early.append(request.request_id)


class FakeTokenizer:
    """Characters as tokens; a chat template of 'role: content' lines."""

    has_chat_template = False

    def __len__(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return [min(ord(c), 255) for c in text]

    def apply_chat_template(self, messages, **kwargs):  # pragma: no cover - not used without a template
        raise AssertionError


FAKE_MODEL_INFO = ModelInfo(path="/models/fake", memory_bytes=1234, context_length=64)


@dataclass
class FakeAgent:
    """A data plane over one `FakeEngine` model named 'fake', already READY.

    `engine` is the fake itself; the repository serves it wrapped, as the model manager
    serves every engine."""

    engine: FakeEngine
    lifecycle: object
    models: object
    plane: object
    encoder: object


@pytest.fixture
def fake_agent() -> Iterator[FakeAgent]:
    from mlxpool.agent.engine.prompts import PromptEncoder
    from mlxpool.agent.serving.dataplane import DataPlane, DataPlaneSettings
    from mlxpool.agent.serving.lifecycle import Lifecycle, Phase
    from mlxpool.agent.serving.promptcache import PromptCache
    from mlxpool.agent.serving.repository import ModelRepository, ServedModel
    from mlxpool.agent.serving.servedengine import ServedEngine

    engine = FakeEngine()
    encoder = PromptEncoder(FakeTokenizer())
    lifecycle = Lifecycle()
    models = ModelRepository()
    served = ServedEngine(engine, "fake", "fake-identity", lifecycle, PromptCache())
    models.add(ServedModel("fake", served, encoder, FAKE_MODEL_INFO, created=1700000000))
    lifecycle.set_phase(Phase.READY)
    plane = DataPlane(models, lifecycle, DataPlaneSettings(default_max_tokens=8))
    yield FakeAgent(engine, lifecycle, models, plane, encoder)
    encoder.close()
