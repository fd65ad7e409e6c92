"""The engine's typed contract: what goes in (a request), what comes out (token events).

Everything above the engine (data plane, model repository, metrics, the operations
API) talks to an engine only through these types, so none of it imports MLX. Plain
frozen dataclasses: they cross a thread boundary. A request the engine refuses fails
with the agent's own domain error (`errors.QueueFull`, `errors.DeadlineExceeded`),
which reaches the client as it is; `EngineError` is the engine itself failing.
"""

from __future__ import annotations

import bisect
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol

from mlxpool.agent.engine.memory import PrefillShape
from mlxpool.priorities import Priority

FinishReason = Literal["stop", "length"]

MAX_TOP_LOGPROBS = 20
"""Most alternatives a request may ask log-probabilities for (the wire models' limit too)."""


class AcceleratorKind(StrEnum):
    METAL = "metal"
    CUDA = "cuda"
    CPU = "cpu"


@dataclass(frozen=True)
class Accelerator:
    """The device MLX computes on, as MLX reports it (`engine.device`)."""

    kind: AcceleratorKind
    device_name: str | None
    memory_bytes: int | None
    """The device's memory (unified memory on Metal); None on the CPU backend."""

    @property
    def discrete(self) -> bool:
        """Its memory is not the host's: the weights and the KV cache live there."""
        return self.kind is AcceleratorKind.CUDA


@dataclass(frozen=True)
class DeviceMemory:
    """MLX's allocator counters, process-wide."""

    active_bytes: int
    """In live arrays."""
    peak_bytes: int
    cache_bytes: int
    """Freed buffers kept for reuse."""

    @property
    def held_bytes(self) -> int:
        return self.active_bytes + self.cache_bytes


@dataclass(frozen=True)
class DeviceProbe:
    """Reads of the device for the layers above the engine, which import no MLX: the runtime
    builds one over `engine.device` (tests over fixed values). Both calls block (off the loop)."""

    accelerator: Callable[[], Accelerator]
    memory: Callable[[], DeviceMemory]


class EngineError(RuntimeError):
    """The engine could not run a request: it is stopped or crashed, or the request id is taken."""


PinPolicy = Literal["none", "critical", "all"]


class DenseCopyPolicy(StrEnum):
    """Whether quantized linears also keep a dense copy for wide steps (`engine.densecopies`)."""

    OFF = "off"
    AUTO = "auto"
    """On CUDA, when the copies fit in a quarter of the device memory; kept only where they win."""
    ON = "on"
    """On any device (still dropped when the measurement says they win at no width)."""


@dataclass(frozen=True)
class LoadOptions:
    """How a model's weights are read and kept (the runtime file's `weight_management`)."""

    native: bool = True
    """Read safetensors through the native weight manager (mmap, native header parse,
    layer-ordered prefetch); False: mlx-lm's own reader (`mx.load`)."""
    pin_policy: PinPolicy = "critical"
    """Which loaded arrays to mlock: none, critical (embeddings, first and last layers,
    norms, output head: what every token touches) or all."""
    pin_budget_bytes: int = 1 << 30
    """Bytes pinned per model at most; past it the rest stays unpinned."""
    prefetch_threads: int = 2
    """Native threads paging the next layers' file pages in while one layer is copied (0: none)."""
    prefetch_depth: int = 2
    """Layers the prefetch runs ahead of the copy."""
    dense_copies: DenseCopyPolicy = DenseCopyPolicy.AUTO
    """Dense copies of quantized linears for steps wide enough to gain (`engine.densecopies`)."""

    def __post_init__(self) -> None:
        if self.pin_budget_bytes < 0 or not 0 <= self.prefetch_threads <= 64 or self.prefetch_depth < 1:
            raise ValueError("pin_budget_bytes must be >= 0, prefetch_threads 0..64, prefetch_depth >= 1")


@dataclass(frozen=True)
class WeightResidency:
    """Where a model's weights are now (bytes)."""

    total: int
    resident: int
    """In physical memory (mincore over the arrays' pages)."""
    pinned: int
    """Locked in memory (the pin set)."""
    mapped: int
    """Still backed by the model's files (0 when the weights were copied into MLX buffers)."""


