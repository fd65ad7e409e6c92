"""The agent process from start to exit: the composition root.

Order of events: bind the socket and serve HTTP (`/health` answers, `/ready` says
503) → open the model cache and load and warm the command line's model, if any,
through the model manager (`operations`) → ready (one log line with the
URL: `agent ready url=http://HOST:PORT model=NAME`) → register the InferenceNode and
beat → on SIGTERM/SIGINT: `/ready` 503 and `status.ready=false` at once, new requests
get 503, in-flight requests finish (up to the drain timeout) → HTTP stops → engine
stops → exit 0. A second signal skips the wait.

uvicorn's own signal handling is replaced: it re-raises the signal after shutdown
(so the process would die by SIGTERM, not exit 0) and closes the listener before
anyone can observe `/ready` turning 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import uvicorn

from mlxpool.agent.config import RuntimeConfig, WeightManagement
from mlxpool.agent.engine.interface import (
    Accelerator,
    DenseCopyPolicy,
    DeviceMemory,
    DeviceProbe,
    EngineConfig,
    LoadOptions,
)
from mlxpool.agent.engine.memory import MemoryBooks, MemoryPolicy
from mlxpool.agent.http.app import create_app
from mlxpool.agent.http.auth import CredentialReloader, Credentials
from mlxpool.agent.http.metrics import AgentMetrics
from mlxpool.agent.http.operations import ops_router
from mlxpool.agent.node import memoryinfo
from mlxpool.agent.node.nodeinfo import default_node_name, node_spec, node_status
from mlxpool.agent.operations.assembly import Operations, StatusNudger
from mlxpool.agent.operations.manager import ManagedEngine
from mlxpool.agent.operations.reports import memory_readings
from mlxpool.agent.operations.weights import status_residency
from mlxpool.agent.serving.dataplane import DataPlane, DataPlaneSettings
from mlxpool.agent.serving.lifecycle import Lifecycle, Phase
from mlxpool.agent.serving.policies import SchedulingPolicies
from mlxpool.agent.serving.promptcache import PromptCache
from mlxpool.agent.serving.repository import ModelRepository
from mlxpool.agent.serving.signals import status_decode_rate
from mlxpool.agent.serving.usage import UsageCounts
from mlxpool.agentapi import ModelPhase, ModelTier
from mlxpool.httpguards import SizeLimits
from mlxpool.nodes import LoadedModel, NodeStatus, WarmupProgress
from mlxpool.resources import NODE_LEASE_NAMESPACE

if TYPE_CHECKING:  # imported when used: MLX and the Kubernetes client are heavy
    from mlxpool.agent.engine.generation import BatchEngine
    from mlxpool.agent.node.registration import NodeRegistrar

log = logging.getLogger(__name__)

T = TypeVar("T")

FINAL_STATUS_TIMEOUT_S = 5.0
MEMORY_WATCH_SECONDS = 0.25
"""How often the OS's available memory is read for the engines' admission decisions."""
ENGINE_MODULE = "mlxpool.agent.engine.generation"
"""Imported off the loop before the first engine is made (`_import_engine`)."""


@dataclass(frozen=True)
class RegistrationConfig:
    """Where and how this agent registers its InferenceNode."""

    kubeconfig: str
    node_name: str
    labels: dict[str, str] = field(default_factory=dict)
    advertise_url: str | None = None
    """URL the operator and routers use to reach this agent; the bound URL if unset."""
    heartbeat_interval: float = 10.0
    """Seconds between renewals of the node Lease (the status is written when it changes)."""
    lease_namespace: str = NODE_LEASE_NAMESPACE


@dataclass(frozen=True)
class AgentConfig:
    model_path: Path | None
    """The model served from the start; None: the agent starts empty (the operations API loads models)."""
    model_name: str | None
    """The name clients put in `"model"`; defaults to the model directory's name."""
    host: str = "127.0.0.1"
    port: int = 8100
    """0 picks a free port; the ready log line names the real one."""
    drain_timeout: float = 30.0
    """Seconds a SIGTERM waits for in-flight requests before exiting anyway."""
    registration: RegistrationConfig | None = None
    log_level: str = "INFO"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """The runtime file + environment + command-line overrides, validated."""
    credentials: Credentials = field(default_factory=Credentials, repr=False)
    """API keys and the ops token, read from `runtime.auth`'s files or the environment."""

    @property
    def max_tokens_default(self) -> int:
        return self.runtime.serving.max_tokens_default

    @property
    def max_running(self) -> int:
        return self.runtime.serving.decode_concurrency


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling; `listening` is set once it serves."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # AgentRuntime handles signals itself

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.listening.set()


