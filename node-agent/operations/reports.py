"""`GET /v1/node`: who this node is, what it holds, how busy it is (a NodeReport).

Hardware is detected once (it does not change while the agent runs); free memory is
read on every report. Both read the OS, so they run off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from mlxpool import __version__
from mlxpool.agent.engine.interface import DeviceProbe
from mlxpool.agent.node import hardware
from mlxpool.agent.operations.manager import ModelManager
from mlxpool.agent.operations.staging import ModelCacheStore
from mlxpool.agent.serving.policies import SchedulingPolicies
from mlxpool.agentapi import NodeReport
from mlxpool.nodes import Hardware


def detect_hardware(probe: DeviceProbe | None) -> Hardware:
    """This machine, with its accelerator as MLX reports it (no probe: by the platform). Blocking."""
    if probe is None:
        return hardware.detect_hardware()
    accelerator = probe.accelerator()
    return hardware.detect_hardware(accelerator.kind.value, accelerator.device_name, accelerator.memory_bytes)


def memory_readings(probe: DeviceProbe | None) -> tuple[int | None, int | None]:
    """(free memory, bytes MLX holds on its device): free memory is the device's on a discrete
    GPU (where the weights and KV live), else the host's. Blocking."""
    if probe is None:
        return hardware.free_memory_bytes(), None
    accelerator, used = probe.accelerator(), probe.memory().held_bytes
    if accelerator.discrete and accelerator.memory_bytes:
        return hardware.device_free_bytes(accelerator.memory_bytes, used), used
    return hardware.free_memory_bytes(), used


def model_memory_bytes(probe: DeviceProbe | None) -> int:
    """The memory models are held in: the device's on a discrete GPU, else the host's. Blocking."""
    if probe is None:
        return hardware.physical_memory_bytes()
    accelerator = probe.accelerator()
    if accelerator.discrete and accelerator.memory_bytes:
        return accelerator.memory_bytes
    return hardware.physical_memory_bytes()


@dataclass(frozen=True)
class NodeIdentity:
    name: str
    """The InferenceNode name (the host name when the agent does not register)."""
    endpoint: Callable[[], str]
    """The URL others reach this agent at (known once the socket is bound)."""


class NodeReporter:
    def __init__(self, identity: NodeIdentity, manager: ModelManager, cache: ModelCacheStore,
                 policies: SchedulingPolicies | None = None, probe: DeviceProbe | None = None) -> None:
        self._identity = identity
        self.probe = probe
        self.policies = policies or SchedulingPolicies()
        """The pools' scheduling policies per model (`PUT /v1/node/scheduling/{model}`)."""
        self._manager = manager
        self._cache = cache
        self._hardware: Hardware | None = None

    async def hardware(self) -> Hardware:
        if self._hardware is None:
            self._hardware = await asyncio.to_thread(detect_hardware, self.probe)
        return self._hardware

    async def report(self) -> NodeReport:
        hw = await self.hardware()
        free, used = await asyncio.to_thread(memory_readings, self.probe)
        views = self._manager.weight_views()
        # mincore over every array's pages: off the event loop.
        residency = await asyncio.to_thread(lambda: {name: view.residency() for name, view in views.items()})
        return NodeReport(
            name=self._identity.name, endpoint=self._identity.endpoint(), hardware=hw,
            max_models=self._manager.capacity.max_models, free_memory_bytes=free, device_memory_used_bytes=used,
            models=self._manager.states(residency), cache=self._cache.entries(), queue=self._manager.queue(),
            agent_version=__version__, scheduling=self.policies.applied(), prefetches=self._manager.prefetches(),
            shared_tensor_bytes_saved=self._manager.shared_tensor_bytes_saved(),
        )
