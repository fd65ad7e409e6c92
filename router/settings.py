"""Settings of one router process, grouped by topic, each field documented.

Only data and its validation live here: the CLI (`main`) fills these in, the app
(`app`) reads them. Nothing here performs I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from mlxpool.httpguards import SizeLimits


class StalePolicy(enum.Enum):
    """What a load report older than the staleness bound means."""

    SATURATED = "saturated"
    """The endpoint counts as full: scorers rank it last, shedding counts it saturated."""
    FALLBACK = "fallback"
    """The endpoint is scored on this router's own counts (requests in flight)."""


@dataclass(frozen=True)
class PoolRef:
    """The pool a router serves, as `NAMESPACE/NAME`."""

    namespace: str
    name: str

    @classmethod
    def parse(cls, text: str) -> PoolRef:
        namespace, sep, name = text.partition("/")
        if not sep or not namespace or not name or "/" in name:
            raise ValueError(f"pool must be NAMESPACE/NAME, got {text!r}")
        return cls(namespace, name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class TableSourceSettings:
    """Where the routing table comes from: a ConfigMap through the API server, or a file."""

    pool: PoolRef | None = None
    """The pool whose ConfigMap `<pool>-routes` is followed; also checked against each table."""

    kubeconfig: Path | None = None
    """Kubeconfig for the API server; None means in-cluster config, then the default kubeconfig."""

    routes_file: Path | None = None
    """A routes.json file to follow instead of the API server (re-read when it changes)."""

    file_poll_interval: float = 0.5
    """Seconds between two reads of `routes_file`."""

    watch_timeout: int = 240
    """Server-side timeout of one watch request (seconds); the router re-lists after it."""

    backoff_initial: float = 0.5
    """First delay (seconds) before reconnecting to the API server after an error."""

    backoff_max: float = 30.0
    """Largest delay (seconds) between two reconnection attempts."""

    def __post_init__(self) -> None:
        if self.routes_file is None and self.pool is None:
            raise ValueError("either a pool (NAMESPACE/NAME) or a routes file is required")


@dataclass(frozen=True)
class UpstreamSettings:
    """How requests reach agents."""

    connect_timeout: float = 2.0
    """Seconds to open a connection to an agent before failing over to the next one."""

    first_byte_timeout: float = 300.0
    """Seconds to wait for the first body byte; a non-streamed completion spends its whole
    generation here, so this is generous. Past it the next candidate is tried."""

    read_timeout: float = 300.0
    """Seconds of silence tolerated between two chunks once a response is streaming."""

    max_attempts: int = 3
    """Candidates tried per request (the first plus failovers)."""

    max_connections: int | None = None
    """Connections the router may hold open to one agent (a pool per agent); None: no cap
    (the agents' own queue limits bound the load). A cap is a hazard with httpcore 1.0.9:
    requests cancelled while the pool is contended can leak its slots for good
    (encode/httpcore#1093), and bench/scaling.py saw exactly that at 500 req/s: once full,
    every later request failed with PoolTimeout until the router restarted."""

    max_keepalive_connections: int = 64
    """Idle connections kept for reuse, per agent."""

    breaker_failures: int = 3
    """Consecutive failed attempts (timeouts, 5xx, broken connections) that open an endpoint's
    circuit breaker; a refused connection opens it at once."""

    breaker_open_seconds: float = 5.0
    """How long an open breaker keeps requests away before one probe is let through."""

    ca_file: Path | None = None
    """PEM CA bundle that agents' HTTPS certificates (https:// endpoints) are verified against;
    None: the system's trust store."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.breaker_failures < 1 or self.breaker_open_seconds <= 0:
            raise ValueError("breaker_failures must be at least 1 and breaker_open_seconds positive")
        for name in ("connect_timeout", "first_byte_timeout", "read_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True)
class SignalSettings:
    """How the router reads the agents' load reports (`GET /v1/signals`)."""

    interval: float = 0.1
    """Seconds between two polls of every endpoint (llm-d scrapes every 50 ms); 0 turns polling off."""

    max_age: float = 0.5
    """A report older than this is stale. llm-d uses 200 ms; ours is looser by default because
    a 2-core machine shared by agents and routers can miss a 100 ms tick under load."""

    stale_policy: StalePolicy = StalePolicy.SATURATED
    """What a stale report means (see `StalePolicy`)."""

    timeout: float = 0.5
    """Seconds one poll of one endpoint may take."""

    def __post_init__(self) -> None:
        if self.interval < 0 or self.interval > 60:
            raise ValueError("signals interval must be between 0 (off) and 60 seconds")
        if self.max_age <= 0 or self.timeout <= 0:
            raise ValueError("signals max_age and timeout must be positive")
        if self.interval and self.max_age < self.interval:
            raise ValueError("signals max_age must be at least the polling interval")


@dataclass(frozen=True)
class SheddingSettings:
    """When the router refuses low tiers with 429 (see `picking.shedding`): slot usage
    (running + waiting over batch slots) every endpoint must reach; None: never shed."""

    background: float | None = 1.0
    low: float | None = 1.5
    normal: float | None = None
    high: float | None = None
    mean_output_tokens: int = 128
    """Decode steps a waiting request holds a slot for, in the Retry-After estimate."""


@dataclass(frozen=True)
class SharingSettings:
    """How router replicas share their prefix indexes through Redis (`mlxpool.router.sharing`)."""

    redis_url: str | None = None
    """redis://host:port/db of the pool's Redis; None: each replica keeps its index to itself."""
    key: str = "mlxpool:router:prefixes"
    """The Redis stream the replicas of one pool write to and read from (one per pool)."""
    interval: float = 0.02
    """Seconds between two writes of what this replica recorded (batched)."""
    max_stream_entries: int = 100_000
    """Entries the stream keeps (approximately): what a replica starting late catches up on."""

    def __post_init__(self) -> None:
        if not 0 < self.interval <= 10:
            raise ValueError("sharing interval must be in (0, 10] seconds")
        if self.max_stream_entries < 1:
            raise ValueError("sharing max_stream_entries must be >= 1")


@dataclass(frozen=True)
class RouterSettings:
    """Everything one router process needs."""

    tables: TableSourceSettings
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    signals: SignalSettings = field(default_factory=SignalSettings)
    shedding: SheddingSettings = field(default_factory=SheddingSettings)
    sharing: SharingSettings = field(default_factory=SharingSettings)
    strategies_file: Path | None = None
    """YAML file of strategy profiles merged over the built-in ones (see `profiles`)."""
    limits: SizeLimits = field(default_factory=SizeLimits)
    """Request body and header sizes accepted (the agent's defaults: the same request passes both or neither)."""
    first_table_wait: float = 0.0
    """Seconds the startup waits for the first routing table before the router listens (0: listen
    at once and answer 503 until one loads). A router joining a port another one holds
    (`--reuse-port`) waits, or the kernel would hand it connections it can only refuse."""