class AgentRuntime:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.lifecycle = Lifecycle()
        self.models = ModelRepository(UsageCounts(config.runtime.multi_model.usage_half_life_seconds))
        self.probe = device_probe()
        self.metrics = AgentMetrics(self.models, self.lifecycle, self.probe)
        # ---- the prompt cache beyond the engines: shared with other agents through Redis, if set ----
        serving = config.runtime.serving
        self.prompt_cache = PromptCache.from_settings(
            config.runtime.distributed_cache,
            local_entries=serving.prompt_cache_entries if serving.prompt_cache_bytes else 0)
        if (collector := self.prompt_cache.collector()) is not None:
            self.metrics.registry.register(collector)
        limits = config.runtime.limits
        settings = DataPlaneSettings(serving.max_tokens_default, config.runtime.priority_scheduling, limits)
        self.policies = SchedulingPolicies(config.runtime.priority_scheduling)
        self.dataplane = DataPlane(self.models, self.lifecycle, settings, observer=self.metrics,
                                   policies=self.policies)
        # ---- operations API (/v1/node): model manager and model cache ----
        self._registrar: NodeRegistrar | None = None
        self._status_nudger = StatusNudger(self._write_status_now)  # a load/unload shows at once
        reg = config.registration
        self.operations = Operations.build(
            probe=self.probe, repository=self.models, lifecycle=self.lifecycle, prompt_cache=self.prompt_cache,
            make_engine=self.make_engine, multi_model=config.runtime.multi_model,
            weights=config.runtime.weight_management, node_name=reg.node_name if reg else default_node_name(),
            endpoint=lambda: (reg.advertise_url if reg and reg.advertise_url else None) or self.url or "",
            on_change=self._status_nudger.nudge, policies=self.policies, on_switch=self.metrics.model_switched,
        )
        if config.runtime.multi_model.load_on_request:
            self.dataplane.load_on_request = self.operations.manager.load_for_request
        self.operations.manager.before_engine = self._import_engine
        if self.operations.manager.tensor_share is not None:
            self.metrics.watch_shared_tensors(self.operations.manager.shared_tensor_bytes_saved)
        self._engine_import: asyncio.Task[object] | None = None
        # ----
        self.app = create_app(self.dataplane, self.metrics, config.credentials,
                              ops=ops_router(self.operations.manager, self.operations.cache,
                                             self.operations.reporter),
                              limits=SizeLimits(limits.max_body_bytes, limits.max_header_bytes),
                              publish_signals=config.runtime.horizontal_scaling.publish_signals)
        self.url: str | None = None
        # ---- the node's memory books (engine.memory), shared by every engine ----
        self.memory = _memory_books(config.runtime.weight_management)
        self._available_memory: int | None = None
        """The OS's available bytes, refreshed off the loop (`_watch_memory`); engines read it."""
        self._signals = 0
        self._background: list[asyncio.Task[object]] = []
        auth = config.runtime.auth
        self._reloader = CredentialReloader(self.app, auth.api_key_file, auth.ops_token_file, auth.reload_seconds)

    async def run(self) -> int:
        """Serve until signalled; the process exit code."""
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        if self.config.model_path is not None:  # a model to load at once: import its engine meanwhile
            # (MLX, mlx-lm, transformers: ~2-3 s on the CPU machines) while the server starts and
            # the model's content identity is hashed, instead of after both.
            self._background.append(asyncio.create_task(self._import_engine(), name="engine-preimport"))
        sock = _bind(self.config.host, self.config.port)
        auth = self.config.runtime.auth
        tls = auth.tls_cert_file is not None
        self.url = _url(self.config.host, sock.getsockname()[1], "https" if tls else "http")
        # The drain already waits for in-flight requests; uvicorn then only closes what is left.
        server = _Server(uvicorn.Config(
            self.app, lifespan="off", log_config=None, access_log=False, timeout_graceful_shutdown=1,
            # uvicorn closes idle connections after 5 s: the operator probes a watched agent of a
            # large fleet every ~20 s, and each probe would connect (and handshake TLS) afresh.
            timeout_keep_alive=75,
            h11_max_incomplete_event_size=self.config.runtime.limits.max_header_bytes,  # where h11 parses
            ssl_certfile=str(auth.tls_cert_file) if tls else None,
            ssl_keyfile=str(auth.tls_key_file) if auth.tls_key_file is not None else None,
        ))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, server, sig)
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="http-server")
        if self._reloader.watching and self._reloader.interval > 0:
            self._background.append(asyncio.create_task(self._reloader.run(), name="secret-reload"))
        try:
            listening = asyncio.ensure_future(server.listening.wait())
            try:
                await asyncio.wait({listening, serving}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                listening.cancel()
            log.info("agent listening url=%s", self.url)
            if self.memory is not None:
                self._available_memory = await asyncio.to_thread(memoryinfo.available_bytes)
                self._background.append(asyncio.create_task(self._watch_memory(), name="memory-watch"))
            if not await self._load_model():
                return 1
            if self.lifecycle.phase is Phase.READY:
                log.info("agent ready url=%s model=%s", self.url, self.config.model_name or "-")
                await self._register()
                await self._unless_stopped(asyncio.shield(serving))
            await self._drain()
        finally:
            server.should_exit = True
            await asyncio.gather(serving, return_exceptions=True)
            await self._shut_down()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("agent stopped url=%s", self.url)
        return 0

    def engine_config(self) -> EngineConfig:
        """How every engine of this agent batches (the runtime file's `serving` and tier limits)."""
        serving, scheduling = self.config.runtime.serving, self.config.runtime.priority_scheduling
        weights = self.config.runtime.weight_management
        return EngineConfig(
            max_running=serving.decode_concurrency,
            prefill_batch_size=serving.prefill_concurrency,
            prefill_step_size=serving.prefill_step_size,
            prefill_token_budget=serving.prefill_token_budget,
            prompt_cache_bytes=serving.prompt_cache_bytes,
            prompt_cache_entries=serving.prompt_cache_entries,
            max_waiting={p: t.max_waiting for p, t in scheduling.tiers.items() if t.max_waiting is not None},
            aging_s=scheduling.aging_seconds, edf_slack_s=scheduling.edf_slack_ms / 1000,
            tenant_weights=dict(scheduling.tenant_weights), max_paused=scheduling.max_paused,
            warmup_tokens=4 if serving.warmup else 0,
            stream_interval_s=serving.stream_interval_ms / 1000,
            load=LoadOptions(native=weights.use_mmap, pin_policy=weights.pin_policy,
                             pin_budget_bytes=weights.pin_budget_bytes, prefetch_threads=weights.prefetch_threads,
                             prefetch_depth=weights.prefetch_depth,
                             dense_copies=DenseCopyPolicy(weights.dense_copies)),
            memory_wait_s=weights.memory_wait_seconds,
            mlx_cache_limit_bytes=weights.mlx_cache_limit_bytes,
        )

    # ---- operations API wiring: engines for the model manager, prompt status writes ----

    async def _import_engine(self) -> None:
        """Import the engine module (MLX, mlx-lm, transformers) on a thread, once: imported
        on the loop by `make_engine`, it stalled an agent started without a model for
        1.4-2.9 s at its first load, so the operator's health probes timed out and pools
        moved off the node that was loading their model (and back)."""
        if ENGINE_MODULE in sys.modules:
            return
        if self._engine_import is None:
            self._engine_import = asyncio.create_task(asyncio.to_thread(importlib.import_module, ENGINE_MODULE),
                                                      name="engine-import")
        await asyncio.shield(self._engine_import)

    def make_engine(
        self, path: str, name: str, *, warm: bool, identity: str, on_weights_loaded: Callable[[], None],
        base: ManagedEngine | None = None, tensors: Mapping[str, str] | None = None,
    ) -> BatchEngine:
        """The model manager's engine factory: every model, the command line's included, is built here."""
        from mlxpool.agent.engine.generation import BatchEngine  # imports MLX

        config = self.engine_config() if warm else replace(self.engine_config(), warmup_tokens=0)
        publisher = self.prompt_cache.publisher(identity, asyncio.get_running_loop())
        if base is not None and not isinstance(base, BatchEngine):
            raise TypeError(f"an adapter's base must be a BatchEngine, not {type(base).__name__}")
        return BatchEngine(path, config, name=name, on_weights_loaded=on_weights_loaded, kv_publisher=publisher,
                           memory=self.memory, available_memory=lambda: self._available_memory, base=base,
                           tensor_share=self.operations.manager.tensor_share, tensor_digests=tensors)

    async def _write_status_now(self) -> None:
        if self._registrar is not None:
            await self._registrar.beat()

    async def _load_model(self) -> bool:
        """Open the model cache, then load and warm the command line's model (if any) through the
        model manager; False if either failed (a signal during loading is not a failure)."""
        self.lifecycle.set_phase(Phase.LOADING)
        try:
            await self.operations.start()
        except OSError as exc:
            log.error("model cache failed to open error=%s", exc)
            return False
        if self.config.model_path is not None:
            state = await self._unless_stopped(self.operations.load_initial(
                self.config.model_name or self.config.model_path.name, self.config.model_path))
            if state is None:  # signalled while loading
                return True
            if state.phase is not ModelPhase.READY:
                log.error("model failed to load path=%s error=%s", self.config.model_path, state.message)
                return False
        self.lifecycle.set_phase(Phase.READY)
        return True

    async def _watch_memory(self) -> None:
        while True:
            await asyncio.sleep(MEMORY_WATCH_SECONDS)
            self._available_memory = await asyncio.to_thread(memoryinfo.available_bytes)

    async def _register(self) -> None:
        reg = self.config.registration
        if reg is None:
            return
        from mlxpool.agent.node.registration import NodeRegistrar  # imports the Kubernetes client

        hw = await self.operations.reporter.hardware()
        spec = node_spec(reg.advertise_url or self.url or "", hw, max_models=self.config.runtime.multi_model.max_models)
        self._registrar = NodeRegistrar(reg.kubeconfig, reg.node_name, reg.labels, spec, self._node_status,
                                        interval=reg.heartbeat_interval, lease_namespace=reg.lease_namespace)
        self._background.append(asyncio.create_task(self._registrar.run(), name="heartbeat"))

    async def _drain(self) -> None:
        self.lifecycle.set_phase(Phase.DRAINING)
        if self._registrar is not None:  # tell the operator at once, without waiting for it
            self._background.append(asyncio.create_task(self._registrar.beat(), name="heartbeat-draining"))
        await self._unless_forced(self.lifecycle.drain(self.config.drain_timeout))

    async def _shut_down(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._status_nudger.close()
        await self.operations.close()  # stops every engine
        await self.prompt_cache.close()
        self.lifecycle.set_phase(Phase.STOPPED)
        if self._registrar is not None:  # last word: not ready
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._registrar.beat(), FINAL_STATUS_TIMEOUT_S)
            await self._registrar.close()

    def _on_signal(self, server: uvicorn.Server, sig: int) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            log.info("shutdown requested signal=%s in_flight=%d", name, self.lifecycle.in_flight)
            self._stop.set()
        else:
            log.warning("second signal: exiting without waiting signal=%s", name)
            self._force.set()
            server.force_exit = True

    async def _unless_stopped(self, work: Awaitable[T]) -> T | None:
        return await _race(work, self._stop)

    async def _unless_forced(self, work: Awaitable[T]) -> T | None:
        return await _race(work, self._force)

    async def _node_status(self) -> NodeStatus:
        free, used = await asyncio.to_thread(memory_readings, self.probe)
        ready, _ = self.dataplane.readiness()
        states = self.operations.manager.states()
        parked = {s.name for s in states if s.tier is ModelTier.PARKED}
        bases = {s.name: s.base for s in states if s.base is not None}
        switches = {s.name: (s.last_switch_seconds, s.last_switch_from) for s in states
                    if s.last_switch_seconds is not None and s.last_switch_from is not None}
        models = list(self.models.all())
        # Off the loop: residency is mincore over every array's pages.
        residency = await asyncio.to_thread(lambda: [status_residency(m.info.weights) for m in models])
        loaded = [LoadedModel(name=m.name, path=m.info.path, memory_bytes=m.info.memory_bytes, identity=m.identity,
                              decode_tokens_per_second=status_decode_rate(m.engine.stats),
                              tier="parked" if m.name in parked else "active", weights=where,
                              base=bases.get(m.name), **status_switch(switches.get(m.name)))
                  for m, where in zip(models, residency, strict=True)]
        warmup = [WarmupProgress(model=name, shapes_done=done, shapes_total=total)
                  for name, done, total in self.operations.manager.warming()]
        status = node_status(ready, loaded, free, device_memory_used_bytes=used, warmup=warmup)
        status.shared_tensor_bytes_saved = self.operations.manager.shared_tensor_bytes_saved()
        return status


def status_switch(switch: tuple[float | None, ModelTier | None] | None) -> dict[str, Any]:
    """A model's last switch into an engine, as `LoadedModel` fields (none before the first)."""
    if switch is None or switch[0] is None or switch[1] is None:
        return {}
    return {"last_switch_seconds": switch[0], "last_switch_from": switch[1].value}


def device_probe() -> DeviceProbe:
    """Reads of the device through the engine's MLX side, imported on first use."""
    def accelerator() -> Accelerator:
        from mlxpool.agent.engine import device

        return device.accelerator()

    def memory() -> DeviceMemory:
        from mlxpool.agent.engine import device

        return device.memory()

    return DeviceProbe(accelerator, memory)


async def _race(work: Awaitable[T], event: asyncio.Event) -> T | None:
    """`work`'s result, or None if `event` is set first (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
    return task.result() if not task.cancelled() else None


def _memory_books(weights: WeightManagement) -> MemoryBooks | None:
    """The node's memory books from `weight_management`; None when memory admission is off."""
    if not weights.memory_admission:
        return None
    capacity = weights.memory_capacity_bytes or memoryinfo.capacity_bytes()
    policy = MemoryPolicy(capacity_bytes=capacity, headroom_bytes=weights.memory_headroom_bytes,
                          pressure_free_bytes=weights.memory_pressure_free_bytes,
                          long_request_bytes=weights.long_request_kv_bytes)
    return MemoryBooks(policy)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
