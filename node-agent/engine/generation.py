"""Continuous batching on mlx-lm's `BatchGenerator`, driven by one thread per model.

The asyncio side never touches MLX. It hands requests to the engine thread through a
thread-safe command queue and gets each request's tokens back on its own
`asyncio.Queue` (one `call_soon_threadsafe` per step for the whole batch). The thread
loads the model, warms it up, then loops: take commands, admit waiting sequences into
free slots, run one `BatchGenerator.next()` step, detokenize each sequence
incrementally, apply stop strings, deliver.

What this module deliberately leaves to others: which waiting request goes first
(`scheduling`), how prompts are built (`prompts`), HTTP and OpenAI shapes (the data
plane). Prompt caching and preemption come later, behind the same interface.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from mlxpool.agent.engine import blas as _blas  # noqa: F401  (must precede mlx)

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import BatchGenerator  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from mlxpool.agent.engine import loading  # noqa: E402
from mlxpool.agent.engine.interface import (  # noqa: E402
    EngineError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TokenEvent,
)
from mlxpool.agent.engine.scheduling import FifoAdmission  # noqa: E402
from mlxpool.agent.engine.stopping import StopStringMatcher  # noqa: E402

log = logging.getLogger(__name__)

WARMUP_PROMPTS = ("Hello", "The quick brown fox jumps over the lazy dog.")


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 32
    """Sequences in the batch at once; more wait in the admission queue."""
    prefill_batch_size: int = 8
    """Prompts prefilled together in one step."""
    prefill_step_size: int = 2048
    """Prompt tokens per prefill chunk; long prompts are split so decoding keeps going."""
    warmup_tokens: int = 4
    """Tokens generated per warm-up run (0 disables warm-up)."""

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.prefill_batch_size < 1 or self.prefill_step_size < 1:
            raise ValueError("max_running, prefill_batch_size and prefill_step_size must be >= 1")


@dataclass(eq=False)
class _Sequence:
    """Engine-thread state of one request."""

    request: GenerationRequest
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    detokenizer: Any = None
    stops: StopStringMatcher = field(default_factory=lambda: StopStringMatcher(()))
    uid: int | None = None
    generated: int = 0


@dataclass(frozen=True)
class _Submit:
    sequence: _Sequence


@dataclass(frozen=True)
class _Cancel:
    request_id: str


_STOP = object()


class BatchEngine:
    """Serves one model directory; implements `interface.Engine`."""

    def __init__(self, model_path: str, config: EngineConfig | None = None, name: str = "model") -> None:
        self._path = model_path
        self._config = config or EngineConfig()
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stats = EngineStats()
        self._loaded: Future[ModelInfo] = Future()
        self._accepting = False
        self._accepting_lock = threading.Lock()
        self._alive = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self.tokenizer: Any = None
        """mlx-lm's TokenizerWrapper, set once the model is loaded."""
        # Engine-thread state.
        self._admission: FifoAdmission[_Sequence] = FifoAdmission()
        self._running: dict[int, _Sequence] = {}
        self._by_id: dict[str, _Sequence] = {}
        self._samplers: dict[tuple[float, float], Any] = {}
        self._finished: Counter[str] = Counter()

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
        """Stop the thread; requests still running fail with EngineError."""
        with self._accepting_lock:
            self._accepting = False
        if self._thread.is_alive():
            self._commands.put(_STOP)
            await asyncio.to_thread(self._thread.join, timeout)

    async def submit(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        sequence = _Sequence(request, asyncio.Queue(), asyncio.get_running_loop())
        with self._accepting_lock:
            if not self._accepting:
                raise EngineError("the engine is not running")
            self._commands.put(_Submit(sequence))
        done = False
        try:
            while True:
                item = await sequence.sink.get()
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

    # ---- engine thread ----

    def _run(self) -> None:
        try:
            loaded = loading.load(self._path)
            generator = BatchGenerator(
                loaded.model,
                stop_tokens=[[t] for t in loaded.tokenizer.eos_token_ids],
                completion_batch_size=self._config.max_running,
                prefill_batch_size=min(self._config.prefill_batch_size, self._config.max_running),
                prefill_step_size=self._config.prefill_step_size,
                stream=mx.default_stream(mx.default_device()),
            )
            self._warm_up(generator, loaded.tokenizer)
        except BaseException as exc:
            log.exception("engine failed to load model path=%s", self._path)
            if not self._loaded.cancelled():
                self._loaded.set_exception(exc)
            return
        self.tokenizer = loaded.tokenizer
        self._alive = True
        if self._loaded.cancelled():  # the agent gave up waiting (shutdown during load)
            self._alive = False
            generator.close()
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

    def _serve(self, generator: BatchGenerator) -> None:
        while True:
            idle = not self._running and not len(self._admission)
            if not self._take_commands(generator, block=idle):
                return
            self._admit(generator)
            if self._running:
                self._step(generator)

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
        request_id = sequence.request.request_id
        if request_id in self._by_id:
            self._deliver([(sequence, EngineError(f"request id {request_id!r} is already running"))])
            return
        sequence.detokenizer = self.tokenizer.detokenizer  # a fresh copy per request
        sequence.stops = StopStringMatcher(sequence.request.sampling.stop)
        self._by_id[request_id] = sequence
        self._admission.push(request_id, sequence)
        self._stats.prompt_tokens_total += len(sequence.request.prompt_tokens)
        self._count_queues()

    def _cancel(self, generator: BatchGenerator, request_id: str) -> None:
        sequence = self._by_id.pop(request_id, None)
        if sequence is None:  # already finished
            return
        if self._admission.remove(request_id) is None and sequence.uid is not None:
            generator.remove([sequence.uid])
            self._running.pop(sequence.uid, None)
        self._count_finished("cancelled")
        self._count_queues()
        log.debug("request cancelled request_id=%s generated=%d", request_id, sequence.generated)

    def _admit(self, generator: BatchGenerator) -> None:
        admitted = self._admission.pop(self._config.max_running - len(self._running))
        if not admitted:
            return
        uids = generator.insert(
            [list(s.request.prompt_tokens) for s in admitted],
            max_tokens=[s.request.sampling.max_tokens for s in admitted],
            samplers=[self._sampler(s.request.sampling) for s in admitted],
        )
        for uid, sequence in zip(uids, admitted, strict=True):
            sequence.uid = uid
            self._running[uid] = sequence
        self._count_queues()

    def _step(self, generator: BatchGenerator) -> None:
        _, responses = generator.next()
        if not responses:
            return
        self._stats.decode_steps_total += 1
        self._stats.generation_tokens_total += len(responses)
        deliveries: list[tuple[_Sequence, TokenEvent | BaseException]] = []
        stopped_by_text: list[int] = []
        for response in responses:
            sequence = self._running.get(response.uid)
            if sequence is None:
                continue
            sequence.generated += 1
            finish: FinishReason | None = response.finish_reason
            detokenizer = sequence.detokenizer
            if finish != "stop":  # an EOS token is not text
                detokenizer.add_token(response.token)
            if finish is not None:
                detokenizer.finalize()
            text = sequence.stops.feed(detokenizer.last_segment)
            if sequence.stops.stopped:
                if finish is None:
                    stopped_by_text.append(response.uid)
                finish = "stop"
            elif finish is not None:
                text += sequence.stops.flush()
            deliveries.append((sequence, TokenEvent(text, response.token, sequence.generated, finish)))
            if finish is not None:
                self._running.pop(response.uid, None)
                self._by_id.pop(sequence.request.request_id, None)
                self._count_finished(finish)
        if stopped_by_text:
            generator.remove(stopped_by_text)
        self._count_queues()  # before delivering: whoever sees the last event sees the slot free
        self._deliver(deliveries)

    def _count_queues(self) -> None:
        self._stats.running = len(self._running)
        self._stats.waiting = len(self._admission)

    def _sampler(self, sampling: SamplingParams) -> Any:
        # Requests with equal parameters share one sampler object, so BatchGenerator
        # samples them in a single batched call.
        key = (sampling.temperature, sampling.top_p)
        if key not in self._samplers:
            self._samplers[key] = make_sampler(temp=sampling.temperature, top_p=sampling.top_p)
        return self._samplers[key]

    def _warm_up(self, generator: BatchGenerator, tokenizer: Any) -> None:
        """Run the first shapes once so kernel compilation does not hit users."""
        if self._config.warmup_tokens < 1:
            return
        prompts = [tokenizer.encode(p) or [0] for p in WARMUP_PROMPTS]
        for batch in (prompts[:1], prompts):
            pending = set(generator.insert(batch, max_tokens=[self._config.warmup_tokens] * len(batch)))
            while pending:
                prompt_responses, responses = generator.next()
                pending -= {r.uid for r in responses if r.finish_reason is not None}
                if not prompt_responses and not responses:
                    break
        log.info("engine warmed up path=%s", self._path)

    def _count_finished(self, reason: str) -> None:
        self._finished[reason] += 1
        self._stats.requests_finished_total = dict(self._finished)

    def _fail_all(self, error: EngineError) -> None:
        failed: list[tuple[_Sequence, TokenEvent | BaseException]] = [(s, error) for s in self._by_id.values()]
        while True:  # submissions that raced with the stop
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Submit):
                failed.append((command.sequence, error))
        self._by_id.clear()
        self._running.clear()
        self._admission.drain()
        self._stats.running = self._stats.waiting = 0
        self._deliver(failed)

    @staticmethod
    def _deliver(items: list[tuple[_Sequence, TokenEvent | BaseException]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = defaultdict(list)
        for sequence, item in items:
            by_loop[sequence.loop].append((sequence.sink, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for sink, item in batch:
        sink.put_nowait(item)
