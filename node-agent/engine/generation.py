"""Continuous batching on mlx-lm's `BatchGenerator`, driven by one thread per model.

The asyncio side never touches MLX. It hands requests to the engine thread through a
thread-safe command queue and gets each request's tokens back on its own
`asyncio.Queue` (one `call_soon_threadsafe` per step for the whole batch). The thread
loads the model, warms it up, then loops: take commands, fail waiting requests whose
deadline passed, admit the most urgent waiting requests into free slots (reusing a
cached prefix of their prompt, local or fetched from the fleet, when there is one),
and run one `BatchGenerator.next()` step, after which, one method each: read the
log-probabilities of the sequences that asked (one batched read), detokenize each
sequence incrementally and apply its stop strings, retire the sequences that ended,
keep their KV in the prefix cache (and publish their prompts' to the fleet), and hand
the step's events over.

Admission is bounded three times: at most `max_running` sequences in the batch
(decode concurrency); of those at most two prefill groups still prefilling: the one
mlx-lm is computing (`prefill_batch_size` prompts, the prefill concurrency) and the
next one, staged so the generator never waits a step for it; and their prompts at
most `prefill_token_budget` tokens in all (the first always goes), so a burst of long
prompts cannot stall every decoding stream for one huge prefill step. Everything
else waits in our priority queue rather than in mlx-lm's FIFO, so a critical
request that arrives late is at most one group behind. (An empty batch takes a
whole burst at once, within the token budget: there is no decoding to protect
yet.) Admitted prompts go in by priority, then length, so mlx-lm's prefill groups,
each padded to its longest prompt, waste little.

What this module deliberately leaves to others: the order of the waiting queue
(`scheduling`), samplers (`sampling`), the prefix cache's policy (`prefixcache`), how
prompts are built (`prompts`), HTTP and OpenAI shapes (the data plane).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from mlxpool.agent.engine import blas as _blas  # noqa: F401  (must precede mlx)
from mlxpool.agent.engine import densecopies, device, kvcodec, laststep, loading, precompile
from mlxpool.agent.engine.admission import (
    Outlook,
    RefusalReason,
    RunningView,
    choose_victim,
    refusal,
    retry_after_seconds,
    tier_waits,
)
from mlxpool.agent.engine.interface import (
    ERROR_BUCKETS,
    WAIT_BUCKETS,
    Buckets,
    EngineConfig,
    EngineError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TierTerms,
    TokenEvent,
    TokenLogprob,
)
from mlxpool.agent.engine.logprobs import LogprobReader
from mlxpool.agent.engine.memory import MemoryBooks
from mlxpool.agent.engine.memorybudget import MemoryBudget, UnlimitedBudget
from mlxpool.agent.engine.memorygate import MemoryGate
from mlxpool.agent.engine.prefixcache import PrefixCache
from mlxpool.agent.engine.sampling import SamplerFactory, SeededSampler, logits_processors, warm_samplers
from mlxpool.agent.engine.scheduling import Forecast, PriorityAdmission, lane_floor
from mlxpool.agent.engine.shapes import Shape, ShapeBook, ShapeKind, ShapePlan, WarmupRun
from mlxpool.agent.engine.speed import PRIOR_PREFILL_TPS, SpeedModel
from mlxpool.agent.engine.stopping import StopStringMatcher
from mlxpool.agent.engine.tensorshare import TensorShare
from mlxpool.agent.errors import DeadlineExceeded, DeadlineUnreachable, QueueFull, TargetUnreachable, WaitBound
from mlxpool.priorities import Priority

__all__ = ["BatchEngine", "EngineConfig"]

log = logging.getLogger(__name__)

laststep.install()  # no forward pass after a batch's last token (`engine.laststep`)

MIN_TOKENS_AFTER_RESUME = 8
"""A resumed sequence is not paused again before it produced this many more tokens (no thrashing)."""
KV_BYTES_EVERY_STEPS = 32  # how often the batch's KV bytes and device memory are recounted for /metrics
WARMUP_FIRST_TOKEN = 3  # warm-up prompts use ids from here up (0-2 are special in most vocabularies)


@dataclass(eq=False, slots=True)
class _Sequence:
    """Engine-thread state of one request."""

    request: GenerationRequest
    sink: asyncio.Queue[TokenEvent | BaseException]
    loop: asyncio.AbstractEventLoop
    detokenizer: Any = None
    stops: StopStringMatcher = field(default_factory=lambda: StopStringMatcher(()))
    uid: int | None = None
    generated: int = 0
    cached_tokens: int = 0
    prefilled: bool = False
    """The whole prompt is processed (the sequence is decoding)."""
    admitted_at: float = 0.0
    """`time.perf_counter()` when it entered the batch (its prefill time is measured from it)."""
    prefill_tokens: int = 0
    """What it counts against the prefill token budget until prefilled: its whole prompt."""
    forecast: Forecast | None = None
    """What the queue ordered it by on arrival (a paused sequence waits again with it)."""
    sampler: Any = None
    """Its sampler, kept for a resume (a seeded one holds the request's random stream)."""
    paused: _Paused | None = None
    """Set while it is paused (preempted): what it resumes from."""
    resumed_at: int | None = None
    """`generated` when it last resumed; None: never paused."""
    resuming: bool = False
    predicted_ttft_s: float = 0.0
    """Its time to first token as predicted on arrival (the outlook's wait plus its prefill)."""
    """Resumed and not yet back to decoding (its prefill is not a prompt's: not measured)."""


@dataclass(slots=True)
class _Paused:
    """A preempted sequence's state: its KV (trimmed by the last token, which the resume
    feeds again), or None when it could not be kept and is recomputed from `tokens`."""

    cache: list[Any] | None
    tokens: list[int]
    """Every token its KV covered when paused: prompt and the tokens delivered so far."""


@dataclass(frozen=True, slots=True)
class _Submit:
    sequence: _Sequence


@dataclass(frozen=True, slots=True)
class _Cancel:
    request_id: str


@dataclass(frozen=True, slots=True)
class _Ended:
    """A sequence whose last token this step produced, and why it ended."""

    sequence: _Sequence
    response: Any
    """mlx-lm's response for that token (with the sequence's KV cache when mlx-lm ended it)."""
    reason: FinishReason
    by_stop_string: bool
    """Ended by one of its stop strings: mlx-lm does not know, and still holds it in the batch."""


_STOP = object()

Delivery = tuple[_Sequence, TokenEvent | BaseException]
_Put = tuple[asyncio.Queue[TokenEvent | BaseException], TokenEvent | BaseException]


class KVPublisher(Protocol):
    """Hands prompt KV state to other agents (`serving.promptcache.KVPublisher`); called on the engine thread."""

    def boundary(self, prompt_tokens: int) -> int:
        """How many leading tokens of a prompt this long to publish (0: none)."""
        ...

    def publish(self, tokens: tuple[int, ...], blob: bytes) -> None: ...


class BatchEngine:
    """Serves one model directory; implements `interface.Engine`."""

    def __init__(self, model_path: str, config: EngineConfig | None = None, name: str = "model",
                 on_weights_loaded: Callable[[], None] | None = None,
                 kv_publisher: KVPublisher | None = None, memory: MemoryBooks | None = None,
                 available_memory: Callable[[], int | None] | None = None,
                 paused_budget: MemoryBudget | None = None, base: BatchEngine | None = None,
                 tensor_share: TensorShare | None = None, tensor_digests: Mapping[str, str] | None = None) -> None:
        self._path = model_path
        self._base = base
        """Set for a LoRA adapter (`model_path` its directory): the engine of the base model whose
        weights it shares (`loading.load_adapter`); its own are only the adapter's tensors."""
        self._sharing = (loading.Sharing(tensor_share, name, tensor_digests)
                         if tensor_share is not None and tensor_digests and base is None else None)
        """Where its load looks for tensors another loaded model holds (`engine.tensorshare`)."""
        self._current: loading.LoadedModel | None = None
        """The loaded model while the thread serves (what adapters over this engine share)."""
        self._name = name
        self._memory = memory
        """The node's memory books (`engine.memory`), shared by every engine; None: no memory admission."""
        self._available_memory = available_memory or (lambda: None)
        """The OS's available bytes, as last read (off this thread) by the runtime."""
        self._gate: MemoryGate | None = None
        self._publisher = kv_publisher
        """Where finished prompts' KV goes for other agents (`serving.promptcache`); None: not shared."""
        self._on_weights_loaded = on_weights_loaded
        """Called on the engine thread once the weights are in memory, before warm-up (the model
        manager reports the `warming` phase from it)."""
        self._config = config or EngineConfig()
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stats = EngineStats(max_running=self._config.max_running,
                                  prompt_cache_max_bytes=self._config.prompt_cache_bytes)
        self._loaded: Future[ModelInfo] = Future()
        self._accepting = False
        self._accepting_lock = threading.Lock()
        self._alive = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._kept: loading.LoadedModel | None = None
        """The loaded model while parked (`park`): weights in memory, no thread, no running KV."""
        self._instant_uid = 0
        """The last uid given to an instant answer (negative: apart from mlx-lm's)."""
        self._kept_prefix: PrefixCache | None = None
        """Its prefix cache while parked: the first requests after a wake reuse what it held
        (still counted in the node's books; dropped with the weights)."""
        self._parking = False
        # Admission off the engine thread: `submit` refuses a doomed request from the queue's
        # last published outlook (no round trip through a step). Both under `_accepting_lock`.
        self._outlook = Outlook()
        self._pending: Counter[Priority] = Counter()
        """Submissions per tier handed over since the outlook was published."""
        self._refused_early: Counter[str] = Counter()
        """Refusals by `submit` itself, by reason."""
        self._accepted_since: Counter[Priority] = Counter()
        """Engine thread: submissions taken since the last outlook."""
        self.tokenizer: Any = None
        """mlx-lm's TokenizerWrapper, set once the model is loaded."""
        # Engine-thread state.
        self._waiting: PriorityAdmission[_Sequence] = PriorityAdmission(
            self._config.max_waiting, aging_s=self._config.aging_s, edf_slack_s=self._config.edf_slack_s,
            tenant_weights=self._config.tenant_weights)
        self._speed = SpeedModel()
        """This engine's measured speed: the forecasts the queue orders by."""
        self._running: dict[int, _Sequence] = {}
        self._by_id: dict[str, _Sequence] = {}
        self._prefilling = 0  # admitted sequences whose prompt is not fully processed yet
        self._prefilling_tokens = 0  # their prompt tokens
        self._prompt_done: dict[int, int] = {}  # uid -> prompt tokens processed, of those mid-prompt
        self._finished: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._prefix = PrefixCache(self._config.prompt_cache_bytes, self._config.prompt_cache_entries)
        self._samplers: SamplerFactory | None = None
        self._budget: MemoryBudget = paused_budget or memory or UnlimitedBudget()
        """Where paused KV is counted: the node's books (or, in tests, a given budget)."""
        self._paused: set[str] = set()
        """Request ids of the paused sequences."""
        self._preempted: Counter[str] = Counter()
        self._resumed: Counter[str] = Counter()
        self._logprobs: LogprobReader | None = None
        self._held: list[Delivery] = []  # token events waiting for the next hand-over
        self._handed_over = 0.0  # time.monotonic() of the last hand-over
        on_cpu = mx.default_device() == mx.cpu
        self._shapes = ShapeBook(ShapePlan(
            self._config.max_running, min(self._config.prefill_batch_size, self._config.max_running),
            self._config.prefill_step_size, cpu=on_cpu))
        self._decode_width = 0  # the width of the last decode step (a new one is noted in the book)

    # ---- asyncio side ----

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def healthy(self) -> bool:
        return self._alive

    async def start(self) -> ModelInfo:
        """Load and warm the model on the engine thread; returns once it can serve."""
        self._thread.start()
        info = await asyncio.wrap_future(self._loaded)
        with self._accepting_lock:
            self._accepting = self._alive
        return info

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and wait for it to end; requests still running fail with EngineError.

        The thread ends only after the device has finished its work (`_run`); after `timeout`
        this stops waiting (logged), and the process exit waits for nothing more of it.
        A parked engine's weights are released.
        """
        self._parking = False
        await self._end_thread(timeout)
        if self._kept is not None:
            kept, self._kept = self._kept, None
            prefix, self._kept_prefix = self._kept_prefix, None
            await asyncio.to_thread(self._release, kept, prefix)

    async def park(self, timeout: float = 10.0) -> None:
        """Release the engine but keep the weights in memory (vLLM's sleep level 1): the thread,
        the batch and the running sequences' KV go (the prefix cache is kept, within its cap);
        `resume` serves again without reading a byte."""
        self._parking = True
        await self._end_thread(timeout)
        self._parking = False

    @property
    def parked(self) -> bool:
        return self._kept is not None

    def loaded_model(self) -> loading.LoadedModel | None:
        """The loaded model, serving or parked (None before loading and after stopping): what a
        LoRA adapter's engine builds over (any thread; the arrays are not changed after loading)."""
        return self._current or self._kept

    async def resume(self) -> ModelInfo:
        """Serve again over the parked weights (no load, no warm-up: the shapes ran before)."""
        if self._kept is None:
            raise EngineError("the engine is not parked")
        self._loaded = Future()
        kept, self._kept_prefix = self._kept_prefix, None
        self._prefix = kept or PrefixCache(self._config.prompt_cache_bytes, self._config.prompt_cache_entries)
        with self._accepting_lock:  # the queue the outlook described is gone
            self._outlook, self._pending, self._accepted_since = Outlook(), Counter(), Counter()
        self._thread = threading.Thread(target=self._run, name=f"engine-{self._name}", daemon=True)
        return await self.start()

    async def _end_thread(self, timeout: float) -> None:
        with self._accepting_lock:
            self._accepting = False
        if self._thread.is_alive():
            self._commands.put(_STOP)
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                log.warning("engine thread still running after stop path=%s timeout_s=%.1f", self._path, timeout)

    def _release(self, loaded: loading.LoadedModel, prefix: PrefixCache | None = None) -> None:
        """Drop a parked model's weights and kept prefix cache (off the event loop)."""
        loaded.weights.close()  # unlock the pinned pages before MLX may cache their buffers
        self._drop_books()
        del loaded, prefix
        mx.synchronize()
        mx.clear_cache()

    def _drop_books(self) -> None:
        """The model is out of memory: out of the node's books and the tensor share."""
        if self._memory is not None:
            self._memory.remove_weights(self._name)
        if self._sharing is not None:
            self._sharing.share.release(self._name)

    async def submit(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        sequence = _Sequence(request, asyncio.Queue(), asyncio.get_running_loop())
        with self._accepting_lock:
            if not self._accepting:
                raise EngineError("the engine is not running")
            self._refuse(request.priority, request.terms, request.deadline, len(request.prompt_tokens))
            self._pending[request.priority] += 1
            self._commands.put(_Submit(sequence))
        done = False
        get = sequence.sink.get
        try:
            while True:
                item = await get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finish_reason is not None
                yield item
                if done:
                    return
        finally:
            if not done:  # the consumer went away: free the slot now
                self._commands.put(_Cancel(request.request_id))

    def refuse_early(self, priority: Priority, terms: TierTerms | None, deadline: float | None,
                     prompt_tokens: int) -> None:
        """Raise the 429 `submit` would raise for such a request now, from the last outlook:
        for the data plane to call before tokenizing (`prompt_tokens` an estimate then), so a
        refusal waits for no tokenizer lane. Waits for nothing but the outlook's lock."""
        with self._accepting_lock:
            if self._accepting:
                self._refuse(priority, terms, deadline, prompt_tokens)

    def _refuse(self, priority: Priority, terms: TierTerms | None, deadline: float | None,
                prompt_tokens: int) -> None:
        """Raise the 429 of a request its tier's bound or target refuses (caller holds the lock)."""
        deadline_in = None if deadline is None else deadline - time.monotonic()
        verdict = refusal(
            self._outlook, priority, pending=self._pending[priority],
            max_waiting=terms.max_waiting if terms is not None else self._config.max_waiting.get(priority),
            sheddable=terms is not None and terms.sheddable,
            ttft_target_s=terms.ttft_target_s if terms is not None else None,
            prompt_tokens=prompt_tokens, deadline_in_s=deadline_in,
            max_wait_s=None if terms is None or terms.wait_bound is None else terms.wait_bound[0])
        if verdict is None:
            return
        self._refused_early[verdict.reason.value] += 1
        self._stats.requests_rejected_total = dict(self._refused_early + self._rejected)
        if verdict.reason is RefusalReason.QUEUE_FULL:
            raise QueueFull(priority, verdict.limit or 0, verdict.retry_after_s)
        if verdict.reason is RefusalReason.DEADLINE_UNREACHABLE:
            assert deadline_in is not None
            raise DeadlineUnreachable(max(0.0, deadline_in), self._outlook.wait_s.get(priority, 0.0),
                                      verdict.retry_after_s)
        if verdict.reason is RefusalReason.WAIT_BOUND:
            assert terms is not None and terms.wait_bound is not None
            bound, lane = terms.wait_bound
            raise WaitBound(priority, lane, bound, self._outlook.wait_s.get(priority, 0.0), verdict.retry_after_s)
        assert terms is not None and terms.ttft_target_s is not None
        raise TargetUnreachable(priority, terms.ttft_target_s, verdict.predicted_ttft_s, verdict.retry_after_s)

    def _count_rejected(self, reason: str, n: int = 1) -> None:
        with self._accepting_lock:
            self._rejected[reason] += n
            self._stats.requests_rejected_total = dict(self._refused_early + self._rejected)

    # ---- engine thread ----

    def _run(self) -> None:
        resuming, self._kept = self._kept, None
        try:
            loaded = resuming or self._load()
            self._current = loaded
            generator = self._generator(loaded)
            self._samplers = SamplerFactory(loaded.vocab_size)
            self._logprobs = LogprobReader(loaded.tokenizer)
            self._open_gate(loaded)
            if self._on_weights_loaded is not None and resuming is None:
                self._on_weights_loaded()
            if resuming is None:
                self._warm_up(generator, loaded.vocab_size)
                loaded = self._settle_dense_copies(loaded)
                self._current = loaded
        except BaseException as exc:
            self._current = None
            self._drop_books()
            log.exception("engine failed to load model path=%s", self._path)
            if not self._loaded.cancelled():
                self._loaded.set_exception(exc)
            return
        self.tokenizer = loaded.tokenizer
        self._alive = True
        if self._loaded.cancelled():  # the agent gave up waiting (shutdown during load)
            self._alive = False
            self._current = None
            generator.close()
            loaded.weights.close()
            self._drop_books()
            return
        self._loaded.set_result(loaded.info)
        try:
            self._serve(generator)
        except BaseException as exc:
            log.exception("engine thread crashed path=%s", self._path)
            self._fail_all(EngineError(f"the engine crashed: {exc}"))
        finally:
            self._alive = False
            with self._accepting_lock:
                self._accepting = False
            self._fail_all(EngineError("the engine stopped"))
            generator.close()
            # Unloaded: drop the weights and the cached KV (parking: keep both), then give MLX's
            # freed buffers back.
            if self._parking:
                self._kept_prefix = self._prefix  # its bytes stay in the books: they stay in memory
            self._prefix = PrefixCache(0, 1)
            self._current = None
            if self._parking:
                self._kept = loaded
            else:
                loaded.weights.close()  # unlock the pinned pages before MLX may cache their buffers
                self._drop_books()
            del generator, loaded
            # The last step was evaluated asynchronously: let the device finish it before this
            # thread ends (on CUDA, work still in flight at exit aborts the process).
            mx.synchronize()
            mx.clear_cache()

    def _load(self) -> loading.LoadedModel:
        if self._base is None:
            return loading.load(self._path, self._config.load, sharing=self._sharing)
        base = self._base.loaded_model()
        if base is None:
            raise EngineError(f"the base model of adapter {self._name!r} is not loaded")
        return loading.load_adapter(base, self._path, self._config.load)

    def _serve(self, generator: BatchGenerator) -> None:
        steps = 0
        while True:
            idle = not self._running and not len(self._waiting)
            if not self._take_commands(generator, block=idle):
                return
            if len(self._waiting):
                self._expire(time.monotonic())
                if self._config.max_paused > 0 and len(self._running) >= self._config.max_running:
                    self._preempt(generator)
                self._admit(generator)
            if self._running:
                self._step(generator)
                steps += 1
                if steps % KV_BYTES_EVERY_STEPS == 0 or not self._running:
                    self._stats.kv_cache_bytes = generator.prompt_cache_nbytes if self._running else 0
                    self._count_device_memory()
            self._publish_outlook()

    def _publish_outlook(self) -> None:
        """What `submit` decides from: waiting per tier and each tier's predicted wait, now."""
        speed, running = self._speed, self._running
        batch = max(1, len(running))
        remaining = [
            speed.remaining_seconds(s.generated, s.request.sampling.max_tokens, batch) if s.prefilled
            else speed.duration_seconds(len(s.request.prompt_tokens) - s.cached_tokens,
                                        s.request.sampling.max_tokens, batch)
            for s in running.values()]
        serial = speed.serial_prefill_seconds
        done = self._prompt_done
        prefilling = serial(sum(
            max(0, len(s.request.prompt_tokens) - s.cached_tokens - done.get(uid, 0))
            for uid, s in running.items() if not s.prefilled and not s.resuming))
        waits = tier_waits(self._config.max_running, remaining,
                           ((p, f.duration_s, serial(len(s.request.prompt_tokens)))
                            for s, p, f in self._waiting.items()), prefilling_s=prefilling)
        outlook = Outlook(self._waiting.counts(), waits, speed.prefill_tps or PRIOR_PREFILL_TPS)
        with self._accepting_lock:
            self._pending -= self._accepted_since  # Counter subtraction drops what reaches 0
            self._accepted_since.clear()
            self._outlook = outlook

    def _take_commands(self, generator: BatchGenerator, block: bool) -> bool:
        """Apply every queued command; False when asked to stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command is _STOP:
                return False
            if isinstance(command, _Submit):
                self._accept(command.sequence)
            elif isinstance(command, _Cancel):
                self._cancel(generator, command.request_id)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _accept(self, sequence: _Sequence) -> None:
        request = sequence.request
        self._accepted_since[request.priority] += 1
        if request.request_id in self._by_id:
            self._deliver([(sequence, EngineError(f"request id {request.request_id!r} is already running"))])
            return
        if self._gate is not None and (refusal := self._gate.refuse_on_arrival(request)) is not None:
            self._refuse_for_memory([(sequence, refusal)])  # it can never fit (or the node is pressed)
            return
        terms = request.terms
        limit = terms.max_waiting if terms is not None else None
        forecast = self._forecast(request)
        floor = lane_floor(terms.wait_bound if terms is not None else None)
        expires = _wait_deadline(request, forecast)
        try:
            self._waiting.push(request.request_id, sequence, request.priority, expires, limit=limit,
                               weight=len(request.prompt_tokens), forecast=forecast, floor=floor)
        except QueueFull as refusal:
            # The limit is on waiting: a request that the next admission takes anyway does not wait.
            if self._free_slots() > len(self._waiting):
                self._waiting.push(request.request_id, sequence, request.priority, expires, over_limit=True,
                                   weight=len(request.prompt_tokens), forecast=forecast, floor=floor)
            else:
                self._count_rejected("queue_full")
                wait = self._outlook.wait_s.get(request.priority, 0.0)
                self._deliver([(sequence, QueueFull(refusal.priority, refusal.limit, retry_after_seconds(wait)))])
                return
        sequence.forecast = forecast
        sequence.predicted_ttft_s = self._outlook.wait_s.get(request.priority, 0.0) + forecast.prefill_s
        sequence.detokenizer = self.tokenizer.detokenizer  # a fresh copy per request
        sequence.stops = StopStringMatcher(request.sampling.stop)
        self._by_id[request.request_id] = sequence
        self._count_queues()

    def _forecast(self, request: GenerationRequest) -> Forecast:
        """What the queue orders a request by: its TTFT deadline and predicted costs, from the speed model."""
        arrival = request.arrival if request.arrival is not None else time.monotonic()
        target = request.terms.ttft_target_s if request.terms is not None else None
        due = None if target is None else arrival + target
        if request.deadline is not None:
            due = request.deadline if due is None else min(due, request.deadline)
        prompt, max_tokens = len(request.prompt_tokens), request.sampling.max_tokens
        speed = self._speed
        return Forecast(arrival=arrival, ttft_deadline=due, prefill_s=speed.prefill_seconds(prompt),
                        duration_s=speed.duration_seconds(prompt, max_tokens, max(1, len(self._running))),
                        tokens=prompt + speed.produced_tokens(max_tokens), tenant=request.tenant)

    def _cancel(self, generator: BatchGenerator, request_id: str) -> None:
        sequence = self._by_id.pop(request_id, None)
        if sequence is None:  # already finished
            return
        if self._gate is not None:
            self._gate.done(request_id)
        if sequence.paused is not None:
            self._drop_paused(sequence)
        if self._waiting.remove(request_id) is None and sequence.uid is not None:
            generator.remove([sequence.uid])
            self._running.pop(sequence.uid, None)
            if not sequence.prefilled:
                self._prefill_done(sequence)
        self._count_finished("cancelled")
        self._count_queues()
        log.debug("request cancelled request_id=%s generated=%d", request_id, sequence.generated)

    def _expire(self, now: float) -> None:
        """Fail the waiting requests whose wait deadline passed (`_wait_deadline`): 504 past their
        own deadline, 429 `target_unreachable` for a sheddable one whose target passed, 429
        `wait_bound` for one that would otherwise rank with a preempting tier."""
        expired = self._waiting.expire(now)
        if not expired:
            return
        deliveries: list[Delivery] = []
        for sequence in expired:
            self._by_id.pop(sequence.request.request_id, None)
            error = self._expiry_error(sequence, now)
            self._count_rejected(error.code if isinstance(error, (TargetUnreachable, WaitBound)) else "deadline")
            deliveries.append((sequence, error))
        self._count_queues()
        self._deliver(deliveries)

    def _expiry_error(self, sequence: _Sequence, now: float) -> DeadlineExceeded | TargetUnreachable | WaitBound:
        request, forecast = sequence.request, sequence.forecast or Forecast()
        terms = request.terms
        if terms is None or (request.deadline is not None and request.deadline < now):
            return DeadlineExceeded()
        retry = retry_after_seconds(self._outlook.wait_s.get(request.priority, 0.0))
        if terms.sheddable and terms.ttft_target_s is not None and forecast.ttft_deadline is not None \
                and forecast.ttft_deadline < now:
            return TargetUnreachable(request.priority, terms.ttft_target_s, now - forecast.arrival + forecast.prefill_s,
                                     retry)
        if terms.wait_bound is not None:
            bound, lane = terms.wait_bound
            return WaitBound(request.priority, lane, bound, now - forecast.arrival, retry)
        return DeadlineExceeded()

    def _free_slots(self) -> int:
        """Sequences the next admission may start: batch room, and room in the prefill groups.

        With nothing in the batch there is no decoding to protect and nobody ahead: a burst
        is admitted whole, so sorting it by length gives the least padded prefill groups.
        """
        if not self._running:
            return self._config.max_running
        return min(self._config.max_running - len(self._running),
                   2 * self._config.prefill_batch_size - self._prefilling)

    def _admit(self, generator: BatchGenerator) -> None:
        free = self._free_slots()
        admitted = self._waiting.pop(
            free, cost=_prefill_cost,
            budget=self._config.prefill_token_budget - self._prefilling_tokens,
            at_least_one=self._prefilling == 0, now=time.monotonic(),
        ) if free > 0 else []
        if self._gate is not None and admitted:
            # Resumed sequences still hold their reservation: only new ones pass the gate.
            resumed = [s for s in admitted if s.paused is not None]
            fresh = [s for s in admitted if s.paused is None]
            admitted = resumed + (self._gate_admission(fresh) if fresh else [])
        if not admitted:
            return
        # mlx-lm prefills its queue in groups, each padded to its longest prompt: neighbours of
        # similar length waste less. Priority still comes first.
        admitted.sort(key=lambda s: (s.request.priority.rank, len(s.request.prompt_tokens)))
        assert self._samplers is not None
        prompts, caches, cached_tokens, max_tokens, samplers = [], [], [], [], []
        inserted: list[_Sequence] = []
        instant: list[tuple[_Sequence, mx.array]] = []
        for sequence in admitted:
            if sequence.paused is not None:
                prompt, cache, done = self._resume_sequence(sequence)
                inserted.append(sequence)
                prompts.append(prompt)
                caches.append(cache)
                cached_tokens.append(done)
                max_tokens.append(sequence.request.sampling.max_tokens - sequence.generated)
                samplers.append(sequence.sampler)
                continue
            sequence.sampler = self._samplers.sampler(sequence.request.sampling)
            if (row := self._first_row(sequence.request)) is not None:
                instant.append((sequence, row))
                continue
            inserted.append(sequence)
            samplers.append(sequence.sampler)
            max_tokens.append(sequence.request.sampling.max_tokens)
            tokens = sequence.request.prompt_tokens
            cache, cached = self._prefix.fetch(tokens)
            shared = sequence.request.shared_prefix
            if shared is not None and cached < shared.tokens < len(tokens):
                try:
                    cache, cached = kvcodec.decode(shared.blob, shared.tokens), shared.tokens
                    self._stats.shared_prefix_tokens_total += cached
                except kvcodec.KVCodecError as exc:
                    log.warning("shared prefix unusable request_id=%s error=%s", sequence.request.request_id, exc)
            sequence.cached_tokens = cached
            sequence.prefill_tokens = len(tokens)  # as the budget counted it: cached prefix included
            prompts.append(list(tokens[cached:]))
            caches.append(cache)
            cached_tokens.append(list(tokens[:cached]))
        self._note_waits(admitted)
        if inserted:
            self._note_prefill([len(p) for p in prompts])
            uids = generator.insert(
                prompts,
                max_tokens=max_tokens,
                caches=caches,  # type: ignore[arg-type]  # None entries (no cache) are mlx-lm's own default
                all_tokens=cached_tokens,
                samplers=samplers,
                logits_processors=[logits_processors(s.request.sampling) for s in inserted],
            )
            admitted_at = time.perf_counter()
            for uid, sequence in zip(uids, inserted, strict=True):
                sequence.uid = uid
                sequence.admitted_at = admitted_at
                self._running[uid] = sequence
                if sequence.resuming:
                    continue
                self._stats.prompt_tokens_total += len(sequence.request.prompt_tokens)
                self._stats.prompt_tokens_cached_total += sequence.cached_tokens
            self._prefilling += len(inserted)
            self._prefilling_tokens += sum(s.prefill_tokens for s in inserted)
        if instant:
            self._answer_instantly(instant)
        self._count_prefix_cache()
        self._count_queues()

    def _first_row(self, request: GenerationRequest) -> mx.array | None:
        """The kept first-token log-probabilities of `request`'s prompt, when its one token
        can be drawn from them (a 1-token completion, no penalty); else None."""
        if request.sampling.max_tokens != 1 or request.sampling.penalized:
            return None
        return self._prefix.first_logprobs(request.prompt_tokens)

    def _answer_instantly(self, instant: list[tuple[_Sequence, mx.array]]) -> None:
        """1-token completions of prompts that ran here before: each token is drawn (with the
        request's own sampler) from its prompt's kept log-probabilities, no forward pass, and
        delivered through the same path as a step's (stop strings, log-probabilities, books)."""
        stats = self._stats
        eos = set(self.tokenizer.eos_token_ids) if self.tokenizer is not None else set()
        responses = []
        now = time.perf_counter()
        for sequence, row in instant:
            self._instant_uid -= 1  # below mlx-lm's uids (>= 0): never one of the batch's
            uid = sequence.uid = self._instant_uid
            sequence.admitted_at = now
            sequence.prefilled = True
            prompt = len(sequence.request.prompt_tokens)
            sequence.cached_tokens = prompt
            self._running[uid] = sequence
            stats.prompt_tokens_total += prompt
            stats.prompt_tokens_cached_total += prompt
            token = int(sequence.sampler(row[None]).item())
            responses.append(GenerationBatch.Response(uid=uid, token=token, logprobs=row,
                                                      finish_reason="stop" if token in eos else "length",
                                                      prompt_cache=None, all_tokens=None))
        stats.generation_tokens_total += len(responses)
        stats.instant_answers_total += len(responses)
        deliveries, ended, _ = self._detokenize(responses, self._read_logprobs(responses))
        self._note_first_tokens(deliveries)
        self._retire(ended)
        stats.running = len(self._running)
        self._hand_over(deliveries, urgent=True)

    def _keep_first_rows(self, responses: list[Any]) -> None:
        """Keep the log-probabilities each new sequence's first token came from (prompt → row)."""
        for response in responses:
            sequence = self._running.get(response.uid)
            if (sequence is not None and sequence.generated == 1 and sequence.resumed_at is None
                    and response.uid >= 0 and not sequence.request.sampling.penalized):
                self._prefix.keep_first(sequence.request.prompt_tokens, response.logprobs)

    # ---- per-tier figures (exported by the agent's /metrics) ----

    def _note_waits(self, admitted: list[_Sequence]) -> None:
        now = time.monotonic()
        waits = self._stats.wait_seconds
        for sequence in admitted:
            if sequence.resuming or sequence.forecast is None:
                continue
            tier = sequence.request.priority.value
            buckets = waits.get(tier)
            if buckets is None:
                buckets = waits[tier] = Buckets(WAIT_BUCKETS)
            buckets.observe(max(0.0, now - sequence.forecast.arrival))

    def _note_first_tokens(self, deliveries: list[Delivery]) -> None:
        now = time.monotonic()
        errors = self._stats.ttft_error_seconds
        for sequence, event in deliveries:
            if isinstance(event, TokenEvent) and event.completion_tokens == 1 and sequence.forecast is not None:
                tier = sequence.request.priority.value
                buckets = errors.get(tier)
                if buckets is None:
                    buckets = errors[tier] = Buckets(ERROR_BUCKETS)
                buckets.observe(now - sequence.forecast.arrival - sequence.predicted_ttft_s)

    # ---- preemption: pause a lower tier's sequence, keep its KV, resume it unchanged ----

    def _preempt(self, generator: BatchGenerator) -> None:
        """Pause running sequences for waiting requests that may preempt and would otherwise miss
        their first-token deadline (no slot frees before they must start): one victim each,
        chosen by `admission.choose_victim`."""
        now = time.monotonic()
        urgent: list[tuple[float, Priority]] = []
        for sequence, priority, forecast in self._waiting.items():
            terms = sequence.request.terms
            if sequence.paused is None and terms is not None and terms.preempt and forecast.ttft_deadline is not None:
                urgent.append((forecast.ttft_deadline - now - forecast.prefill_s, priority))
        if not urgent:
            return
        speed, batch = self._speed, len(self._running)
        views = {
            str(uid): RunningView(
                str(uid), s.request.priority,
                speed.remaining_seconds(s.generated, s.request.sampling.max_tokens, batch),
                decoding=s.prefilled and s.generated > 0 and not s.resuming,
                preemptible=s.resumed_at is None or s.generated - s.resumed_at >= MIN_TOKENS_AFTER_RESUME)
            for uid, s in self._running.items()}
        for slack, priority in sorted(urgent):
            if len(self._paused) >= self._config.max_paused:
                break
            victim = choose_victim(priority, slack, self._config.max_running - batch, list(views.values()))
            if victim is None:
                continue
            del views[victim.key]
            self._pause(generator, self._running[int(victim.key)])

    def _pause(self, generator: BatchGenerator, sequence: _Sequence) -> None:
        """Take the sequence out of the batch with its KV and queue it again (with no deadline:
        it has started). mlx-lm samples one token ahead: the KV is trimmed by the last token
        delivered, which the resume feeds again, and a seeded sampler gives back its last draw,
        so the resumed sequence produces exactly the tokens it would have."""
        assert sequence.uid is not None
        uid, request = sequence.uid, sequence.request
        cache, tokens = generator.remove([uid], return_prompt_caches=True)[uid]
        del self._running[uid]
        sequence.uid = None
        nbytes = sum(c.nbytes for c in cache)
        key = _paused_key(request.request_id)
        # The KV stays where it was: what the request's projection (prompt + max_tokens, held in
        # the node's books since its admission) already counts is not reserved a second time.
        extra = max(0, nbytes - self._projection_held(request))
        kept = can_trim_prompt_cache(cache) and (extra == 0 or self._budget.reserve(key, extra))
        if kept:
            trim_prompt_cache(cache, 1)
        if isinstance(sequence.sampler, SeededSampler):
            sequence.sampler.rewind()
        sequence.paused = _Paused(cache if kept else None, list(tokens))
        self._paused.add(request.request_id)
        forecast = sequence.forecast or Forecast()
        left = self._speed.remaining_seconds(sequence.generated, request.sampling.max_tokens, len(self._running) + 1)
        self._waiting.push(request.request_id, sequence, request.priority, None, over_limit=True,
                           forecast=replace(forecast, prefill_s=0.0, duration_s=left),
                           floor=lane_floor(request.terms.wait_bound if request.terms is not None else None))
        self._preempted[request.priority.value] += 1
        self._count_paused()
        log.info("sequence paused request_id=%s priority=%s generated=%d kv_kept=%s kv_bytes=%d", request.request_id,
                 request.priority.value, sequence.generated, kept, nbytes if kept else 0)

    def _projection_held(self, request: GenerationRequest) -> int:
        """Bytes of this running request's KV that the budget already holds: its projection, when
        the budget is the node's books (the gate reserved it at admission and keeps it until the
        request ends, paused or not); 0 for a budget of its own."""
        if self._gate is None or self._budget is not self._memory:
            return 0
        return self._gate.projected(request)

    def _resume_sequence(self, sequence: _Sequence) -> tuple[list[int], list[Any] | None, list[int]]:
        """What to insert for a paused sequence: (prompt, cache, tokens the cache covers)."""
        paused = sequence.paused
        assert paused is not None
        sequence.paused = None
        sequence.resuming = True
        sequence.resumed_at = sequence.generated
        self._paused.discard(sequence.request.request_id)
        self._budget.release(_paused_key(sequence.request.request_id))
        self._resumed[sequence.request.priority.value] += 1
        self._count_paused()
        sequence.prefill_tokens = 1 if paused.cache is not None else len(paused.tokens)
        if paused.cache is not None:
            return paused.tokens[-1:], paused.cache, paused.tokens[:-1]
        self._stats.recomputed_tokens_total += len(paused.tokens)
        return paused.tokens, None, []

    def _drop_paused(self, sequence: _Sequence) -> None:
        sequence.paused = None
        self._paused.discard(sequence.request.request_id)
        self._budget.release(_paused_key(sequence.request.request_id))
        self._count_paused()

    def _count_paused(self) -> None:
        stats = self._stats
        stats.paused = len(self._paused)
        stats.paused_kv_bytes = sum(
            sum(c.nbytes for c in s.paused.cache) for rid in self._paused
            if (s := self._by_id.get(rid)) is not None and s.paused is not None and s.paused.cache is not None)
        stats.preemptions_total = dict(self._preempted)
        stats.resumes_total = dict(self._resumed)

    def _step(self, generator: BatchGenerator) -> None:
        """One batched forward pass, then what follows from it, step by step (the hot loop)."""
        started = time.perf_counter()
        prompt_responses, responses = generator.next()
        spent = time.perf_counter() - started
        stats = self._stats
        # Measured rates for routers (`/v1/signals`): a step that processed prompt tokens
        # counts as prefill time, one that only decoded as decode time.
        prefilling = bool(prompt_responses) or self._prefilling > 0
        if responses:
            self._speed.observe_step(len(responses), spent, decode_only=not prefilling)
        if prefilling:
            stats.prefill_seconds_total += spent
        else:
            stats.decode_seconds_total += spent
            stats.decode_only_steps_total += 1
            stats.decode_only_tokens_total += len(responses)
        self._note_prefill_work(prompt_responses, spent)
        self._note_prefilled(prompt_responses)
        if not responses:
            if self._held:
                self._hand_over([], urgent=False)
            return
        stats.decode_steps_total += 1
        stats.generation_tokens_total += len(responses)
        if len(responses) != self._decode_width:
            self._note_decode_width(len(responses))
        deliveries, ended, first_token = self._detokenize(responses, self._read_logprobs(responses))
        if first_token:
            self._note_first_tokens(deliveries)
            self._keep_first_rows(responses)
        if ended:
            self._retire(ended)
            self._keep_prompts(generator, ended)
        stats.running = len(self._running)  # before delivering: whoever sees the last event sees the slot free
        # A prefill is about to hold up the next step: hand over now rather than after it.
        self._hand_over(deliveries, urgent=bool(ended) or first_token or self._prefilling > 0)

    def _note_prefill_work(self, prompt_responses: list[Any], spent: float) -> None:
        """The aggregate prefill rate: prompt tokens this step processed (mlx-lm's progress per
        prompt) over its time; and what each prompt mid-way has done (the outlook's serial bound)."""
        done = self._prompt_done
        now: dict[int, int] = {}
        tokens = 0
        for progress in prompt_responses:
            if progress.end_of_prompt or not isinstance(progress.progress, tuple):
                continue
            processed = int(progress.progress[0])
            tokens += max(0, processed - done.get(progress.uid, 0))
            now[progress.uid] = processed
        self._prompt_done = now
        self._speed.observe_prefill_work(tokens, spent)

    def _note_prefilled(self, prompt_responses: list[Any]) -> None:
        """Sequences whose whole prompt is now processed leave the prefill bounds."""
        for progress in prompt_responses:
            if progress.end_of_prompt and (sequence := self._running.get(progress.uid)) is not None:
                self._prefill_done(sequence)
                if self._gate is not None:  # its prefill scratch goes back to the books
                    self._gate.prefilled(sequence.request)
                if sequence.resuming:  # one fed-back token (or a recompute): not a prompt's speed
                    sequence.resuming = False
                    continue
                # Admission to prefilled: slower than the prefill alone (decode steps share it),
                # so the speed model errs on the slow side.
                self._speed.observe_prefill(len(sequence.request.prompt_tokens) - sequence.cached_tokens,
                                            time.perf_counter() - sequence.admitted_at)

    def _detokenize(self, responses: list[Any], logprobs: dict[int, TokenLogprob],
                    ) -> tuple[list[Delivery], list[_Ended], bool]:
        """Each sequence's new token as an event: its text decoded incrementally, held back or
        cut at a stop string; also the sequences that ended, and whether any token was a first."""
        running = self._running
        deliveries: list[Delivery] = []
        ended: list[_Ended] = []
        first_token = False
        for response in responses:
            sequence = running.get(response.uid)
            if sequence is None:
                continue
            sequence.generated += 1
            if sequence.generated == 1:
                first_token = True
            finish: FinishReason | None = response.finish_reason
            detokenizer = sequence.detokenizer
            if finish != "stop":  # an EOS token is not text
                detokenizer.add_token(response.token)
            if finish is not None:
                detokenizer.finalize()
            stops = sequence.stops
            text = stops.feed(detokenizer.last_segment)
            by_stop_string = False
            if stops.stopped:
                by_stop_string = finish is None
                finish = "stop"
            elif finish is not None:
                text += stops.flush()
            deliveries.append((sequence, TokenEvent(
                text, response.token, sequence.generated, finish,
                logprobs.get(response.uid) if logprobs else None, sequence.cached_tokens,
            )))
            if finish is not None:
                ended.append(_Ended(sequence, response, finish, by_stop_string))
        return deliveries, ended, first_token

    def _retire(self, ended: list[_Ended]) -> None:
        """The ended sequences leave the engine's books (their slots are free); count why they ended."""
        for end in ended:
            del self._running[end.response.uid]
            self._by_id.pop(end.sequence.request.request_id, None)
            self._count_finished(end.reason)
            self._speed.observe_finished(end.sequence.generated, end.sequence.request.sampling.max_tokens)
            if self._gate is not None:
                self._gate.done(end.sequence.request.request_id)

    def _keep_prompts(self, generator: BatchGenerator, ended: list[_Ended]) -> None:
        """Store the ended sequences' KV in the prefix cache, and publish their prompts' to the fleet.

        mlx-lm hands back the cache of a sequence it ended; one ended by a stop string is
        still in its batch, and taking it out hands its cache back.
        """
        by_stop_string: dict[int, _Sequence] = {}
        for end in ended:
            response = end.response
            if response.prompt_cache is not None:
                self._prefix.store(response.all_tokens, response.prompt_cache)
                self._publish(end.sequence, response.prompt_cache)
            if end.by_stop_string:
                by_stop_string[response.uid] = end.sequence
        if by_stop_string:
            caches = generator.remove(list(by_stop_string), return_prompt_caches=True)
            for uid, (cache, tokens) in caches.items():
                self._prefix.store(tokens, cache)
                if (sequence := by_stop_string.get(uid)) is not None:
                    self._publish(sequence, cache)
        self._count_prefix_cache()

    def _publish(self, sequence: _Sequence, cache: list[Any]) -> None:
        """Share the finished sequence's prompt KV with other agents, unless it came from them
        (or from a cache as long) or is too short to be worth it."""
        if self._publisher is None:
            return
        prompt = sequence.request.prompt_tokens
        end = self._publisher.boundary(len(prompt))
        if end == 0 or sequence.cached_tokens >= end:
            return
        try:
            blob = kvcodec.encode(cache, end)
        except kvcodec.KVCodecError as exc:
            log.debug("prompt kv not shared path=%s reason=%s", self._path, exc)
            return
        self._publisher.publish(tuple(prompt[:end]), blob)

    def _prefill_done(self, sequence: _Sequence) -> None:
        """The sequence no longer counts against the prefill bounds (prefilled or cancelled)."""
        sequence.prefilled = True
        self._prefilling -= 1
        self._prefilling_tokens -= sequence.prefill_tokens
        self._stats.queued_prompt_tokens = self._waiting.weight_total + self._prefilling_tokens

    def _hand_over(self, deliveries: list[Delivery], urgent: bool) -> None:
        """Deliver this step's events, or hold them until the stream interval has passed.

        First tokens (time to first token), last ones (a free slot) and those before a
        prefill always go at once, with everything held. Held events of one request reach
        it together, all but its last marked `more`, so its transport can write them in
        one go.
        """
        self._held += deliveries
        now = time.monotonic()
        if not urgent and now - self._handed_over < self._config.stream_interval_s:
            return
        held, self._held, self._handed_over = self._held, [], now
        last: dict[_Sequence, int] = {}
        for index, (sequence, _) in enumerate(held):
            last[sequence] = index
        if len(last) < len(held):  # some request has several events: mark all but its last
            held = [(s, replace(e, more=True)) if i != last[s] and isinstance(e, TokenEvent) else (s, e)
                    for i, (s, e) in enumerate(held)]
        self._deliver(held)

    def _read_logprobs(self, responses: list[Any]) -> dict[int, TokenLogprob]:
        wanted = [(r, s.request.sampling.logprobs) for r in responses
                  if (s := self._running.get(r.uid)) is not None and s.request.sampling.logprobs is not None]
        if not wanted:
            return {}
        assert self._logprobs is not None
        read = self._logprobs.read([r.logprobs for r, _ in wanted], [r.token for r, _ in wanted],
                                   [n for _, n in wanted])
        return {r.uid: lp for (r, _), lp in zip(wanted, read, strict=True)}

    def _count_queues(self) -> None:
        self._stats.running = len(self._running)
        self._stats.waiting = len(self._waiting)
        self._stats.waiting_by_priority = {p.value: n for p, n in self._waiting.counts().items()}
        self._stats.queued_prompt_tokens = self._waiting.weight_total + self._prefilling_tokens

    def _count_prefix_cache(self) -> None:
        stats, prefix = self._stats, self._prefix
        stats.prompt_cache_bytes = prefix.nbytes
        stats.prompt_cache_entries = len(prefix)
        stats.prompt_cache_lookups_total = prefix.lookups
        stats.prompt_cache_hits_total = prefix.hits
        if self._gate is not None:
            self._gate.prefix_changed(prefix.nbytes)

    # ---- shapes: warm-up before ready, unwarmed shapes after ----

    def _note_decode_width(self, width: int) -> None:
        self._decode_width = width
        self._note_shape(Shape(ShapeKind.DECODE, width))

    def _note_prefill(self, prompt_lengths: list[int]) -> None:
        for shape in self._shapes.plan.prefill_shapes(prompt_lengths):
            self._note_shape(shape)

    def _note_shape(self, shape: Shape) -> None:
        book = self._shapes
        if book.note(shape):
            self._stats.unwarmed_shapes_total = len(book.unwarmed)
            log.warning("unwarmed shape compiled while serving shape=%s path=%s", shape, self._path)
        elif not book.warmed:
            self._stats.warmup_shapes_done = book.progress[0]

    def _warm_up(self, generator: BatchGenerator, vocab_size: int) -> None:
        """Run every shape of the plan once (`engine.shapes`) so that kernel compilation does not
        hit users; `stats.warmup_shapes_done/total` say how far it got."""
        book = self._shapes
        if self._config.warmup_tokens < 1:
            book.warmed = True
            return
        started = time.perf_counter()
        self._stats.warmup_shapes_total = book.progress[1]
        runs = book.plan.runs(self._config.warmup_tokens)
        if precompile.wanted(device.accelerator().kind):  # CUDA: compile in children, in parallel
            precompile.compile_ahead(self._path, self._config, runs)
        for run in runs:
            self._warm_run(generator, run, vocab_size)
        for run in book.plan.decode_top_up(book.seen):
            self._warm_run(generator, run, vocab_size)
        warm_samplers(vocab_size, book.plan.decode_widths)
        mx.synchronize()
        if book.plan.cpu:
            book.cover()
        book.warmed = True
        self._decode_width = 0
        done, total = book.progress
        self._stats.warmup_shapes_done = done
        self._count_device_memory()
        log.info("engine warmed up path=%s shapes=%d/%d seconds=%.2f", self._path, done, total,
                 time.perf_counter() - started)

    def _settle_dense_copies(self, loaded: loading.LoadedModel) -> loading.LoadedModel:
        """Measure from which width the dense copies are faster (`engine.densecopies`); drop
        them, and their bytes from the memory books, where they win at no width."""
        dense = loaded.dense
        if dense is None:
            return loaded
        record = self._dense_record()
        remembered = densecopies.read_record(record) if record is not None else None
        if remembered is not None:
            dense.switch.min_rows = remembered
            log.info("dense copies crossover remembered path=%s bytes=%d from_rows=%s record=%s", self._path,
                     dense.bytes, remembered, record)
        else:
            widths = [w for w in densecopies.MEASURED_WIDTHS if w <= self._config.max_running]
            timings = densecopies.measure(dense, densecopies.decode_step(loaded.model), widths)
            dense.switch.min_rows = densecopies.choose_min_rows(timings)
            steps = " ".join(f"w{w}={q * 1e3:.2f}/{d * 1e3:.2f}ms" for w, (q, d) in timings.items())
            log.info("dense copies measured path=%s bytes=%d from_rows=%s quantized/dense %s", self._path,
                     dense.bytes, dense.switch.min_rows, steps)
            if record is not None:
                densecopies.write_record(record, dense.switch.min_rows, timings)
        if dense.switch.min_rows != densecopies.NEVER:
            self._stats.dense_copy_bytes = dense.bytes
            self._stats.dense_from_rows = int(dense.switch.min_rows)
            return loaded
        info = replace(loaded.info, memory_bytes=loaded.info.memory_bytes - dense.bytes)
        dense.drop()
        mx.clear_cache()
        loaded = replace(loaded, info=info, dense=None)
        if self._gate is not None:
            self._book_weights(loaded)
        return loaded

    def _dense_record(self) -> Path | None:
        """Where a restart finds the measured crossover: beside the compiled kernels (CUDA with
        a kernel cache), keyed like them and by the device's name; None: measure every start."""
        cache = os.environ.get(precompile.CACHE_ENV)
        accelerator = device.accelerator()
        if not cache or not precompile.wanted(accelerator.kind):
            return None
        runs = self._shapes.plan.runs(max(self._config.warmup_tokens, 1))
        name = "".join(c if c.isalnum() else "-" for c in accelerator.device_name or "device")
        return precompile.marker(cache, self._path, self._config, runs, kind=f"dense-{name}")

    def compile_only(self, runs: list[WarmupRun]) -> None:
        """Load the model and run these warm-up runs on this thread, then drop it all (a
        `precompile` child: what counts is the kernels it leaves in the compile cache)."""
        loaded = loading.load(self._path, self._config.load)
        generator = self._generator(loaded)
        self._samplers = SamplerFactory(loaded.vocab_size)
        for run in runs:
            self._warm_run(generator, run, loaded.vocab_size)
        warm_samplers(loaded.vocab_size, list(range(1, self._config.max_running + 1)))
        mx.synchronize()
        generator.close()

    def _generator(self, loaded: loading.LoadedModel) -> BatchGenerator:
        return BatchGenerator(
            loaded.model,
            stop_tokens=[[t] for t in loaded.tokenizer.eos_token_ids],
            completion_batch_size=self._config.max_running,
            prefill_batch_size=min(self._config.prefill_batch_size, self._config.max_running),
            prefill_step_size=self._config.prefill_step_size,
            stream=mx.default_stream(mx.default_device()),
        )

    def _warm_run(self, generator: BatchGenerator, run: WarmupRun, vocab_size: int) -> None:
        assert self._samplers is not None
        span = max(1, vocab_size - WARMUP_FIRST_TOKEN)
        prompts = [[WARMUP_FIRST_TOKEN + (7 * i + 13 * j) % span for j in range(length)]
                   for i, length in enumerate(run.prompt_lengths)]
        params = SamplingParams(max_tokens=1, temperature=0.0 if run.sampler == "greedy" else 1.0)
        sampler = self._samplers.sampler(params)
        self._note_prefill([len(p) for p in prompts])
        pending = set(generator.insert(prompts, max_tokens=list(run.max_tokens),
                                       samplers=[sampler] * len(prompts)))
        while pending:
            prompt_responses, responses = generator.next()
            if responses and len(responses) != self._decode_width:
                self._note_decode_width(len(responses))
            pending -= {r.uid for r in responses if r.finish_reason is not None}
            if not prompt_responses and not responses:
                break
        self._decode_width = 0

    def _count_device_memory(self) -> None:
        """MLX's allocator counters (read on this thread: no other thread talks to MLX)."""
        stats = self._stats
        stats.device_memory_active_bytes = mx.get_active_memory()
        stats.device_memory_peak_bytes = mx.get_peak_memory()
        stats.device_memory_cache_bytes = mx.get_cache_memory()

    def _count_finished(self, reason: str) -> None:
        self._finished[reason] += 1
        self._stats.requests_finished_total = dict(self._finished)

    # ---- memory admission (engine.memorygate: the node's books, projected KV bytes) ----

    def _open_gate(self, loaded: loading.LoadedModel) -> None:
        if self._config.mlx_cache_limit_bytes is not None:  # weight_management's, with or without admission
            previous = mx.set_cache_limit(self._config.mlx_cache_limit_bytes)
            log.info("mlx cache limit bytes=%d previous=%d", self._config.mlx_cache_limit_bytes, previous)
        memory, per_token = self._memory, loaded.info.kv_bytes_per_token
        if memory is None or per_token is None:
            return
        self._book_weights(loaded)
        self._gate = MemoryGate(memory, self._name, per_token, self._available_memory,
                                self._config.memory_wait_s, prefill=loaded.info.prefill,
                                prefill_step=self._config.prefill_step_size)
        # MLX's own limits, process-wide: allocations past the limit wait for frees (and the
        # buffer cache is bounded) instead of growing until the OS kills us.
        mx.set_memory_limit(max(memory.policy.capacity_bytes - memory.policy.headroom_bytes, 1))
        log.info("memory admission on model=%s kv_bytes_per_token=%d %s", self._name, per_token,
                 " ".join(f"{k}={v}" for k, v in memory.snapshot().items()))

    def _book_weights(self, loaded: loading.LoadedModel) -> None:
        """Its weights in the node's books: `info.memory_bytes` (dense copies included), or,
        with a tensor share, its tensors outside the share plus its dense copies, the shared
        ones counted once whichever models hold them."""
        assert self._memory is not None
        if loaded.unshared_bytes is None:
            self._memory.add_weights(self._name, loaded.info.memory_bytes)
        else:
            dense = loaded.dense.bytes if loaded.dense is not None else 0
            self._memory.add_weights(self._name, loaded.unshared_bytes + dense, shared=loaded.shared)

    def _gate_admission(self, admitted: list[_Sequence]) -> list[_Sequence]:
        """What the scheduler picked, less what does not fit: back to wait, or refused."""
        assert self._gate is not None
        go, back, refused = self._gate.admit(admitted, self._prefix)
        for sequence in back:
            request = sequence.request
            self._waiting.push(request.request_id, sequence, request.priority, request.deadline, over_limit=True,
                               weight=len(request.prompt_tokens))
        if refused:
            for sequence, _ in refused:
                self._by_id.pop(sequence.request.request_id, None)
            self._refuse_for_memory(list(refused))
        self._count_prefix_cache()
        return go

    def _refuse_for_memory(self, refused: list[Delivery]) -> None:
        self._count_rejected("memory", len(refused))
        self._count_queues()
        self._deliver(refused)

    def _fail_all(self, error: EngineError) -> None:
        failed: list[Delivery] = [*self._held, *((s, error) for s in self._by_id.values())]
        self._held = []
        while True:  # submissions that raced with the stop
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Submit):
                failed.append((command.sequence, error))
        for request_id in self._paused:
            self._budget.release(_paused_key(request_id))
        self._paused.clear()
        self._by_id.clear()
        self._running.clear()
        self._waiting.drain()
        self._prefilling = self._prefilling_tokens = 0
        self._prompt_done = {}
        self._stats.running = self._stats.waiting = 0
        self._stats.waiting_by_priority = {}
        self._stats.queued_prompt_tokens = 0
        self._deliver(failed)

    @staticmethod
    def _deliver(items: list[Delivery]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Put]] = defaultdict(list)
        for sequence, item in items:
            by_loop[sequence.loop].append((sequence.sink, item))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, batch)


def _paused_key(request_id: str) -> str:
    return f"paused:{request_id}"


def _wait_deadline(request: GenerationRequest, forecast: Forecast) -> float | None:
    """Until when a request may wait for a slot: its own deadline; for a tier with a wait
    bound, no longer than the bound (past it, it would rank with a preempting tier's requests);
    for a sheddable tier, no later than its first-token deadline (it would miss its target
    for certain; shed then, it costs the machine nothing more). None: it waits as long as it takes."""
    terms = request.terms
    ends = [request.deadline] if request.deadline is not None else []
    if terms is not None:
        if terms.wait_bound is not None:
            ends.append(forecast.arrival + terms.wait_bound[0])
        if terms.sheddable and forecast.ttft_deadline is not None:
            ends.append(forecast.ttft_deadline)
    return min(ends) if ends else None


def _prefill_cost(sequence: _Sequence) -> int:
    """What a sequence costs the prefill token budget: its prompt, or what its resume feeds."""
    paused = sequence.paused
    if paused is None:
        return len(sequence.request.prompt_tokens)
    return 1 if paused.cache is not None else len(paused.tokens)


def _put_all(batch: list[_Put]) -> None:
    for sink, item in batch:
        sink.put_nowait(item)
