"""Router replicas share their prefix indexes through a Redis stream.

Prefix affinity works from what a router remembers sending where (`picking.prefixindex`).
With N replicas behind one Service, each sees a third of the traffic: a prompt prefix
sent to agent A by replica 1 is unknown to replica 2, which places the next request of
that prefix anywhere, and the agents' prefix caches fill with copies. Here every
replica writes what it records and reads what the others record:

- What is shared: per prefix index (named `profile/position/scorer type`, the same on
  replicas started from one strategies file), the chained 8-byte block hashes of a
  prompt and the endpoint URL it went to. Hashes only: no prompt text reaches Redis;
  a hash stands for the whole prefix up to its block (and its model), so a replica
  that merges them matches exactly as the one that recorded them.
- How: this replica's records are queued (bounded) and written every `interval` as one
  pipelined batch of `XADD key MAXLEN ~ max_stream_entries`; a reader task follows the
  stream with `XREAD BLOCK` and merges the other replicas' entries into its own
  indexes. A replica starting late reads the stream from its start, what is left of it:
  the recent history every replica's index would hold anyway.
- Why a stream, not a lookup per request: a pick stays a synchronous, local decision
  (no Redis round trip on the request path, no new failure mode there); replicas
  agree within one interval plus a read, a few milliseconds, which for prefix caching
  (prompts repeating over seconds to minutes) is the same as agreeing at once.
- Redis unavailable: each replica keeps routing on its own index (what it recorded is
  dropped when the queue is full), the error is logged once per outage, and the tasks
  reconnect every second.

Session affinity needs none of this: `session-affinity` is a rendezvous hash, the same
on every replica.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mlxpool.router.picking.prefixindex import BlockHash, PrefixIndex
from mlxpool.router.settings import SharingSettings

log = logging.getLogger(__name__)

MAX_PENDING = 50_000
"""Records queued per index while Redis is slow or away; the oldest are dropped beyond."""
RETRY_SECONDS = 1.0
READ_BATCH = 1000
_HASH = 8


class PrefixSharing:
    def __init__(self, settings: SharingSettings, indexes: dict[str, PrefixIndex],
                 replica: str | None = None) -> None:
        assert settings.redis_url is not None
        self.settings = settings
        self.indexes = indexes
        self.replica = replica or uuid.uuid4().hex[:12]
        self.outboxes = {name: index.share(MAX_PENDING) for name, index in indexes.items()}
        self.redis: aioredis.Redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=5,
                                                             socket_connect_timeout=2)
        self.written = 0
        self.merged = 0
        self._failing: set[str] = set()

    async def run(self) -> None:
        try:
            await asyncio.gather(self._write_loop(), self._read_loop())
        finally:
            await self.redis.aclose()

    async def write_once(self) -> int:
        """Writes what was recorded since the last write; returns how many records."""
        batch: list[tuple[str, tuple[BlockHash, ...], str]] = []
        for name, outbox in self.outboxes.items():
            batch += [(name, blocks, url) for blocks, url in _drain(outbox)]
        if not batch:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for name, blocks, url in batch:
            pipe.xadd(self.settings.key, {"r": self.replica, "i": name, "u": url, "b": b"".join(blocks)},
                      maxlen=self.settings.max_stream_entries, approximate=True)
        await pipe.execute()
        self.written += len(batch)
        return len(batch)

    async def _write_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            try:
                await self.write_once()
                self._recovered("write")
            except (RedisError, OSError) as exc:
                self._failed("write", exc)
                await asyncio.sleep(RETRY_SECONDS)

    async def _read_loop(self) -> None:
        last = "0-0"
        while True:
            try:
                replies: Any = await self.redis.xread({self.settings.key: last}, count=READ_BATCH, block=1000)
                self._recovered("read")
            except (RedisError, OSError) as exc:
                self._failed("read", exc)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            for _stream, entries in replies or []:
                for entry_id, fields in entries:
                    last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    self._merge(fields)

    def _merge(self, fields: dict[bytes, bytes]) -> None:
        if fields.get(b"r", b"").decode() == self.replica:
            return
        index = self.indexes.get(fields.get(b"i", b"").decode())
        packed = fields.get(b"b", b"")
        if index is None or not packed or len(packed) % _HASH:
            return  # another strategies file, or not ours: nothing to merge into
        blocks = [packed[i:i + _HASH] for i in range(0, len(packed), _HASH)]
        index.merge(blocks, fields.get(b"u", b"").decode())
        self.merged += 1

    def _failed(self, what: str, exc: BaseException) -> None:
        if what not in self._failing:
            self._failing.add(what)
            log.warning("prefix sharing: cannot %s the Redis stream (%s: %s); routing on this replica's own "
                        "index until it is back", what, exc.__class__.__name__, exc)

    def _recovered(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            log.info("prefix sharing: Redis %s works again", what)


def _drain(outbox: deque[tuple[tuple[BlockHash, ...], str]]) -> list[tuple[tuple[BlockHash, ...], str]]:
    items = []
    while outbox:
        items.append(outbox.popleft())
    return items
