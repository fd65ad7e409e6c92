"""The agent's operations API: the contract between the operator and every node agent.

Inference (`/v1/completions`, ...) is OpenAI's contract; this module fixes the other
half, the one the operator drives: what a node reports about itself, how a model is
loaded and unloaded, and how a model is staged into the node's local cache. All of it
sits under `/v1/node` and requires `Authorization: Bearer <ops token>`; errors are
JSON `{"error": {"message", "type", "param", "code"}}` with a 4xx status.

| method and path                 | body               | answer                         |
|---------------------------------|--------------------|--------------------------------|
| GET    /v1/node                 |                    | 200 NodeReport                 |
| POST   /v1/node/models          | LoadModelRequest   | 202 ModelState (200 if loaded) |
| DELETE /v1/node/models/{name}   |                    | 200 ModelState, 404 if unknown |
| GET    /v1/node/cache           |                    | 200 list[CacheEntry]           |
| PUT    /v1/node/cache/{key}     | StageRequest       | 202 CacheEntry (idempotent)    |
| GET    /v1/node/cache/{key}     |                    | 200 CacheEntry, 404 if unknown |
| DELETE /v1/node/cache/{key}     |                    | 200, 404 if unknown            |
| PUT    /v1/node/scheduling/{model} | SchedulingPolicy | 200 SchedulingPolicy (applied) |
| DELETE /v1/node/scheduling/{model} |                  | 200, back to the node's defaults |

Loading, unloading and staging are asynchronous: the call answers at once and the
caller polls the state. Repeating a call with the same body is always safe. A load
may name its `owner`; the node reports it with the model, so a manager that restarted
(and lost what it remembered) still recognises, and may clean up, what it loaded.
Keys are snake_case here (an HTTP API, not a Kubernetes object).

A pool's scheduling policy (its `spec.scheduling`: default tier, per-tier TTFT target,
wait deadline, queue bound, preemption) is put per model; it may come before the model
is loaded (it applies from the load on) and `NodeReport.scheduling` says what is applied.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlxpool.nodes import Hardware
from mlxpool.priorities import Priority

OPS_PREFIX = "/v1/node"
CACHE_KEY_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,251}[a-z0-9])?$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelPhase(StrEnum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


class ModelTier(StrEnum):
    """Where a known model is, fastest to serve from first (`docs/multimodel.md`)."""

    ACTIVE = "active"
    """In an engine, serving."""
    PARKED = "parked"
    """Weights in memory, engine released (no thread, no KV): a request wakes it in milliseconds."""
    PAGE_CACHE = "page_cache"
    """Not loaded; its files are in the OS page cache (a load reads memory, not the disk)."""
    DISK = "disk"
    """Not loaded; its files are on disk only."""


class CachePhase(StrEnum):
    """The per-node phases of a ModelCache, as its status reports them."""

    PENDING = "Pending"
    DOWNLOADING = "Downloading"
    VERIFYING = "Verifying"
    CACHED = "Cached"
    WARM = "Warm"
    PINNED = "Pinned"
    FAILED = "Failed"


class LoadModelRequest(_Strict):
    """Serve `name` from a local directory or from a staged cache entry (exactly one)."""

    name: str = Field(min_length=1, max_length=253)
    path: str | None = Field(default=None, description="Local model directory.")
    cache_key: str | None = Field(default=None, pattern=CACHE_KEY_PATTERN,
                                  description="A cache entry staged with PUT /v1/node/cache/{key}.")
    warm: bool = Field(default=True, description="Run a warm-up generation before reporting ready.")
    pin: bool = Field(default=False, description="Keep the weights resident (never evicted).")
    owner: str | None = Field(default=None, min_length=1, max_length=253,
                              description="Who asked for the load, reported back in ModelState.owner.")
    keep_alive_seconds: float | None = Field(
        default=None, ge=0, le=30 * 86400,
        description="Not evicted within this many seconds of its last use (None: multi_model.keep_alive_seconds).")
    base: str | None = Field(
        default=None, min_length=1, max_length=253,
        description="Load `path` (or the cache entry) as a LoRA adapter in mlx-lm's format (adapter_config.json + "
                    "adapters.safetensors) over this model, loaded here: it shares the base's weights.")

    @model_validator(mode="after")
    def _one_source(self) -> LoadModelRequest:
        if (self.path is None) == (self.cache_key is None):
            raise ValueError("exactly one of path and cache_key is required")
        return self


class PrefetchRequest(_Strict):
    """Read a model's weight files into the OS page cache ahead of a load announced as next
    (exactly one of path and cache_key): no engine, no memory taken from the books, so the
    later load reads memory instead of the disk. The kernel may drop the pages again under
    memory pressure; the load's `last_switch_from` says which it found."""

    path: str | None = Field(default=None, description="Local model directory.")
    cache_key: str | None = Field(default=None, pattern=CACHE_KEY_PATTERN,
                                  description="A cache entry staged with PUT /v1/node/cache/{key}.")

    @model_validator(mode="after")
    def _one_source(self) -> PrefetchRequest:
        if (self.path is None) == (self.cache_key is None):
            raise ValueError("exactly one of path and cache_key is required")
        return self


