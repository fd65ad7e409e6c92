"""The model manager: which models this node serves, each moved through its phases.

Per model a record with its own lock and one state machine:

    loading → warming → ready → unloading → (gone)
       └──────────┴─→ failed (kept, with its message, until unloaded or loaded again)

`load` answers at once: it decides admission (count and memory budget, evicting the
least recently used idle unpinned models when `eviction` allows; the pure policy is
`eviction.admit`), registers the record, and leaves the work to a task: wait for the
evicted models to go, start an engine (from the factory the runtime passes in, so
the CLI's model and loaded ones are built the same way), wrap it as the model's
served engine (`serving.servedengine`: its requests counted in flight by the agent's
lifecycle, their prompts looked up in the prompt cache), and add it to the
repository. `unload` takes the model out of the repository at once (new requests
get 503), waits for its in-flight requests (up to `unload_timeout`; not at all when
there are none), then stops the engine, which frees its memory.

Residency tiers (`agentapi.ModelTier`, with `Capacity.park`): a model that loses its
engine slot to another is parked, not unloaded: its engine is released (thread, batch,
KV caches) and its weights stay in memory; it is still served, and the first request
for it wakes it (`ServedEngine` asks `wake`), parking another if the slots are full.
Each wake and each load is timed and folded into a per-tier rate (parked, page cache,
disk: where the files were when the load began), which is what cost-aware eviction
prices a model's return at.

LoRA adapters (a load with `base`): the adapter's engine is built over the base model's
loaded weights, which it shares (`loading.load_adapter`: only the adapter's tensors are
new memory, and only they are counted); several adapters may run over one base, each
served under its own name, and a request naming one never reloads the base. A base with
adapters may be parked (its weights stay) but is never dropped out of memory; unloading
it unloads its adapters first. An adapter's content identity is its base's and its own
together (its KV never passes for the base's).

Repeating a call is safe: loading a model that is loading or ready from the same
source returns its state (a changed `pin` applies in place); another source under
the same name is a 409 (`ModelConflict`), and so is a model still unloading
(`UnloadInProgress`); a failed model is loaded afresh. What this module does not
do: HTTP (see `http.operations`), or fetching files (a `cache_key` is resolved to a
directory by the cache store).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mlxpool.agent.engine.interface import Engine, ModelInfo, WeightResidency, WeightsView
from mlxpool.agent.engine.tensorshare import TensorShare
from mlxpool.agent.errors import InvalidRequest, ModelLoadFailed, ModelLoading, ModelNotFound, ModelUnloading
from mlxpool.agent.operations import eviction, filetiers, identity, weights
from mlxpool.agent.operations.errors import MaxModelsReached, MemoryBudgetExceeded, ModelConflict, UnloadInProgress
from mlxpool.agent.serving.lifecycle import Lifecycle
from mlxpool.agent.serving.promptcache import PromptCache
from mlxpool.agent.serving.repository import ModelRepository, ServedModel
from mlxpool.agent.serving.servedengine import ServedEngine
from mlxpool.agent.serving.tokenizing import LanedPromptEncoder
from mlxpool.agentapi import (
    LoadModelRequest,
    ModelPhase,
    ModelState,
    ModelTier,
    PrefetchPhase,
    PrefetchRequest,
    PrefetchState,
    QueueReport,
)

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".npz", ".gguf")
LOAD_ON_REQUEST_OWNER = "load-on-request"
PREFETCHES_KEPT = 16
"""Prefetch states reported in `/v1/node` (the oldest go first)."""
"""The `owner` of loads a request made (`multi_model.load_on_request`)."""
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


class ManagedEngine(Engine, Protocol):
    """An engine the manager can start and stop (`BatchEngine` is one)."""

    tokenizer: Any

    async def start(self) -> ModelInfo:
        """Load (and warm, if the factory was asked to) the model; returns once it can serve."""
        ...

    async def stop(self) -> None:
        """Stop the engine's thread and release the model's memory."""
        ...

    async def park(self) -> None:
        """Release the engine (thread, batch, KV) but keep the weights in memory."""
        ...

    async def resume(self) -> ModelInfo:
        """Serve again over the parked weights."""
        ...


class EngineFactory(Protocol):
    def __call__(self, path: str, name: str, *, warm: bool, identity: str,
                 on_weights_loaded: Callable[[], None], base: ManagedEngine | None = None,
                 tensors: Mapping[str, str] | None = None) -> ManagedEngine:
        """A new, not yet started engine for the model of content identity `identity`;
        `on_weights_loaded` may be called from any thread once the weights are in memory and
        warm-up begins (engines that cannot tell skip it). `base`: `path` is a LoRA adapter
        over that engine's model (the manager passes it only for adapters). `tensors`: the
        identity's digest per safetensors tensor, to share equal tensors with other loaded
        models through the manager's `tensor_share` (passed only when there is one)."""
        ...