@dataclass(frozen=True)
class LoadReport:
    """How the weights got into memory: what the load log and /v1/node say."""

    reader: Literal["native", "mlx"]
    transfer: Literal["copy", "zero-copy"]
    """zero-copy: MLX arrays alias the mapped files; copy: read once into MLX's own buffers."""
    files: int
    bytes: int
    seconds: float
    """Reading the weights (not building the model or the tokenizer)."""
    prefetch_threads: int
    pin_policy: PinPolicy
    pinned_bytes: int
    pin_message: str | None = None
    """Why fewer bytes were pinned than the policy asked for (a refusal or the budget)."""

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class WeightsView(Protocol):
    """A loaded model's weights as the layers above may inspect them (any thread)."""

    @property
    def report(self) -> LoadReport: ...

    def residency(self) -> WeightResidency: ...


@dataclass(frozen=True)
class EngineConfig:
    """How one engine batches. Built from the runtime file's `serving` section."""

    max_running: int = 32
    """Sequences in the batch at once (decode concurrency); more wait in the queue."""
    prefill_batch_size: int = 16
    """Prompts prefilled together (prefill concurrency); the rest wait in the priority queue."""
    prefill_step_size: int = 2048
    """Prompt tokens per prefill chunk; long prompts are split so decoding keeps going."""
    prefill_token_budget: int = 8192
    """Prompt tokens admitted for prefill and not yet prefilled, at most (the first prompt
    always goes); bounds how long one prefill step can hold up decoding."""
    prompt_cache_bytes: int = 512 * 1024 * 1024
    """Byte cap of the prefix cache; 0 disables it."""
    prompt_cache_entries: int = 64
    """Cached sequences at most."""
    max_waiting: dict[Priority, int] = field(default_factory=dict)
    """Per tier: requests allowed to wait; tiers not listed are unlimited."""
    aging_s: float = 10.0
    """A waiting request rises one tier per this many seconds waited (`scheduling`)."""
    edf_slack_s: float = 0.2
    """A request this close to its TTFT deadline (beyond its predicted prefill) goes earliest-deadline-first."""
    tenant_weights: dict[str, float] = field(default_factory=dict)
    """Fair-share weight per tenant inside a tier (default 1)."""
    max_paused: int = 32
    """Preempted sequences kept paused at once, at most; 0 disables preemption."""
    warmup_tokens: int = 4
    """Tokens generated per warm-up run (0 disables warm-up)."""
    stream_interval_s: float = 0.0
    """Tokens of a request are handed over at most this often (first and last at once):
    fewer wake-ups and writes per token; 0 hands over every step."""
    load: LoadOptions = field(default_factory=LoadOptions)
    """How the model's weights are read, pinned and prefetched."""
    memory_wait_s: float = 30.0
    """Longest a request waits for its projected KV to fit before a 503 (memory admission on)."""
    mlx_cache_limit_bytes: int | None = None
    """Cap on MLX's buffer cache (freed buffers kept for reuse); None: MLX's default."""

    def __post_init__(self) -> None:
        if self.stream_interval_s < 0:
            raise ValueError("stream_interval_s must be >= 0")
        if min(self.max_running, self.prefill_batch_size, self.prefill_step_size, self.prefill_token_budget) < 1:
            raise ValueError("max_running, prefill_batch_size, prefill_step_size and prefill_token_budget must be >= 1")
        if self.prompt_cache_bytes < 0 or self.prompt_cache_entries < 1:
            raise ValueError("prompt_cache_bytes must be >= 0 and prompt_cache_entries >= 1")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop."""

    max_tokens: int
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 disables it."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 disables it."""
    min_p: float = 0.0
    """Drop tokens below min_p times the top token's probability; 0 disables it."""
    seed: int | None = None
    """Seeds this request's own random stream: the same seed gives the same tokens,
    whatever else shares the batch."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; they are not part of the returned text."""
    logprobs: int | None = None
    """None: no log-probabilities; n >= 0: the chosen token's, plus the n most likely."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token among the last 20 (mlx-lm's window)."""
    frequency_penalty: float = 0.0
    """Subtracted once per occurrence among the last 20 tokens."""
    repetition_penalty: float = 1.0
    """Multiplicative penalty on tokens among the last 20; 1.0 disables it."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.temperature < 0 or not (0 < self.top_p <= 1) or self.top_k < 0 or not (0 <= self.min_p <= 1):
            raise ValueError("temperature >= 0, 0 < top_p <= 1, top_k >= 0 and 0 <= min_p <= 1 are required")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def penalized(self) -> bool:
        """Whether logits are processed before sampling (costs a per-sequence pass in the batch)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SharedPrefix:
    """KV state of a prompt prefix fetched from other agents (`serving.promptcache`)."""

    tokens: int
    """The prompt's first `tokens` tokens are covered."""
    blob: bytes
    """`engine.kvcodec` bytes; may hold more positions than `tokens` (a longer prompt published it)."""


