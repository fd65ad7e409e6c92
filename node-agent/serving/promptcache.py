"""The prompt cache's fleet-wide tier: prompt KV state shared between agents through Redis.

Two tiers. The first is each engine's own in-memory prefix cache (`engine.prefixcache`:
MLX arrays, on the engine thread, so it lives with the engine): it is always the first
choice, consulted by the engine as it admits a request. The second is this one, shared
by the fleet (`distributed_cache`): what one node prefilled, another node serving the
same model fetches instead of computing, so a long system prompt, a few-shot preamble or
a conversation so far is prefilled once per fleet, not once per node. A fetched prefix
travels with the request (`GenerationRequest.shared_prefix`), and the engine uses it
only where it is longer than what its own cache holds.

A `PromptCache` is always there: each served model's engine (`servedengine`) looks every
prompt up in it before submitting, and each engine publishes finished prompts through
the `KVPublisher` it gets from it. With `distributed_cache.redis_url` unset it is the
local-only `PromptCache` itself: a lookup is None without any I/O, nothing is
published, and no metrics are exported. With Redis it is a `FleetPromptCache`.

Keys. A prompt is cut into blocks of `block_tokens` tokens; each boundary has a hash
chained from the model's content identity (`operations.identity`: a hash of its weight,
tokenizer and config bytes, so two nodes share only when they serve the same weights,
whatever the model is called, and two fine-tunes of one base never do) through every
token before it. When a request finishes, its engine publishes the KV of the prompt's longest
boundary (at least `min_tokens`, not the last token: the receiver must compute one) as
one blob, `<prefix>:kv:<hash>`, and one index key per boundary from `min_tokens` on,
`<prefix>:idx:<hash>` -> the blob's key, all with a TTL. A lookup reads every index key
of the new prompt in one MGET, takes the longest hit, then GETs that blob: two round
trips, whatever the prompt's length. Blobs are `engine.kvcodec` bytes. A blob this node
published or fetched recently is not fetched again: its local prefix cache holds that
state already (when it has one), and a hot system prompt must not cost a transfer per
request.

Never in the way: Redis calls have a short timeout; any failure is counted and logged
(rate-limited), and the request is served as if sharing were off. After
`breaker_failures` failures in a row a circuit breaker opens: Redis is not called for
`breaker_open_seconds` (a stopped or hung Redis costs no request a timeout), then one call
probes it; a success closes the breaker (the client reconnects by itself), a failure
keeps it open for another period. Publishing happens
off the engine thread and is dropped, counted, when too many are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import redis.asyncio as aioredis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from mlxpool.agent.config import DistributedCache
from mlxpool.agent.engine.interface import SharedPrefix

log = logging.getLogger(__name__)

MAX_PUBLISHING = 4
"""Publishes in flight at once; more are dropped (the next request of the prefix publishes it)."""
WARN_EVERY_S = 30.0


def boundary_hashes(model_id: str, tokens: Sequence[int], block: int, limit: int) -> list[str]:
    """Hex hashes of the prompt's prefixes ending at block boundaries <= `limit` tokens,
    each chained through the previous one (so equal hashes mean equal prefixes)."""
    previous = hashlib.blake2b(model_id.encode(), digest_size=16).digest()
    hashes = []
    for end in range(block, min(limit, len(tokens)) + 1, block):
        chained = hashlib.blake2b(previous, digest_size=16)
        chained.update(b"".join(t.to_bytes(4, "little") for t in tokens[end - block:end]))
        previous = chained.digest()
        hashes.append(previous.hex())
    return hashes


class PromptCache:
    """One per agent. This base is local only: the engines' own prefix caches are the only tier."""

    @staticmethod
    def from_settings(settings: DistributedCache, local_entries: int = 64) -> PromptCache:
        """The fleet-wide tier when `settings` names a Redis, else the local-only one.

        `local_entries`: the local prefix cache's entries (0: it is off, every hit is fetched).
        """
        return FleetPromptCache(settings, local_entries) if settings.redis_url is not None else PromptCache()

    async def lookup(self, model_id: str, tokens: Sequence[int]) -> SharedPrefix | None:
        """The longest prefix of `tokens` (never all of them) other agents computed, or None;
        never raises."""
        return None

    def publisher(self, model_id: str, loop: asyncio.AbstractEventLoop) -> KVPublisher | None:
        """What the engine serving the model of content identity `model_id` publishes finished
        prompts through; None: nothing."""
        return None

    def collector(self) -> Collector | None:
        """The `mlxpool_shared_kv_*` metrics; None: there are none."""
        return None

    async def close(self) -> None:
        return None


