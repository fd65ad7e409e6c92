"""The InferenceNode shape: what an agent registers about itself, and its node Lease.

The agent writes `spec` (who and where it is) when it registers and `status` (what it
serves) when that changes; it renews a `coordination.k8s.io/v1` Lease of the node's
name every heartbeat interval, which is the heartbeat the operator reads (the status's
`heartbeatTime` counts too: the later of the two). The operator only reads all three.
Keys are camelCase on the wire, as in every Kubernetes object.

Byte counts go with a human copy (`memory: "24.0 GiB"`): a CRD's printer columns
cannot compute, so `kubectl get inode` shows what the object holds, and 25275990016
reads as nothing to a person.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field
from pydantic.alias_generators import to_camel

from mlxpool.resources import LABEL_NODE_LEASE


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
    accelerator: str = Field(description="What MLX computes on: 'metal', 'cuda' or 'cpu'.")
    platform: str = Field(description="e.g. 'darwin-arm64', 'linux-x86_64'.")
    device_name: str | None = Field(default=None, description="The accelerator as MLX names it, e.g. 'NVIDIA H200'.")
    device_memory_bytes: int | None = Field(
        default=None, ge=0, description="The accelerator's own memory (unified memory on Metal); unset on the CPU.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def memory(self) -> str:
        """`memory_bytes` for people (the printer column)."""
        return gib(self.memory_bytes)


class NodeSpec(_Wire):
    endpoint: str = Field(description="Base URL of the agent's HTTP API.")
    hardware: Hardware
    max_models: int = Field(default=1, ge=1, description="Models the agent may hold at once.")


class WeightsResidency(_Wire):
    """Where a loaded model's weights are (bytes; the agent rounds to 2 significant figures so
    a page or two moving does not make every heartbeat a status write)."""

    total_bytes: int = Field(ge=0, description="All the model's weight bytes.")
    resident_bytes: int = Field(ge=0, description="In physical memory (mincore over the arrays' pages).")
    pinned_bytes: int = Field(ge=0, description="Locked in memory (mlock, by the pin policy and budget).")
    mapped_bytes: int = Field(ge=0, description="Still backed by the model's files (0 once copied into MLX).")


class LoadedModel(_Wire):
    name: str
    path: str | None = None
    memory_bytes: int | None = None
    identity: str | None = Field(default=None, description="Content identity (hash of weights, tokenizer, config).")
    decode_tokens_per_second: float | None = Field(
        default=None, ge=0, le=10_000_000, description="Decode tok/s the engine measured (unset: not measured yet).")
    tier: Literal["active", "parked"] | None = Field(
        default=None,
        description="active: in an engine; parked: weights in memory, engine released (a request wakes it).")
    weights: WeightsResidency | None = Field(default=None, description="Where the weights are (unset: not measured).")
    base: str | None = Field(default=None, max_length=253,
                             description="For a LoRA adapter: the model it runs over, sharing its weights.")
    last_switch_seconds: float | None = Field(
        default=None, ge=0, description="How long its last switch into an engine took (a wake or a load).")
    last_switch_from: Literal["parked", "page_cache", "disk"] | None = Field(
        default=None, description="Where that switch came from: parked (a wake), page_cache or disk (a load).")


class WarmupProgress(_Wire):
    model: str
    shapes_done: int = Field(ge=0)
    shapes_total: int = Field(ge=0)


class NodeStatus(_Wire):
    ready: bool = False
    models: list[LoadedModel] = Field(default_factory=list)
    heartbeat_time: datetime | None = None
    free_memory_bytes: int | None = None
    device_memory_used_bytes: int | None = None
    """Bytes MLX holds on the accelerator (live arrays and its buffer cache)."""
    warmup: list[WarmupProgress] = Field(default_factory=list)
    """Models still compiling their shapes before they serve."""
    agent_version: str | None = None
    shared_tensor_bytes_saved: int | None = Field(
        default=None, ge=0,
        description="Weight bytes not in memory because loaded models hold equal tensors as one copy.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def free_memory(self) -> str | None:
        """`free_memory_bytes` for people (the printer column)."""
        return None if self.free_memory_bytes is None else gib(self.free_memory_bytes)

LEASE_RENEWALS_PER_DURATION = 4
"""A Lease is good for this many renewal intervals (kubelet: renew every 10 s, last 40 s)."""


def lease_duration_seconds(interval: float) -> int:
    return max(math.ceil(interval * LEASE_RENEWALS_PER_DURATION), 1)


def micro_time(moment: datetime) -> str:
    """A metav1.MicroTime (RFC 3339 with microseconds, UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_object(node: str, namespace: str, interval: float, now: datetime) -> dict[str, Any]:
    """The node Lease an agent creates (then renews by patching `spec.renewTime`)."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": node, "namespace": namespace, "labels": {LABEL_NODE_LEASE: "true"}},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": lease_duration_seconds(interval),
                 "renewTime": micro_time(now)},
    }


def lease_renewal(body: dict[str, Any]) -> tuple[str, datetime | None]:
    """(node name, last renewal) of a node Lease; ValueError names what is wrong."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a node Lease without a name")
    raw = spec.get("renewTime")
    if raw is None:
        return name, None
    if isinstance(raw, datetime):
        return name, raw if raw.tzinfo else raw.replace(tzinfo=UTC)
    try:
        moment = datetime.fromisoformat(str(raw))
    except ValueError as exc:
        raise ValueError(f"node Lease {name!r}: renewTime {raw!r} is not a time") from exc
    return name, moment if moment.tzinfo else moment.replace(tzinfo=UTC)