@dataclass(frozen=True)
class Capacity:
    max_models: int
    budget_bytes: int | None
    """Bytes of model weights allowed at once; None: not limited."""
    evict: bool = True
    order: eviction.Order = eviction.Order.COST
    keep_alive: float = 0.0
    """Seconds after its last use a model is not evicted (a load may set its own)."""
    default_load_bps: float = 1e9
    """Load rate assumed for a model's cost to bring back until a load has been measured."""
    unload_timeout: float = 30.0
    park: bool = False
    """A model that loses its engine slot is parked (weights kept in memory) rather than unloaded."""
    wake_timeout: float = 30.0
    load_on_request: bool = False
    """Requests may load a known model that is not loaded (`load_for_request`)."""
    request_sources: tuple[Path, ...] = ()
    """The directories models may be loaded on request from."""
    load_wait: float = 120.0
    """How long a request waits for the model it loads."""
    """How long a request for a parked model waits for an engine slot (all busy) before a 503."""
    default_wake_bps: float = 50e9
    """Wake rate assumed for a parked model until a wake has been measured."""


SwitchObserver = Callable[[ModelTier, float], None]
"""Told the seconds of every switch into an engine, by the tier it came from (metrics)."""


@dataclass(eq=False)
class _Record:
    name: str
    path: str
    cache_key: str | None
    warm: bool
    pinned: bool
    estimate_bytes: int
    owner: str | None = None
    identity: str | None = None
    keep_alive: float | None = None
    phase: ModelPhase = ModelPhase.LOADING
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    engine: ManagedEngine | None = None
    served: ServedModel | None = None
    memory_bytes: int | None = None
    load_time_seconds: float | None = None
    message: str | None = None
    task: asyncio.Task[None] | None = None
    admitted_at: float = field(default_factory=time.monotonic)
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when loading ends (ready or failed)."""
    tier: ModelTier = ModelTier.ACTIVE
    """ACTIVE (loading, or in an engine) or PARKED (weights in memory, no engine)."""
    waking: bool = False
    base: str | None = None
    """For a LoRA adapter: the loaded model whose weights it runs over."""
    last_switch: tuple[ModelTier, float] | None = None
    """Its last switch into an engine: (the tier it came from, seconds)."""

    @property
    def crashed(self) -> bool:
        """Ready, but its engine's thread has died."""
        return self.phase is ModelPhase.READY and self.served is not None and not self.served.engine.healthy

    @property
    def weights(self) -> WeightsView | None:
        return self.served.info.weights if self.served is not None else None

    def state(self, residency: WeightResidency | None = None, shared_bytes: int = 0) -> ModelState:
        phase, message = self.phase, self.message
        if self.crashed:
            phase, message = ModelPhase.FAILED, "the engine stopped unexpectedly (see the agent's log)"
        view = self.weights
        done, total = self.warmup_progress() or (None, None)
        return ModelState(
            name=self.name, phase=phase, path=self.path, memory_bytes=self.memory_bytes or self.estimate_bytes,
            load_time_seconds=self.load_time_seconds, pinned=self.pinned, message=message, owner=self.owner,
            identity=self.identity,
            weights=weights.describe(view.report, residency) if view is not None else None,
            warmup_shapes_done=done, warmup_shapes_total=total, tier=self.tier, base=self.base,
            **self.dense_copies(),
            last_switch_seconds=round(self.last_switch[1], 4) if self.last_switch else None,
            last_switch_from=self.last_switch[0] if self.last_switch else None, shared_bytes=shared_bytes,
        )

    def dense_copies(self) -> dict[str, int]:
        """`dense_copy_bytes` and `dense_from_rows` of its engine, when it keeps copies."""
        stats = self.engine.stats if self.engine is not None else None
        if stats is None or not stats.dense_copy_bytes:
            return {}
        return {"dense_copy_bytes": stats.dense_copy_bytes, "dense_from_rows": stats.dense_from_rows}

    def warmup_progress(self) -> tuple[int, int] | None:
        """(shapes warmed, shapes planned) once its engine has a warm-up plan."""
        stats = self.engine.stats if self.engine is not None else None
        if stats is None or not stats.warmup_shapes_total:
            return None
        return stats.warmup_shapes_done, stats.warmup_shapes_total

    def resident(self, uses: float, load_bps: float, wake_bps: float, keep_alive: float,
                 now: float, anchored: bool = False) -> eviction.Resident:
        served = self.served.engine if self.served is not None else None
        busy = self.phase is not ModelPhase.READY or self.waking or (isinstance(served, ServedEngine) and served.busy)
        last_used = self.served.last_used if self.served is not None else self.admitted_at
        size = self.memory_bytes or self.estimate_bytes
        alive = self.keep_alive if self.keep_alive is not None else keep_alive
        return eviction.Resident(self.name, size, last_used, pinned=self.pinned, busy=busy, uses=uses,
                                 reload_seconds=size / load_bps, kept_alive=now - last_used < alive,
                                 tier=self.tier, wake_seconds=size / wake_bps, anchored=anchored)


