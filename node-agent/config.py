"""The agent's settings: the runtime file (`config/runtime.yaml`), env overrides, CLI flags.

`RuntimeConfig` is the validated file, one pydantic class per section. Unknown keys
are errors that name the key (`serving.decode_concurency: unknown key`), so a typo
never silently falls back to a default. `load_runtime_config` reads the file and then
applies environment overrides named `MLXPOOL_<SECTION>__<KEY>` (nested keys joined
with `__`, values parsed as YAML scalars: `MLXPOOL_SERVING__DECODE_CONCURRENCY=16`).
Precedence, strongest first: command-line flags (applied by `main`), environment,
file, defaults. `config/runtime.yaml` is the documented sample: every key, with its
default.

It sits at the bottom of the agent's layers: every layer reads its own section, and
nothing here imports another part of the agent. What the process is built from (the
command line's facts plus this file, `runtime.AgentConfig`) lives with the runtime.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlxpool.priorities import Priority

ENV_PREFIX = "MLXPOOL_"
ENV_NESTING = "__"
MIB = 1024 * 1024


class ConfigError(ValueError):
    """The runtime configuration is invalid; the message names every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- sections owned by the serving path ----


class ServingConfig(_Section):
    """The inference engine: batching, prompt cache, defaults."""

    max_tokens_default: int = Field(default=256, ge=1)
    """Completion tokens when a request names none (capped by the model's context)."""
    decode_concurrency: int = Field(default=32, ge=1, le=1024)
    """Sequences decoded together in one batch; more wait in the priority queue."""
    prefill_concurrency: int = Field(default=16, ge=1, le=1024)
    """Prompts prefilled together; the rest wait in the priority queue (so a later,
    more urgent request still goes first)."""
    prefill_step_size: int = Field(default=2048, ge=16)
    """Prompt tokens per prefill chunk: long prompts are split so decoding keeps going."""
    prefill_token_budget: int = Field(default=8192, ge=16)
    """Prompt tokens admitted for prefill at once, at most (a longer prompt still goes,
    alone): a burst of long prompts cannot stall decoding for one huge prefill step."""
    prompt_cache_bytes: int = Field(default=512 * MIB, ge=0)
    """Byte cap of each model's in-memory prefix (prompt) cache; 0 disables it."""
    prompt_cache_entries: int = Field(default=64, ge=1)
    """Cached sequences per model at most (least recently used go first)."""
    warmup: bool = True
    """Run every batch shape once (each decode width, each prefill bucket) before reporting ready."""
    compile_cache_dir: Path | None = Path("~/.cache/mlxpool/compile")
    """Where the accelerator backend keeps compiled kernels across restarts (MLX's CUDA
    backend: MLX_PTX_CACHE_DIR, which wins when set); null: the backend's own default."""
    stream_interval_ms: float = Field(default=0.0, ge=0, le=1000)
    """A streamed request's tokens are written at most this often (its first and last at
    once): tokens that come faster go out together, in one write and one wake-up of the
    client. 0 writes every token as it comes."""


class LimitsConfig(_Section):
    """Sizes accepted at the HTTP boundary; past each the request is refused (413/431/400) before
    any work is done for it. The wire models also hold hard maxima these cannot exceed."""

    max_body_bytes: int = Field(default=8 * MIB, ge=1024, le=1024 * MIB)
    """Largest request body (bytes); larger: 413 before it is read."""
    max_header_bytes: int = Field(default=32 * 1024, ge=1024, le=1024 * 1024)
    """Largest total of the request's header names and values (bytes); larger: 431."""
    max_prompt_chars: int = Field(default=1_000_000, ge=1)
    """Characters of a prompt (all chat messages together), checked before tokenizing; more: 400."""
    max_messages: int = Field(default=1024, ge=1, le=65536)
    """Chat messages per request."""
    max_stop_strings: int = Field(default=16, ge=0, le=64)
    """Stop sequences per request."""
    max_stop_chars: int = Field(default=256, ge=1, le=65536)
    """Characters of one stop sequence."""
    max_logit_bias: int = Field(default=300, ge=0, le=100_000)
    """Entries of logit_bias."""