@dataclass(frozen=True)
class TierTerms:
    """What the request's tier promises and allows, as the data plane resolved it (the
    node's `priority_scheduling`, or the pool's policy for the model)."""

    ttft_target_s: float | None = None
    """Time-to-first-token target, from arrival; None: none."""
    max_waiting: int | None = None
    """Requests of this tier that may wait; the next is refused (QueueFull). None: no bound."""
    preempt: bool = False
    """May pause a lower tier's running sequence rather than miss its target."""
    sheddable: bool = False
    """Refused at once when the predicted wait already misses the target."""
    wait_bound: tuple[float, Priority] | None = None
    """Longest predicted wait for a slot accepted, and the lane it would age into past it
    (`scheduling.lane_wait_bound`); longer: refused at once (WaitBound). None: no bound."""


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate: an already-tokenized prompt plus sampling and scheduling."""

    request_id: str
    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams
    priority: Priority = Priority.NORMAL
    deadline: float | None = None
    """`time.monotonic()` by which the request must have started; past it while still
    waiting, it fails with `errors.DeadlineExceeded` instead of running."""
    shared_prefix: SharedPrefix | None = None
    """A prefix's KV state from the fleet; used when it is longer than the local cache's."""
    terms: TierTerms | None = None
    """The tier's terms; None: the engine's own (`EngineConfig.max_waiting`, no target)."""
    tenant: str = "anonymous"
    """Who the request is for (API key name or `x-tenant`): tenants of a tier share it fairly."""
    arrival: float | None = None
    """`time.monotonic()` when the request arrived (TTFT is measured from it); None: at submit."""

    def __post_init__(self) -> None:
        if not self.prompt_tokens:
            raise ValueError("prompt_tokens must not be empty")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    """(token text, log-probability), most likely first."""


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One step of one request: the text it added and, on the last step, why it ended.

    `text` may be empty (a token that completes no character yet, or text held back
    because it might begin a stop string).
    """

    text: str
    token_id: int
    completion_tokens: int
    """Tokens generated so far for this request, this one included."""
    finish_reason: FinishReason | None = None
    logprob: TokenLogprob | None = None
    """Set when the request asked for log-probabilities."""
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache instead of being computed."""
    more: bool = False
    """More events of this request were handed over together with this one: a transport
    may hold this one and write them all at once."""


WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ERROR_BUCKETS = (-10.0, -2.5, -1.0, -0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
"""Actual minus predicted time to first token, seconds (negative: sooner than predicted)."""


@dataclass
class Buckets:
    """A histogram the engine thread fills without prometheus-client (exported at scrape time)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    """Per bound (value <= bound, not cumulative), then one for values above the last."""
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