class PrefetchPhase(StrEnum):
    PREFETCHING = "prefetching"
    WARM = "warm"
    """Every weight page was read; a load now finds them in the page cache (unless dropped since)."""
    FAILED = "failed"


class PrefetchState(_Strict):
    path: str
    """The resolved model directory."""
    phase: PrefetchPhase
    bytes: int = 0
    """Weight bytes read into the page cache (or to read)."""
    seconds: float | None = None
    """How long the reading took (None while it runs)."""
    message: str | None = None


class ModelWeights(_Strict):
    """How a loaded model's weights came into memory, and where they are now."""

    reader: str
    """native (the agent's weight manager) or mlx (mlx-lm's own reader)."""
    transfer: str
    """copy (read once into MLX's buffers) or zero-copy (arrays alias the mapped files)."""
    files: int
    load_bytes: int
    read_seconds: float
    load_gbps: float
    prefetch_threads: int
    pin_policy: str
    pin_message: str | None = None
    """Why fewer bytes were pinned than the policy asked (an OS refusal naming RLIMIT_MEMLOCK, the budget)."""
    total_bytes: int | None = None
    resident_bytes: int | None = None
    """In physical memory now (mincore over the arrays' pages)."""
    pinned_bytes: int = 0
    mapped_bytes: int | None = None
    """Still backed by the model files (0 once copied into MLX buffers)."""


class ModelState(_Strict):
    name: str
    phase: ModelPhase
    path: str | None = None
    memory_bytes: int | None = None
    load_time_seconds: float | None = None
    pinned: bool = False
    message: str | None = None
    owner: str | None = None
    """The `owner` of the load that brought it (None: loaded otherwise, e.g. `--model`)."""
    identity: str | None = None
    """Content identity: a hash of the weight, tokenizer and config bytes (None until known).
    Equal identities mean the same model, whatever each node calls it."""
    weights: ModelWeights | None = None
    """Set once the model is loaded."""
    warmup_shapes_done: int | None = None
    """Shapes compiled so far by its warm-up (`engine.shapes`); None before the plan is made."""
    warmup_shapes_total: int | None = None
    dense_copy_bytes: int | None = None
    """Bytes of the dense copies of its quantized linears, when kept (wide steps compute from
    them: MLX's CUDA 4-bit matmul grows with rows); None: none kept."""
    dense_from_rows: int | None = None
    """Steps of at least this many rows use the dense copies (measured at warm-up)."""
    tier: ModelTier = ModelTier.ACTIVE
    """Active (in an engine) or parked (weights kept, engine released; a request wakes it)."""
    base: str | None = None
    """For a LoRA adapter: the model whose weights it runs over (None: a model of its own)."""
    last_switch_seconds: float | None = None
    """How long its last switch into an engine took: a wake (from parked) or a load (from the
    page cache or disk), up to serving; None before the first."""
    last_switch_from: ModelTier | None = None
    """The tier that last switch came from (parked, page_cache or disk)."""
    shared_bytes: int = 0
    """Bytes of its weights held as one copy with another loaded model (equal tensors:
    `multi_model.share_tensors`); not in its `memory_bytes` when it took them from that model."""