class AuthConfig(_Section):
    """Secrets, by file. Without files the environment is used (MLXPOOL_API_KEY, MLXPOOL_OPS_TOKEN)."""

    api_key_file: Path | None = None
    """API keys for the inference endpoints, one per line; none: those endpoints are open."""
    ops_token_file: Path | None = None
    """The bearer token of the operations API (/v1/node); none: that API answers 403."""
    reload_seconds: float = Field(default=1.0, ge=0, le=3600)
    """How often the secret files are checked for a rotation (applied without a restart); 0: never."""
    tls_cert_file: Path | None = None
    """PEM certificate (chain) the agent serves HTTPS with; with `tls_key_file`. None: plain HTTP."""
    tls_key_file: Path | None = None
    """PEM private key of `tls_cert_file`."""

    @model_validator(mode="after")
    def _tls_pair(self) -> AuthConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("auth.tls_cert_file and auth.tls_key_file go together (give both or neither)")
        for name in ("tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"auth.{name}: {path}: no such file")
        return self


MAX_QUEUE_BOUND = 1_000_000


class TierConfig(_Section):
    """One SLA tier's terms. A key left out takes that tier's default (`DEFAULT_TIERS`)."""

    ttft_target_ms: float | None = Field(default=None, gt=0, le=3_600_000)
    """Time-to-first-token target; null: none (the tier is never urgent, only aged)."""
    max_waiting: int | None = Field(default=None, ge=0, le=MAX_QUEUE_BOUND)
    """Requests of this tier that may wait for a batch slot; more are refused (429 queue_full).
    null: unbounded."""
    deadline_seconds: float | None = Field(default=None, gt=0, le=86_400)
    """Longest wait for a batch slot when the request sets no deadline; past it: 504."""
    preempt: bool = False
    """A request of this tier that would miss its target may pause a lower tier's running
    sequence (its KV kept, resumed later without recomputing)."""
    sheddable: bool = False
    """Refused at once (429 with Retry-After) when the predicted wait already misses its target."""


DEFAULT_TIERS: dict[Priority, TierConfig] = {
    Priority.CRITICAL: TierConfig(ttft_target_ms=1_000, max_waiting=256, preempt=True),
    Priority.HIGH: TierConfig(ttft_target_ms=3_000, max_waiting=256),
    Priority.NORMAL: TierConfig(ttft_target_ms=10_000, max_waiting=512),
    Priority.LOW: TierConfig(ttft_target_ms=30_000, max_waiting=512, sheddable=True),
    Priority.BACKGROUND: TierConfig(ttft_target_ms=None, max_waiting=1024, sheddable=True),
}
"""The tiers' defaults: bounded queues, targets a user of an interactive service expects,
preemption for `critical`, shedding for the two lowest tiers."""


class PriorityScheduling(_Section):
    """SLA tiers: TTFT targets, queue bounds, preemption, shedding, aging, fairness, key limits."""

    default_priority: Priority = Priority.NORMAL
    """Tier of requests that name none (body `priority` or header `x-priority`)."""
    tiers: dict[Priority, TierConfig] = Field(default_factory=dict)
    """Terms per tier; a tier or key not listed takes its default (`DEFAULT_TIERS`)."""
    aging_seconds: float = Field(default=10.0, gt=0, le=3600)
    """A waiting request rises one tier per this many seconds waited, so no tier starves:
    a request of rank r (critical 0 .. background 4) waits at most about r x aging_seconds
    more than a critical request arriving with it (docs/scheduling.md states the bound)."""
    edf_slack_ms: float = Field(default=200.0, ge=0, le=60_000)
    """A request whose TTFT deadline is closer than its predicted prefill plus this slack
    is taken earliest-deadline-first, ahead of the tier order."""
    max_paused: int = Field(default=32, ge=0, le=1024)
    """Preempted sequences kept paused at once, at most; 0 disables preemption."""
    allow_tenant_header: bool = False
    """Whether the `x-tenant` header names the tenant (fair share inside a tier); otherwise
    the tenant is the API key (or `anonymous`)."""
    tenant_weights: dict[str, Annotated[float, Field(gt=0, le=1000)]] = Field(default_factory=dict, max_length=10_000)
    """Weighted fair queuing inside a tier: tenant -> weight (default 1)."""
    key_tiers: dict[str, Priority] = Field(default_factory=dict, max_length=10_000)
    """Highest tier each API key may claim, by the key's name (`name:key` lines of the key
    file) or, without names, by the key itself. Keys not listed get `default_key_tier`."""
    default_key_tier: Priority = Priority.CRITICAL
    """Highest tier of a key not in `key_tiers` (and of requests without a key when the
    inference endpoints are open)."""
    over_tier: Literal["downgrade", "reject"] = "downgrade"
    """A request asking for more than its key may claim: served at the key's tier, or 403."""

    def tier(self, priority: Priority) -> TierConfig:
        default = DEFAULT_TIERS[priority]
        listed = self.tiers.get(priority)
        if listed is None:
            return default
        return TierConfig.model_validate({**default.model_dump(), **listed.model_dump(include=listed.model_fields_set)})


# ---- sections owned by other parts of the agent (empty until they implement options) ----


class WeightManagement(_Section):
    """Model files on this node: the cache the operations API stages into, warming, pinning."""

    cache_dir: Path | None = None
    """Where staged models live (PUT /v1/node/cache/{key}); default ~/.cache/mlxpool/models.
    `--cache-dir` overrides it."""
    max_cache_bytes: int | None = Field(default=None, ge=0)
    """Cap on the bytes of all cache entries; staging past it fails naming the cap. None: no cap."""
    allow_pin: bool = True
    """Whether `pin: true` may mlock a cache entry's files. The OS may still refuse (RLIMIT_MEMLOCK
    without CAP_IPC_LOCK): the entry then stays Warm and its message says so."""
    use_mmap: bool = True
    """Read safetensors through the native weight manager (mmap, native header parse, prefetch);
    false: mlx-lm's own reader (`mx.load`), without prefetch."""
    pin_policy: Literal["none", "critical", "all"] = "critical"
    """mlock the loaded weights: none; critical (embeddings, first and last layers, norms, output
    head: the tensors every token touches); all. A refusal by the OS is a warning, not an error."""
    pin_budget_bytes: int = Field(default=1024 * MIB, ge=0)
    """Bytes of each model's weights pinned at most (critical tensors first)."""
    prefetch_threads: int = Field(default=2, ge=0, le=64)
    """Native threads paging the next layers' file pages in while a layer is copied; 0: none."""
    prefetch_depth: int = Field(default=2, ge=1, le=64)
    """Layers the prefetch runs ahead of the copy."""
    dense_copies: Literal["off", "auto", "on"] = "auto"
    """Keep a dense copy of each quantized linear and compute steps of many rows from it, from the
    width measured at warm-up where it is faster (MLX's CUDA 4-bit matmul grows with rows): auto =
    on CUDA when the copies fit in a quarter of the device memory; on = any device; off."""
    memory_admission: bool = True
    """Admit a request only when its projected KV (prompt + max_tokens) fits the node's memory;
    false: no memory books (mlx_lm.server's behaviour: grow until the OS says no)."""
    memory_capacity_bytes: int | None = Field(default=None, ge=1)
    """Memory the agent may use in all; null: physical memory, or the cgroup's limit when lower."""
    memory_headroom_bytes: int = Field(default=1024 * MIB, ge=0)
    """Left to the OS and other processes; never budgeted for weights or KV."""
    memory_pressure_free_bytes: int = Field(default=512 * MIB, ge=0)
    """Below this much available memory (as the OS reports it) the node is under pressure: the prefix
    cache is shed and long requests are refused."""
    long_request_kv_bytes: int = Field(default=256 * MIB, ge=0)
    """Under pressure, requests projecting more KV bytes than this are refused (503)."""
    memory_wait_seconds: float = Field(default=30.0, ge=0, le=3600)
    """Longest a request waits for its KV to fit before a 503 insufficient_memory."""
    mlx_cache_limit_bytes: int | None = Field(default=None, ge=0)
    """Cap on MLX's buffer cache (mx.set_cache_limit); null: MLX's default."""


class MultiModel(_Section):
    """Several models per node (POST/DELETE /v1/node/models): capacity and eviction."""

    max_models: int = Field(default=4, ge=1)
    """Models loaded (or loading) at once; also the InferenceNode's spec.maxModels."""
    memory_budget_bytes: int | None = Field(default=None, ge=1)
    """Bytes of model weights this node may hold; unset: memory_budget_fraction of RAM."""
    memory_budget_fraction: float = Field(default=0.75, gt=0, le=1)
    """The budget as a fraction of physical memory, when memory_budget_bytes is unset."""
    eviction: Literal["cost", "lru", "none"] = "cost"
    """When a load does not fit: 'cost' unloads the idle, unpinned models least worth keeping
    (how often they are asked for times what bringing them back costs); 'lru' the least
    recently used; 'none' refuses the load (409 max_models_reached / 507 memory_budget_exceeded)."""
    usage_half_life_seconds: float = Field(default=600.0, gt=0, le=30 * 86400)
    """How fast a model's request count fades for 'cost' eviction: it halves every this many seconds."""
    keep_alive_seconds: float = Field(default=0.0, ge=0, le=30 * 86400)
    """A model used within this many seconds is not evicted (a load may set its own, keep_alive_seconds)."""
    default_load_gbps: float = Field(default=1.0, gt=0, le=1000)
    """The load rate (GB/s) assumed for a model's cost to bring back until loads on this node are measured."""
    unload_timeout_seconds: float = Field(default=30.0, ge=0)
    """How long an unload waits for the model's in-flight requests before stopping its engine."""
    park: bool = True
    """A model that loses its engine slot (max_models) is parked: its engine released, its weights
    kept in memory (within memory_budget_bytes), still listed and served; a request wakes it in
    milliseconds. The operator counts only active models as slots. false: it is unloaded."""
    wake_timeout_seconds: float = Field(default=30.0, ge=0, le=3600)
    """How long a request for a parked model waits for an engine slot (every one busy) before a 503."""
    load_on_request: bool = False
    """A request naming a model that is not loaded loads it, when it is known: a model this node
    loaded before, or a directory <source>/<name>, from under one of load_on_request_sources
    only. The request waits (bounded) while it loads; concurrent first requests load it once.
    false: such a request is a 404 and only the operations API loads models."""
    load_on_request_sources: list[str] = Field(default_factory=list, max_length=64)
    """Absolute directories that models may be loaded on request from (the allow-list)."""
    load_on_request_wait_seconds: float = Field(default=120.0, gt=0, le=3600)
    """How long a request waits for the model it named to load before a 503 (it keeps loading)."""
    share_tensors: bool = True
    """Loaded models hold a tensor whose bytes they have in common (a fine-tune and its base) as
    one copy: found by the content identity's per-tensor digests and checked equal at the load,
    counted once in the memory books; `shared_tensor_bytes_saved` in /v1/node says how much."""

    @field_validator("load_on_request_sources")
    @classmethod
    def _absolute_sources(cls, sources: list[str]) -> list[str]:
        for source in sources:
            if not source.startswith("/") or len(source) > 4096:
                raise ValueError(f"load_on_request_sources: {source[:256]!r} must be an absolute directory path")
        return sources


class HorizontalScaling(_Section):
    """What this node tells routers about its load (`GET /v1/signals`, `mlxpool.loadsignals`)."""

    publish_signals: bool = True
    """Serve the load report routers poll every 50-200 ms; false answers 404, and routers
    score this node on their own in-flight counts only."""


class DistributedCache(_Section):
    """Prompt KV state shared between agents through Redis: what one node prefilled, another
    serving the same model fetches instead of computing (off unless `redis_url` is set)."""

    redis_url: str | None = Field(default=None, pattern=r"^(redis|rediss|unix)://.+$")
    """Redis to share through, e.g. redis://10.0.0.5:6379/0; null: sharing is off."""
    key_prefix: str = Field(default="mlxpool:kv", min_length=1, max_length=128)
    """Prefix of every key the agent writes (several fleets can share one Redis)."""
    block_tokens: int = Field(default=64, ge=8, le=4096)
    """Prefixes are shared at multiples of this many tokens (the granularity of a match)."""
    min_tokens: int = Field(default=256, ge=8)
    """Shorter prompts are neither published nor looked up: recomputing them is cheaper."""
    max_entry_bytes: int = Field(default=64 * MIB, ge=1024)
    """KV states larger than this are not published."""
    ttl_seconds: int = Field(default=3600, ge=1)
    """How long a published prefix stays in Redis."""
    timeout_seconds: float = Field(default=0.5, gt=0, le=30)
    """Longest wait for Redis per call; past it the request is served without sharing."""
    breaker_failures: int = Field(default=3, ge=1, le=1000)
    """Failed Redis calls in a row that open the breaker: Redis is then not called at all
    (requests are served without sharing, none waits on a timeout) until it is probed again."""
    breaker_open_seconds: float = Field(default=5.0, gt=0, le=3600)
    """How long the open breaker keeps Redis uncalled before one call probes it."""


class RuntimeConfig(_Section):
    serving: ServingConfig = ServingConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    priority_scheduling: PriorityScheduling = PriorityScheduling()
    weight_management: WeightManagement = WeightManagement()
    multi_model: MultiModel = MultiModel()
    horizontal_scaling: HorizontalScaling = HorizontalScaling()
    distributed_cache: DistributedCache = DistributedCache()

    def with_overrides(self, section: str, **values: Any) -> RuntimeConfig:
        """A copy with `values` replacing keys of `section` (None values are skipped), validated."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        data = self.model_dump()
        data[section] = {**data[section], **values}
        return _validate(data, origins={})


def load_runtime_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> RuntimeConfig:
    """The file at `path` (or defaults) with environment overrides applied, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    origins: dict[tuple[str, ...], str] = {}
    env = os.environ if environ is None else environ
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or ENV_NESTING not in name:
            continue
        keys = tuple(k.lower() for k in name[len(ENV_PREFIX):].split(ENV_NESTING))
        if any(not k for k in keys):
            raise ConfigError(f"environment variable {name}: empty key (expected MLXPOOL_<SECTION>__<KEY>)")
        _set_path(data, keys, _parse_scalar(name, env[name]), name)
        origins[keys] = name
    return _validate(data, origins)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _parse_scalar(name: str, text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"environment variable {name}: cannot parse value {text!r}") from None


def _set_path(data: dict[str, Any], keys: tuple[str, ...], value: Any, env_name: str) -> None:
    node = data
    for depth, key in enumerate(keys[:-1], start=1):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            where = ".".join(keys[:depth])
            raise ConfigError(f"environment variable {env_name}: {where} is not a section")
        node = child
    node[keys[-1]] = value


def _validate(data: dict[str, Any], origins: dict[tuple[str, ...], str]) -> RuntimeConfig:
    try:
        return RuntimeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("invalid runtime configuration: " + "; ".join(
            _describe(error, origins) for error in exc.errors()
        )) from None


def _describe(error: Any, origins: dict[tuple[str, ...], str]) -> str:
    loc = tuple(str(p) for p in error.get("loc", ()) if p != "[key]")
    where = ".".join(loc) or "(top level)"
    # The variable that set this key, or the key's section (an unknown section or key).
    env = next((v for k, v in origins.items() if loc[: len(k)] == k or k[: len(loc)] == loc), None)
    if env is not None:
        where += f" (from {env})"
    if error.get("type") == "extra_forbidden":
        return f"{where}: unknown key"
    return f"{where}: {error.get('msg', 'invalid')}"