@dataclass
class EngineStats:
    """Counters an engine keeps; read by /metrics and the readiness probe.

    Written by the engine thread only; readers may see a value one step old.
    """

    running: int = 0
    """Sequences in the batch (prefilling or decoding)."""
    max_running: int = 0
    """Batch slots (the decode concurrency); 0 if unknown."""
    waiting: int = 0
    """Sequences accepted but not yet admitted to the batch."""
    waiting_by_priority: dict[str, int] = field(default_factory=dict)
    queued_prompt_tokens: int = 0
    """Prompt tokens of the waiting sequences and of admitted ones not fully prefilled."""
    prefill_seconds_total: float = 0.0
    """Seconds spent in batched steps that processed prompt tokens."""
    decode_seconds_total: float = 0.0
    """Seconds spent in batched steps that only decoded."""
    decode_only_steps_total: int = 0
    decode_only_tokens_total: int = 0
    """Tokens generated by those decode-only steps."""
    prompt_tokens_total: int = 0
    """Prompt tokens of the requests admitted."""
    prompt_tokens_cached_total: int = 0
    """Of those, tokens served from the prefix cache (not computed)."""
    generation_tokens_total: int = 0
    decode_steps_total: int = 0
    """Batched forward passes that produced tokens; tokens/steps > 1 means batching."""
    requests_finished_total: dict[str, int] = field(default_factory=dict)
    """By finish reason: 'stop', 'length', 'cancelled', 'error'."""
    requests_rejected_total: dict[str, int] = field(default_factory=dict)
    """By reason: 'queue_full', 'deadline'."""
    prompt_cache_lookups_total: int = 0
    prompt_cache_hits_total: int = 0
    """Lookups that reused at least one cached token."""
    instant_answers_total: int = 0
    """1-token completions drawn from a repeated prompt's kept first-token log-probabilities
    (no forward pass; counted as prefix-cache hits too)."""
    prompt_cache_bytes: int = 0
    prompt_cache_max_bytes: int = 0
    prompt_cache_entries: int = 0
    kv_cache_bytes: int = 0
    """Bytes of the running batch's key/value cache."""
    shared_prefix_tokens_total: int = 0
    """Prompt tokens served from KV state fetched from other agents (not computed here)."""
    warmup_shapes_done: int = 0
    """Shapes of the warm-up plan compiled so far (`engine.shapes`)."""
    warmup_shapes_total: int = 0
    """Shapes of the warm-up plan; 0 until the plan is made (or with warm-up off)."""
    unwarmed_shapes_total: int = 0
    """Distinct shapes that first appeared after warm-up (each compiled while users waited)."""
    dense_copy_bytes: int = 0
    """Bytes of the dense copies of quantized linears kept (`engine.densecopies`); 0: none."""
    dense_from_rows: int = 0
    """Steps of at least this many rows compute from the dense copies (0: none do)."""
    device_memory_active_bytes: int = 0
    """MLX's allocator: bytes in live arrays, on the accelerator (all of MLX in this process)."""
    device_memory_peak_bytes: int = 0
    device_memory_cache_bytes: int = 0
    """Freed buffers MLX keeps for reuse."""
    preemptions_total: dict[str, int] = field(default_factory=dict)
    """Running sequences paused for a more urgent request, by the paused one's tier."""
    resumes_total: dict[str, int] = field(default_factory=dict)
    """Paused sequences back in the batch, by tier."""
    recomputed_tokens_total: int = 0
    """Tokens computed again for resumed sequences whose KV could not be kept."""
    paused: int = 0
    """Sequences paused now (waiting to resume)."""
    paused_kv_bytes: int = 0
    """KV bytes the paused sequences hold (counted in the memory books)."""
    wait_seconds: dict[str, Buckets] = field(default_factory=dict)
    """By tier: arrival to admission into the batch."""
    ttft_error_seconds: dict[str, Buckets] = field(default_factory=dict)
    """By tier: actual minus predicted time to first token (the prediction made on arrival)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the engine learned while loading its model."""

    path: str
    memory_bytes: int
    """Bytes of the model's parameters."""
    context_length: int | None
    """Longest sequence the model is configured for (prompt + completion), if known."""
    kv_bytes_per_token: int | None = None
    """KV cache bytes one token of a sequence costs (every layer's keys and values), if known."""
    weights: WeightsView | None = field(default=None, compare=False)
    """The loaded weights (load report, residency); None for engines that cannot tell."""
    prefill: PrefillShape | None = None
    """What a prompt's prefill holds besides its KV (`memory.prefill_scratch_bytes`), if the config says."""


class Engine(Protocol):
    """A running generation engine serving one model."""

    @property
    def stats(self) -> EngineStats: ...

    @property
    def healthy(self) -> bool:
        """False once the generation thread has died."""
        ...

    def refuse_early(self, priority: Priority, terms: TierTerms | None, deadline: float | None,
                     prompt_tokens: int) -> None:
        """Raise the 429 `submit` would raise at once for such a request (before it is tokenized:
        `prompt_tokens` may be an estimate); return when it would be accepted. Never blocks long."""
        ...

    def submit(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        """Generate for `request`; the last event has a finish reason.

        Closing the iterator early (client gone) removes the request from the batch.
        Raises `errors.QueueFull` or `errors.DeadlineExceeded` when the queue refuses the
        request, EngineError when the engine cannot run it.
        """
        ...