class StageRequest(_Strict):
    """Bring a model's files into this node's cache; `source` is file://, http(s):// or hf://."""

    source: str = Field(pattern=r"^(file|https?|hf)://.+$")
    revision: str | None = None
    digests: dict[str, str] = Field(default_factory=dict,
                                    description="sha256 hex per file path relative to the model root.")
    warm: bool = False
    pin: bool = False


class CacheEntry(_Strict):
    key: str
    source: str
    phase: CachePhase
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    bytes_total: int | None = None
    bytes_done: int = 0
    path: str | None = None
    load_time_seconds: float | None = None
    message: str | None = None


MAX_QUEUE_DEPTH = 1_000_000
MAX_TTFT_TARGET_MS = 3_600_000.0
MAX_DEADLINE_SECONDS = 86_400.0


class TierPolicy(_Strict):
    """One tier's terms in a pool's policy; a field left out keeps the node's own setting."""

    priority: Priority
    ttft_target_ms: float | None = Field(default=None, gt=0, le=MAX_TTFT_TARGET_MS,
                                         description="Time-to-first-token target of the tier.")
    deadline_seconds: float | None = Field(default=None, gt=0, le=MAX_DEADLINE_SECONDS,
                                           description="Longest wait for a batch slot; past it: 504.")
    max_queue_depth: int | None = Field(default=None, ge=0, le=MAX_QUEUE_DEPTH,
                                        description="Requests of the tier that may wait; more get 429.")
    preempt: bool | None = Field(default=None, description="May pause lower tiers' running sequences.")
    sheddable: bool | None = Field(default=None,
                                   description="Refused at once (429) when its target cannot be met.")


class SchedulingPolicy(_Strict):
    """A pool's `spec.scheduling` as the agents of the pool apply it to one model."""

    default_priority: Priority = Priority.NORMAL
    tiers: list[TierPolicy] = Field(default_factory=list, max_length=len(Priority))

    @model_validator(mode="after")
    def _one_entry_per_tier(self) -> SchedulingPolicy:
        seen = [t.priority for t in self.tiers]
        if len(set(seen)) != len(seen):
            raise ValueError("tiers: each priority may be listed once")
        return self

    def tier(self, priority: Priority) -> TierPolicy | None:
        return next((t for t in self.tiers if t.priority is priority), None)


class QueueReport(_Strict):
    running: int = 0
    waiting: int = 0


class NodeReport(_Strict):
    """What `GET /v1/node` answers: who the node is, what it holds, how busy it is."""

    name: str
    endpoint: str
    hardware: Hardware
    max_models: int
    free_memory_bytes: int | None = None
    """Memory a model could still take (the accelerator's on a discrete GPU)."""
    device_memory_used_bytes: int | None = None
    """Bytes MLX holds on the accelerator now (live arrays and its buffer cache)."""
    models: list[ModelState] = Field(default_factory=list)
    cache: list[CacheEntry] = Field(default_factory=list)
    queue: QueueReport = Field(default_factory=QueueReport)
    agent_version: str
    scheduling: dict[str, SchedulingPolicy] = Field(default_factory=dict)
    """Model name -> the pool policy applied to it (models without one use the node's defaults)."""
    prefetches: list[PrefetchState] = Field(default_factory=list)
    """Recent prefetches (`POST /v1/node/prefetch`), newest last."""
    shared_tensor_bytes_saved: int | None = None
    """Weight bytes not in memory because loaded models hold equal tensors as one copy
    (each shared tensor once per extra model); None: sharing is off."""
