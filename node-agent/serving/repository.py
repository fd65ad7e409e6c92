"""The models this agent serves, by the name clients use in `"model"`.

The registry the data plane reads: `get(name)` for each request (which also marks
the model as just used and counts the use: what eviction goes by) and `all()` for
`/v1/models`, metrics and the InferenceNode status. The model manager
(`operations.manager`) writes it: a model appears in `all()` once it is ready and
leaves when its unload begins. While a model is on its way in or out (its
`ModelPhase` is loading, warming or unloading), `get` answers 503 naming the phase
(`errors.ModelLoading`, `errors.ModelUnloading`, with Retry-After) rather than 404, so
a router retries elsewhere instead of concluding the model does not exist; we answer
at once rather than hold the request, since a load can take minutes.

A `ServedModel` bundles what the data plane needs for one model: its engine (the
manager's `servedengine.ServedEngine`), its prompt encoder, and facts for `/v1/models`
and the InferenceNode status.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mlxpool.agent.engine.interface import Engine, ModelInfo
from mlxpool.agent.engine.prompts import PromptEncoder
from mlxpool.agent.errors import ModelLoading, ModelNotFound, ModelUnloading
from mlxpool.agent.serving.usage import UsageCounts
from mlxpool.agentapi import ModelPhase


@dataclass
class ServedModel:
    name: str
    engine: Engine
    encoder: PromptEncoder
    info: ModelInfo
    created: int
    """Unix time the model became servable."""
    identity: str | None = None
    """Content identity (`operations.identity`)."""
    last_used: float = field(default_factory=time.monotonic)
    """Monotonic time of the last request that named it (or of becoming servable)."""


class ModelRepository:
    def __init__(self, usage: UsageCounts | None = None) -> None:
        self.usage = usage or UsageCounts()
        """How often each name was asked for (what cost-aware eviction weighs), kept across unloads."""
        self._models: dict[str, ServedModel] = {}
        self._transitions: dict[str, ModelPhase] = {}
        """Names on their way in (loading, warming) or out (unloading), not servable."""

    def add(self, model: ServedModel) -> None:
        if model.name in self._models:
            raise ValueError(f"model {model.name!r} is already served")
        self._transitions.pop(model.name, None)
        self._models[model.name] = model

    def remove(self, name: str) -> ServedModel | None:
        return self._models.pop(name, None)

    def mark(self, name: str, phase: ModelPhase | None) -> None:
        """Record that `name` is loading, warming or unloading (None: it is neither)."""
        if phase is None:
            self._transitions.pop(name, None)
        else:
            self._transitions[name] = phase

    def get(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is not None:
            model.last_used = time.monotonic()
            self.usage.used(name, model.last_used)
            return model
        phase = self._transitions.get(name)
        if phase is ModelPhase.UNLOADING:
            raise ModelUnloading(f"model {name!r} is being unloaded from this node", param="model")
        if phase is not None:
            raise ModelLoading(f"model {name!r} is {phase.value} on this node; retry shortly", param="model")
        served = ", ".join(sorted(self._models)) or "none"
        raise ModelNotFound(f"model {name[:256]!r} is not served here (served: {served})", param="model")

    def find(self, name: str) -> ServedModel | None:
        """The served model, without counting it as used."""
        return self._models.get(name)

    def all(self) -> list[ServedModel]:
        return list(self._models.values())

    def healthy(self) -> bool:
        """Every served engine is running (true with none: an empty agent waits to be told what to load)."""
        return all(m.engine.healthy for m in self._models.values())