class FleetPromptCache(PromptCache):
    """The tier shared through Redis: lookups for the served engines, publishers for the engines."""

    def __init__(self, settings: DistributedCache, local_entries: int = 64) -> None:
        """`local_entries`: the local prefix cache's entries (0: it is off, every hit is fetched)."""
        if settings.redis_url is None:
            raise ValueError("distributed_cache.redis_url is not set")
        self.settings = settings
        self._local: OrderedDict[bytes, None] = OrderedDict()
        """Blobs the local prefix cache got, most recent last; as many as it holds entries (an
        approximation: it also evicts by bytes, and then the prefix is computed again)."""
        self._local_entries = local_entries
        self._redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=settings.timeout_seconds,
            socket_connect_timeout=settings.timeout_seconds, health_check_interval=30)
        self._publishing = 0
        self._warned_at = float("-inf")
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures_in_a_row = 0
        self._open_until: float | None = None
        """Monotonic time the open breaker lets one probe through; None: closed."""
        self._probing = False
        self.counts = {"lookups": 0, "hits": 0, "hit_tokens": 0, "held_locally": 0, "published": 0,
                       "published_bytes": 0, "dropped": 0, "errors": 0, "breaker_trips": 0, "skipped": 0}

    # ---- circuit breaker ----

    @property
    def breaker_open(self) -> bool:
        return self._open_until is not None

    def _may_call(self) -> bool:
        """Whether to call Redis now: closed, or open and due a probe. A probe pushes the next
        one a period away (so one at a time, and a probe that never ends cannot wedge it)."""
        if self._open_until is None:
            return True
        now = time.monotonic()
        if now < self._open_until:
            self.counts["skipped"] += 1
            return False
        self._probing = True
        self._open_until = now + self.settings.breaker_open_seconds
        return True

    def _succeeded(self) -> None:
        if self._open_until is not None:
            log.info("distributed cache reachable again; breaker closed")
        self._failures_in_a_row = 0
        self._open_until = None
        self._probing = False

    # ---- lookups (served engines, event loop) ----

    async def lookup(self, model_id: str, tokens: Sequence[int]) -> SharedPrefix | None:
        s = self.settings
        if len(tokens) <= s.min_tokens:
            return None
        self.counts["lookups"] += 1
        hashes = boundary_hashes(model_id, tokens, s.block_tokens, len(tokens) - 1)
        first = s.min_tokens // s.block_tokens + (s.min_tokens % s.block_tokens > 0) - 1  # first boundary >= min
        if first >= len(hashes) or not self._may_call():
            return None
        try:
            blob_keys = await self._redis.mget([self._key("idx", h) for h in hashes[first:]])
            self._succeeded()
            for offset in range(len(blob_keys) - 1, -1, -1):
                blob_key = blob_keys[offset]
                if not isinstance(blob_key, bytes):  # None: no such index key (replies are bytes)
                    continue
                if self._held_locally(blob_key):
                    self.counts["held_locally"] += 1
                    return None
                blob = await self._redis.get(blob_key)
                if isinstance(blob, bytes):
                    covered = (first + offset + 1) * s.block_tokens
                    self._remember(blob_key)
                    self.counts["hits"] += 1
                    self.counts["hit_tokens"] += covered
                    return SharedPrefix(covered, blob)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed("lookup", exc)
        return None

    # ---- publishing (engine thread -> event loop) ----

    def boundary(self, prompt_tokens: int) -> int:
        """Tokens of a prompt this long worth publishing: its last block boundary before the
        last token, if that reaches `min_tokens`; else 0 (do not publish)."""
        s = self.settings
        end = (prompt_tokens - 1) // s.block_tokens * s.block_tokens
        return end if end >= s.min_tokens else 0

    def publisher(self, model_id: str, loop: asyncio.AbstractEventLoop) -> KVPublisher:
        return KVPublisher(self, model_id, loop)

    def _publish_soon(self, model_id: str, tokens: tuple[int, ...], blob: bytes) -> None:
        """On the event loop: start a publish unless too many are in flight."""
        if self._publishing >= MAX_PUBLISHING:
            self.counts["dropped"] += 1
            return
        if not self._may_call():
            return
        self._publishing += 1
        task = asyncio.create_task(self._publish(model_id, tokens, blob))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, model_id: str, tokens: tuple[int, ...], blob: bytes) -> None:
        s = self.settings
        try:
            hashes = boundary_hashes(model_id, tokens, s.block_tokens, len(tokens))
            blob_key = self._key("kv", hashes[-1])
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(blob_key, blob, ex=s.ttl_seconds)
            for i, h in enumerate(hashes):
                if (i + 1) * s.block_tokens >= s.min_tokens:
                    pipe.set(self._key("idx", h), blob_key, ex=s.ttl_seconds)
            await pipe.execute()
            self._remember(blob_key.encode())
            self.counts["published"] += 1
            self.counts["published_bytes"] += len(blob)
            self._succeeded()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed("publish", exc)
        finally:
            self._publishing -= 1

    # ----

    def _held_locally(self, blob_key: bytes) -> bool:
        return blob_key in self._local

    def _remember(self, blob_key: bytes) -> None:
        if self._local_entries < 1:
            return
        self._local[blob_key] = None
        self._local.move_to_end(blob_key)
        while len(self._local) > self._local_entries:
            self._local.popitem(last=False)

    def _key(self, kind: str, digest: str) -> str:
        return f"{self.settings.key_prefix}:{kind}:{digest}"

    def _failed(self, what: str, exc: BaseException) -> None:
        self.counts["errors"] += 1
        now = time.monotonic()
        self._failures_in_a_row += 1
        if self._probing or self._failures_in_a_row >= self.settings.breaker_failures:
            if self._open_until is None:  # closed until now
                log.warning("distributed cache breaker open after %d failure(s) in a row; not calling Redis "
                            "for %.1fs", self._failures_in_a_row, self.settings.breaker_open_seconds)
            self.counts["breaker_trips"] += 1
            self._open_until = now + self.settings.breaker_open_seconds
            self._probing = False
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("distributed cache %s failed (serving without it) error=%s: %s",
                        what, type(exc).__name__, exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis.aclose()

    def collector(self) -> Collector:
        return _ShareCollector(self)


class KVPublisher:
    """What an engine holds: which prompts to publish, and a thread-safe way to hand them over."""

    def __init__(self, share: FleetPromptCache, model_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self._share = share
        self._model_id = model_id
        self._loop = loop
        self.max_bytes = share.settings.max_entry_bytes

    def boundary(self, prompt_tokens: int) -> int:
        return self._share.boundary(prompt_tokens)

    def publish(self, tokens: tuple[int, ...], blob: bytes) -> None:
        """From the engine thread: publish `blob`, the KV of exactly `tokens`."""
        if len(blob) > self.max_bytes:
            self._share.counts["dropped"] += 1
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is stopping
            self._loop.call_soon_threadsafe(self._share._publish_soon, self._model_id, tokens, blob)


class _ShareCollector(Collector):
    def __init__(self, share: FleetPromptCache) -> None:
        self._share = share

    def collect(self) -> Iterator[Metric]:
        c = self._share.counts
        for name, doc, value in [
            ("mlxpool_shared_kv_lookups", "Distributed-cache lookups (prompts over min_tokens).", c["lookups"]),
            ("mlxpool_shared_kv_hits", "Lookups that found a shared prefix.", c["hits"]),
            ("mlxpool_shared_kv_held_locally", "Lookups whose best prefix this node already holds (not fetched).",
             c["held_locally"]),
            ("mlxpool_shared_kv_hit_tokens", "Prompt tokens covered by the shared prefixes found.", c["hit_tokens"]),
            ("mlxpool_shared_kv_published", "Prompt KV states published.", c["published"]),
            ("mlxpool_shared_kv_published_bytes", "Bytes published.", c["published_bytes"]),
            ("mlxpool_shared_kv_dropped", "Publishes dropped (too large, or too many in flight).", c["dropped"]),
            ("mlxpool_shared_kv_errors", "Redis calls that failed (the request was served without sharing).",
             c["errors"]),
            ("mlxpool_shared_kv_breaker_trips", "Times the Redis breaker opened (or stayed open after a probe).",
             c["breaker_trips"]),
            ("mlxpool_shared_kv_skipped", "Redis calls not made because the breaker was open.", c["skipped"]),
        ]:
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        gauge = GaugeMetricFamily("mlxpool_shared_kv_breaker_open", "1 while the Redis breaker is open.")
        gauge.add_metric([], 1.0 if self._share.breaker_open else 0.0)
        yield gauge