class ModelManager:
    def __init__(
        self, repository: ModelRepository, make_engine: EngineFactory, capacity: Capacity, *,
        lifecycle: Lifecycle, prompt_cache: PromptCache | None = None,
        cache_path: Callable[[str], Path] | None = None, on_change: Callable[[], None] | None = None,
        on_switch: SwitchObserver | None = None, tensor_share: TensorShare | None = None,
    ) -> None:
        """`lifecycle` counts the requests in flight (an unload waits for its model's);
        `prompt_cache` is looked up before every request (None: the local-only one)."""
        self.repository = repository
        self.capacity = capacity
        self._lifecycle = lifecycle
        self._prompt_cache = prompt_cache or PromptCache()
        self._make_engine = make_engine
        self._cache_path = cache_path
        self._on_change = on_change
        self._records: dict[str, _Record] = {}
        self._admission = asyncio.Lock()  # one capacity decision at a time
        self.load_bps: float | None = None
        """Bytes per second of this node's loads (a moving average), once one has been measured."""
        self.tier_bps: dict[ModelTier, float] = {}
        """Bytes per second of bringing a model into an engine from each tier (moving averages)."""
        self._on_switch = on_switch
        self.tensor_share = tensor_share
        """Tensors held once across the loaded models (`multi_model.share_tensors`); None: off."""
        self._background: set[asyncio.Task[None]] = set()
        self._prefetches: dict[str, PrefetchState] = {}
        """Resolved directory -> its latest prefetch, oldest first (at most PREFETCHES_KEPT)."""
        self._prefetching: set[asyncio.Task[None]] = set()
        self._known: dict[str, str] = {}
        """Name -> directory of every model loaded from a path here (what a request may bring back)."""
        self.before_engine: Callable[[], Awaitable[None]] | None = None
        """Awaited before each engine is made: the runtime imports the engine module (MLX,
        mlx-lm, transformers: 1.3-2.3 s) there off the event loop, which an agent started
        without a model would otherwise do on it at its first load (`make_engine`)."""

    # ---- reading ----

    def states(self, residency: dict[str, WeightResidency] | None = None) -> list[ModelState]:
        """Every model's state; `residency` (from `weight_views`, measured off the loop) fills in
        where each model's weights are."""
        residency = residency or {}
        return [r.state(residency.get(r.name), self._shared_bytes(r))
                for r in sorted(self._records.values(), key=lambda r: r.name)]

    def _shared_bytes(self, record: _Record) -> int:
        share = self.tensor_share
        return share.shared_bytes(record.name) if share is not None and record.weights is not None else 0

    def shared_tensor_bytes_saved(self) -> int | None:
        """Weight bytes the tensor share saves across the loaded models (None: sharing is off)."""
        return self.tensor_share.saved_bytes if self.tensor_share is not None else None

    def weight_views(self) -> dict[str, WeightsView]:
        """The loaded models' weights, to measure residency from (any thread)."""
        return {r.name: view for r in self._records.values() if (view := r.weights) is not None}

    def state(self, name: str) -> ModelState:
        record = self._record(name)
        return record.state(shared_bytes=self._shared_bytes(record))

    def queue(self) -> QueueReport:
        stats = [m.engine.stats for m in self.repository.all()]
        return QueueReport(running=sum(s.running for s in stats), waiting=sum(s.waiting for s in stats))

    def using_cache(self, cache_key: str) -> list[str]:
        """Models loaded (or loading) from a cache entry: it must not be deleted under them."""
        return sorted(r.name for r in self._records.values()
                      if r.cache_key == cache_key and r.phase is not ModelPhase.FAILED)

    # ---- load ----

    async def load(self, request: LoadModelRequest) -> tuple[ModelState, bool]:
        """Start loading (or confirm) `request.name`; the state and whether it is already ready."""
        path = await self._resolve(request)
        async with self._admission:
            record = self._records.get(request.name)
            if record is not None and record.crashed:  # clear the dead engine away first
                self._begin_unload(record, reason="the engine stopped unexpectedly")
            if record is not None:
                if record.phase is ModelPhase.UNLOADING:
                    raise UnloadInProgress(
                        f"model {request.name!r} is being unloaded; load it again once it is gone", param="name")
                if record.phase is not ModelPhase.FAILED:
                    if (record.path, record.cache_key, record.base) != (str(path), request.cache_key, request.base):
                        raise ModelConflict(
                            f"model {request.name!r} is already {record.phase.value} from "
                            f"{(record.cache_key and f'cache entry {record.cache_key}') or record.path}; "
                            f"unload it first (DELETE /v1/node/models/{request.name})", param="name")
                    if record.pinned != request.pin:
                        record.pinned = request.pin
                        self._changed()
                    return record.state(), record.phase is ModelPhase.READY
                self._forget(record)
            if request.base is not None:
                self._check_base(request.name, request.base)
            estimate = await asyncio.to_thread(weights_bytes, path)
            victims = self._admit(request.name, estimate)
            record = _Record(request.name, str(path), request.cache_key, request.warm, request.pin, estimate,
                             owner=request.owner, keep_alive=request.keep_alive_seconds, base=request.base)
            self._records[record.name] = record
            self.repository.mark(record.name, ModelPhase.LOADING)
            record.task = asyncio.create_task(self._load(record, victims), name=f"load-{record.name}")
            log.info("model admitted name=%s path=%s estimate_bytes=%d evicting=%s",
                     record.name, record.path, estimate, ",".join(v.name for v in victims) or "-")
            self._changed()
            return record.state(), False

    # ---- prefetch: the page cache, ahead of an announced load ----

    async def prefetch(self, request: PrefetchRequest) -> PrefetchState:
        """Start reading a model's weight files into the page cache (off the event loop), or
        report the read already under way for that directory."""
        path = await self._resolve(LoadModelRequest(name="prefetch", path=request.path, cache_key=request.cache_key))
        key = str(path)
        current = self._prefetches.get(key)
        if current is not None and current.phase is PrefetchPhase.PREFETCHING:
            return current
        state = PrefetchState(path=key, phase=PrefetchPhase.PREFETCHING,
                              bytes=await asyncio.to_thread(weights_bytes, path))
        self._prefetches.pop(key, None)
        self._prefetches[key] = state
        while len(self._prefetches) > PREFETCHES_KEPT:
            del self._prefetches[next(iter(self._prefetches))]
        task = asyncio.create_task(self._prefetch(state, path), name=f"prefetch-{path.name}")
        self._prefetching.add(task)
        task.add_done_callback(self._prefetching.discard)
        log.info("model prefetch started path=%s bytes=%d", key, state.bytes)
        return state

    async def _prefetch(self, state: PrefetchState, path: Path) -> None:
        started = time.perf_counter()
        try:
            files = await weights.WeightFiles.open(path)
            try:
                await files.warm()
            finally:
                files.close()
        except OSError as exc:
            done = state.model_copy(update={"phase": PrefetchPhase.FAILED, "message": f"reading failed: {exc}"})
            log.warning("model prefetch failed path=%s error=%s", state.path, exc)
        else:
            done = state.model_copy(update={"phase": PrefetchPhase.WARM,
                                            "seconds": round(time.perf_counter() - started, 4)})
            log.info("model prefetched path=%s bytes=%d seconds=%.3f", state.path, state.bytes, done.seconds)
        if self._prefetches.get(state.path) is state:
            self._prefetches[state.path] = done
        self._changed()

    def prefetches(self) -> list[PrefetchState]:
        return list(self._prefetches.values())

    async def load_for_request(self, name: str) -> bool:
        """For a request naming `name`, not served now: load it if it is known and allowed, and
        wait (bounded) until it is ready. False if it is not for us to load (the request's own
        404 or 503 stands); `ModelLoadFailed` if its load failed, `ModelLoading` past the wait."""
        if not self.capacity.load_on_request:
            return False
        record = self._records.get(name)
        if record is not None and record.phase is ModelPhase.UNLOADING:
            return False
        if record is None:
            path = await asyncio.to_thread(self._request_source, name)
            if path is None:
                return False
            try:  # concurrent first requests: the first load admits it, the others find it loading
                await self.load(LoadModelRequest(name=name, path=str(path), owner=LOAD_ON_REQUEST_OWNER))
            except (MaxModelsReached, MemoryBudgetExceeded) as exc:
                raise ModelLoading(f"model {name!r} cannot be loaded on this node now: {exc.message}",
                                   param="model") from exc
            record = self._records[name]
        try:
            await asyncio.wait_for(asyncio.shield(record.settled.wait()), self.capacity.load_wait)
        except TimeoutError:
            raise ModelLoading(f"model {name!r} is still loading after {self.capacity.load_wait:g}s; "
                               "retry shortly", param="model") from None
        if record.phase is ModelPhase.FAILED or record.crashed:
            raise ModelLoadFailed(f"model {name!r} could not be loaded: {record.state().message}; "
                                  f"DELETE /v1/node/models/{name} clears it for another try", param="model")
        return True

    def _request_source(self, name: str) -> Path | None:
        """Where `name` may be loaded from on request: a model loaded here before, or <source>/<name>;
        only inside an allowed source directory (blocking: off the loop)."""
        if not _PLAIN_NAME.fullmatch(name):
            return None
        sources = [s.resolve() for s in self.capacity.request_sources]
        candidates = [Path(self._known[name])] if name in self._known else []
        candidates += [s / name for s in sources]
        for candidate in candidates:
            path = candidate.resolve()
            if any(path.is_relative_to(s) and path != s for s in sources) and _model_dir_problem(path) is None:
                return path
        return None

    def _check_base(self, name: str, base: str) -> None:
        """An adapter's base must be a model (not an adapter) ready on this node."""
        record = self._records.get(base)
        if record is None or record.phase is not ModelPhase.READY or record.crashed:
            shown = "not on this node" if record is None else f"{record.state().phase.value}, not ready"
            raise InvalidRequest(f"base: model {base[:256]!r} is {shown}; load it before adapter {name!r}",
                                 param="base")
        if record.base is not None:
            raise InvalidRequest(f"base: {base!r} is itself an adapter (of {record.base!r}); name its base",
                                 param="base")

    def adapters_of(self, name: str) -> list[str]:
        """The adapters loaded (or loading) over model `name`."""
        return sorted(r.name for r in self._records.values() if r.base == name and r.phase is not ModelPhase.FAILED)

    async def wait_settled(self, name: str) -> ModelState:
        """Wait until `name` is ready or failed (for the model given on the command line)."""
        record = self._record(name)
        await record.settled.wait()
        return record.state()

    def _admit(self, name: str, estimate: int) -> list[_Record]:
        """Make room for `name` (`estimate` bytes more in memory): park or evict others; the
        records whose tasks must end before it may start."""
        now = time.monotonic()
        # What a model out of memory costs to bring back: the slower of the page-cache and disk
        # rates measured here (where its files will be is not known yet), else the first loads' mean.
        out = [self.tier_bps[t] for t in (ModelTier.PAGE_CACHE, ModelTier.DISK) if t in self.tier_bps]
        rate = min(out) if out else self.load_bps or self.capacity.default_load_bps
        wake = self.tier_bps.get(ModelTier.PARKED, self.capacity.default_wake_bps)
        bases = {r.base for r in self._records.values() if r.base is not None and r.phase is not ModelPhase.FAILED}
        residents = [r.resident(self.repository.usage.uses(r.name, now), rate, wake, self.capacity.keep_alive, now,
                                anchored=r.name in bases)
                     for r in self._records.values()
                     if r.name != name and r.phase in (ModelPhase.LOADING, ModelPhase.WARMING, ModelPhase.READY)]
        decision = eviction.admit(residents, estimate, max_models=self.capacity.max_models,
                                  budget_bytes=self.capacity.budget_bytes, evict=self.capacity.evict,
                                  order=self.capacity.order, park=self.capacity.park)
        if decision.refusal is not None:
            kind = MaxModelsReached if decision.refusal.shortage is eviction.Shortage.SLOTS else MemoryBudgetExceeded
            raise kind(f"cannot load {name!r}: {decision.refusal.message}", param="name")
        victims = [self._records[v] for v in decision.victims]
        for victim in victims:
            log.info("model evicted name=%s tier=%s for=%s", victim.name, victim.tier.value, name)
            self._begin_unload(victim, reason=f"evicted to make room for {name}")
        for parked in (self._records[v] for v in decision.parked):
            log.info("model parking name=%s for=%s", parked.name, name)
            parked.tier = ModelTier.PARKED
            # Not the record's task: an unload must wait for the park (it holds the lock), not cancel it.
            task = asyncio.create_task(self._park(parked), name=f"park-{parked.name}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return victims

    async def _load(self, record: _Record, victims: list[_Record]) -> None:
        await asyncio.gather(*(v.task for v in victims if v.task is not None), return_exceptions=True)
        loop = asyncio.get_running_loop()

        def weights_loaded() -> None:
            loop.call_soon_threadsafe(self._warming, record)

        async with record.lock:
            started = time.perf_counter()
            try:
                # KV state and dedupes go by content, not name (off the loop: it reads every byte once).
                content = await asyncio.to_thread(identity.content_identity, record.path)
                digest = content.digest
                base = self._records.get(record.base) if record.base is not None else None
                if record.base is not None:
                    if base is None or base.engine is None or base.identity is None:
                        raise ModelLoadFailed(f"its base {record.base!r} is no longer loaded")
                    digest = identity.combined(base.identity, digest)
                record.identity = digest
                source = await asyncio.to_thread(filetiers.tier_of, Path(record.path))
                if self.before_engine is not None:
                    await self.before_engine()
                if base is not None:
                    assert base.engine is not None
                    record.engine = self._make_engine(record.path, record.name, warm=record.warm, identity=digest,
                                                      on_weights_loaded=weights_loaded, base=base.engine)
                elif self.tensor_share is not None and content.tensors:
                    record.engine = self._make_engine(record.path, record.name, warm=record.warm,
                                                      identity=digest, on_weights_loaded=weights_loaded,
                                                      tensors=content.tensors)
                else:
                    record.engine = self._make_engine(record.path, record.name, warm=record.warm,
                                                      identity=digest, on_weights_loaded=weights_loaded)
                engine_started = time.perf_counter()
                info = await record.engine.start()
                encoder = LanedPromptEncoder(record.engine.tokenizer)
            except asyncio.CancelledError:
                raise  # an unload cancelled us; it stops the engine
            except Exception as exc:
                record.phase = ModelPhase.FAILED
                record.message = f"load failed: {exc}"
                self.repository.mark(record.name, None)
                log.error("model failed to load name=%s path=%s error=%s", record.name, record.path, exc)
                if record.engine is not None:
                    await record.engine.stop()
                    record.engine = None
                record.settled.set()
                self._changed()
                return
            record.load_time_seconds = round(time.perf_counter() - started, 4)
            record.memory_bytes = info.memory_bytes
            self._measured(info.memory_bytes, time.perf_counter() - started)
            self._switched(record, source, info.memory_bytes, time.perf_counter() - engine_started)
            if record.cache_key is None and record.base is None:
                self._known[record.name] = record.path
            served_engine = ServedEngine(record.engine, record.name, digest, self._lifecycle,
                                         self._prompt_cache, wake=lambda: self._wake(record))
            record.served = ServedModel(record.name, served_engine, encoder, info, int(time.time()),
                                        identity=record.identity)
            record.phase = ModelPhase.READY
            record.message = None
            self.repository.add(record.served)
            record.settled.set()
            log.info("model ready name=%s memory_bytes=%d load_time_s=%.2f", record.name, info.memory_bytes,
                     record.load_time_seconds)
            self._changed()

    # ---- parking and waking ----

    async def _park(self, record: _Record) -> None:
        """Release the engine, keep the weights: requests from now on wait for `_wake`."""
        async with record.lock:
            served, engine = record.served, record.engine
            if record.phase is not ModelPhase.READY or record.tier is not ModelTier.PARKED or engine is None:
                return
            assert served is not None and isinstance(served.engine, ServedEngine)
            served.engine.asleep = True
            if not await served.engine.wait_idle(self.capacity.unload_timeout):
                log.warning("park grace over, parking anyway name=%s in_flight=%d", record.name,
                            served.engine.in_flight)
            await engine.park()
            log.info("model parked name=%s memory_bytes=%s", record.name, record.memory_bytes)
        self._changed()

    async def _wake(self, record: _Record) -> None:
        """Bring a parked model back into an engine (a request for it is waiting); parks
        another if the slots are full. Concurrent requests wake it once."""
        async with record.lock:
            served = record.served
            if record.phase is ModelPhase.UNLOADING:
                raise ModelUnloading(f"model {record.name!r} is being unloaded from this node", param="model")
            if served is None or record.phase is not ModelPhase.READY or record.engine is None:
                raise ModelLoading(f"model {record.name!r} is not ready on this node; retry shortly", param="model")
            assert isinstance(served.engine, ServedEngine)
            if not served.engine.asleep:
                return  # woken meanwhile by another request
            record.waking = True
            try:
                await self._take_slot(record)
                started = time.perf_counter()
                await record.engine.resume()
                served.engine.asleep = False
                self._switched(record, ModelTier.PARKED, record.memory_bytes or 0, time.perf_counter() - started)
                log.info("model woken name=%s seconds=%.4f", record.name, time.perf_counter() - started)
            except Exception:
                record.tier = ModelTier.PARKED
                raise
            finally:
                record.waking = False
        self._changed()

    async def _take_slot(self, record: _Record) -> None:
        """An engine slot for a parked model (in memory already: no memory is needed), parking
        another; while every slot is busy, wait for one, bounded by `wake_timeout`."""
        deadline = time.monotonic() + self.capacity.wake_timeout
        while True:
            async with self._admission:
                try:
                    self._admit(record.name, 0)
                    record.tier = ModelTier.ACTIVE
                    return
                except (MaxModelsReached, MemoryBudgetExceeded) as exc:
                    if time.monotonic() >= deadline:
                        raise ModelLoading(f"model {record.name!r} is parked and no engine slot came free within "
                                           f"{self.capacity.wake_timeout:g}s ({exc})", param="model") from exc
            await asyncio.sleep(0.05)  # a slot frees when a busy model's requests end: nothing to wait on

    def _warming(self, record: _Record) -> None:
        if record.phase is ModelPhase.LOADING and record.warm:
            record.phase = ModelPhase.WARMING
            self.repository.mark(record.name, ModelPhase.WARMING)

    # ---- unload ----

    async def unload(self, name: str) -> ModelState:
        """Begin unloading `name` (404 if unknown); a failed model is forgotten at once."""
        record = self._record(name)
        if record.phase is ModelPhase.FAILED:
            self._forget(record)
            self._changed()
        elif record.phase is not ModelPhase.UNLOADING:
            self._begin_unload(record, reason="requested")
        return record.state()

    def _begin_unload(self, record: _Record, reason: str) -> None:
        prior = record.task
        record.phase = ModelPhase.UNLOADING
        record.message = reason
        self.repository.remove(record.name)
        self.repository.mark(record.name, ModelPhase.UNLOADING)
        # Its adapters run over its weights: they go first.
        adapters = [r for r in self._records.values() if r.base == record.name]
        for adapter in adapters:
            if adapter.phase is ModelPhase.FAILED:
                self._forget(adapter)
            elif adapter.phase is not ModelPhase.UNLOADING:
                self._begin_unload(adapter, reason=f"its base {record.name} is being unloaded")
        first = [a.task for a in adapters if a.task is not None]
        record.task = asyncio.create_task(self._unload(record, prior, after=first), name=f"unload-{record.name}")
        self._changed()

    async def _unload(self, record: _Record, prior: asyncio.Task[None] | None, timeout: float | None = None,
                      after: list[asyncio.Task[None]] | None = None) -> None:
        if prior is not None and not prior.done():
            prior.cancel()
            await asyncio.gather(prior, return_exceptions=True)
        if after:
            await asyncio.gather(*after, return_exceptions=True)
        async with record.lock:
            served = record.served
            if served is not None and isinstance(served.engine, ServedEngine):
                grace = self.capacity.unload_timeout if timeout is None else timeout
                if not await served.engine.wait_idle(grace):
                    log.warning("unload grace over, stopping anyway name=%s in_flight=%d timeout_s=%.1f",
                                record.name, served.engine.in_flight, grace)
            if served is not None:
                served.encoder.close()
            if record.engine is not None:
                await record.engine.stop()
            record.engine = record.served = None
        record.settled.set()
        if self._records.get(record.name) is record:
            del self._records[record.name]
            self.repository.mark(record.name, None)
        log.info("model unloaded name=%s reason=%s", record.name, record.message)
        self._changed()

    def warming(self) -> list[tuple[str, int, int]]:
        """(name, shapes warmed, shapes planned) of each model still warming up."""
        return [(r.name, *progress) for r in self._records.values()
                if r.phase in (ModelPhase.LOADING, ModelPhase.WARMING) and (progress := r.warmup_progress())]

    async def close(self) -> None:
        """Stop every engine now (shutdown: the drain already waited for requests)."""
        for task in list(self._prefetching):
            task.cancel()  # a read already in its thread finishes there, unawaited
        for record in list(self._records.values()):
            prior = record.task
            if record.phase is not ModelPhase.UNLOADING:
                record.phase = ModelPhase.UNLOADING
                record.message = "the agent is shutting down"
                self.repository.remove(record.name)
                record.task = asyncio.create_task(self._unload(record, prior, timeout=0))
        await asyncio.gather(*(r.task for r in list(self._records.values()) if r.task), return_exceptions=True)

    # ---- helpers ----

    def _switched(self, record: _Record, tier: ModelTier, size: int, seconds: float) -> None:
        """Fold one switch of `record` into an engine, from `tier`, into that tier's rate."""
        record.last_switch = (tier, seconds)
        if self._on_switch is not None:
            self._on_switch(tier, seconds)
        if size <= 0 or seconds <= 0:
            return
        rate = size / seconds
        prior = self.tier_bps.get(tier)
        self.tier_bps[tier] = rate if prior is None else 0.7 * prior + 0.3 * rate

    def _measured(self, size: int, seconds: float) -> None:
        """Fold one load into the node's load rate (the cost of bringing a model back)."""
        if size <= 0 or seconds <= 0:
            return
        rate = size / seconds
        self.load_bps = rate if self.load_bps is None else 0.7 * self.load_bps + 0.3 * rate

    async def _resolve(self, request: LoadModelRequest) -> Path:
        if request.cache_key is not None:
            if self._cache_path is None:
                raise InvalidRequest("cache_key: this agent has no model cache", param="cache_key")
            return self._cache_path(request.cache_key)
        assert request.path is not None
        path = Path(request.path)
        if not path.is_absolute():
            raise InvalidRequest(f"path: {request.path!r} must be an absolute path on the node", param="path")
        problem = await asyncio.to_thread(_adapter_dir_problem if request.base is not None else _model_dir_problem,
                                          path)
        if problem:
            raise InvalidRequest(f"path: {request.path!r} {problem}", param="path")
        return await asyncio.to_thread(path.resolve)

    def _record(self, name: str) -> _Record:
        record = self._records.get(name)
        if record is None:
            known = ", ".join(sorted(self._records)) or "none"
            raise ModelNotFound(f"model {name[:256]!r} is not on this node (models: {known})", param="name")
        return record

    def _forget(self, record: _Record) -> None:
        if self._records.get(record.name) is record:
            del self._records[record.name]
        self.repository.mark(record.name, None)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()


def weights_bytes(directory: Path) -> int:
    """Bytes the model's weights take on disk: the estimate of its memory before it loads."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in WEIGHT_SUFFIXES] or files
    return sum(p.stat().st_size for p in weights)


def _adapter_dir_problem(path: Path) -> str | None:
    if not path.is_dir():
        return "is not a directory"
    for name in ("adapter_config.json", "adapters.safetensors"):
        if not (path / name).is_file():
            return f"has no {name} (not an mlx-lm LoRA adapter)"
    return None


def _model_dir_problem(path: Path) -> str | None:
    if not path.is_dir():
        return "is not a directory"
    if not (path / "config.json").is_file():
        return "has no config.json (not a model directory)"
    return None
