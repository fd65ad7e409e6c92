"""The InferenceNode shape: what an agent registers about itself.

The agent writes `spec` (who and where it is) when it registers and `status` (what it
serves, when it last beat) on every heartbeat; the operator only reads both. Keys are
camelCase on the wire, as in every Kubernetes object.

Byte counts go with a human copy (`memory: "24.0 GiB"`): a CRD's printer columns
cannot compute, so `kubectl get inode` shows what the object holds, and 25275990016
reads as nothing to a person.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field
from pydantic.alias_generators import to_camel


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def gib(n: int) -> str:
    """Bytes as the printer columns show them: `23.5 GiB`."""
    return f"{n / 2**30:.1f} GiB"


class Hardware(_Wire):
    chip: str = Field(description="e.g. 'Apple M2 Ultra', or the CPU model off a Mac.")
    memory_bytes: int = Field(ge=0, description="Unified (or system) memory.")
    cpu_cores: int = Field(ge=1)
    accelerator: str = Field(description="'metal' on Apple Silicon, 'cpu' elsewhere.")
    platform: str = Field(description="e.g. 'darwin-arm64', 'linux-x86_64'.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def memory(self) -> str:
        """`memory_bytes` for people (the printer column)."""
        return gib(self.memory_bytes)


class NodeSpec(_Wire):
    endpoint: str = Field(description="Base URL of the agent's HTTP API.")
    hardware: Hardware
    max_models: int = Field(default=1, ge=1, description="Models the agent may hold at once.")


class LoadedModel(_Wire):
    name: str
    path: str | None = None
    memory_bytes: int | None = None
    identity: str | None = Field(default=None, description="Content identity (hash of weights, tokenizer, config).")


class NodeStatus(_Wire):
    ready: bool = False
    models: list[LoadedModel] = Field(default_factory=list)
    heartbeat_time: datetime | None = None
    free_memory_bytes: int | None = None
    agent_version: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def free_memory(self) -> str | None:
        """`free_memory_bytes` for people (the printer column)."""
        return None if self.free_memory_bytes is None else gib(self.free_memory_bytes)
