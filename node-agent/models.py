"""The models this agent serves, by the name clients use in `"model"`.

A `ServedModel` bundles what the data plane needs for one model: its engine, its prompt
encoder, and facts for `/v1/models` and the InferenceNode status. The repository is the
seam the model manager (load/unload, eviction, per-model state machine) grows from; for
now it holds the one model given on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxpool.agent.engine.interface import Engine, ModelInfo
from mlxpool.agent.engine.prompts import PromptEncoder
from mlxpool.agent.errors import ModelNotFound


@dataclass
class ServedModel:
    name: str
    engine: Engine
    encoder: PromptEncoder
    info: ModelInfo
    created: int
    """Unix time the model became servable."""


class ModelRepository:
    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}

    def add(self, model: ServedModel) -> None:
        if model.name in self._models:
            raise ValueError(f"model {model.name!r} is already served")
        self._models[model.name] = model

    def remove(self, name: str) -> ServedModel | None:
        return self._models.pop(name, None)

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            served = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {name!r} is not served here (served: {served})", param="model") from None

    def all(self) -> list[ServedModel]:
        return list(self._models.values())

    def healthy(self) -> bool:
        return bool(self._models) and all(m.engine.healthy for m in self._models.values())
