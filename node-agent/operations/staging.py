"""The node's model cache: entries staged from a source, verified, then warmed or pinned.

Each entry moves Pending → Downloading → Verifying → Cached → (Warm | Pinned), or to
Failed with a message naming the file or limit at fault. Files arrive in a private
directory under `.partial/` and are renamed into `<cache>/<key>/` only once every
digest matched, so an entry's directory is complete or absent, never half-written.
A small record in `.entries/<key>.json` (written after the rename) lets a restarted
agent find its entries again; leftovers under `.partial/` are removed at start.

One cache directory belongs to one agent (give each its own `--cache-dir`). Agents
sharing one (a dev machine running several) do not break each other's downloads
(partial directories carry the owner's pid, and only dead owners' are cleaned up),
but each keeps its own entries and one's DELETE removes the files for all.

PUT is idempotent: the same request returns the entry as it is; a changed `warm` or
`pin` is applied in place; another source for a live key is a 409 (delete first); a
Failed entry is staged afresh. DELETE refuses (409) while a loaded model uses the
entry, naming the models: the caller unloads them first. Downloads, copies and
hashing run on worker threads; the event loop only reads their counters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from mlxpool.agent.operations.errors import CacheConflict, CacheEntryNotFound, CacheInUse, CacheNotReady
from mlxpool.agent.operations.fetching import Cancelled, Fetcher, FetchError, Progress, sha256_of
from mlxpool.agent.operations.sources import Source, check_digests, parse_source
from mlxpool.agent.operations.weights import PinRefused, WeightFiles
from mlxpool.agentapi import CacheEntry, CachePhase, StageRequest
from mlxpool.progress import ByteMeter

log = logging.getLogger(__name__)

ENTRIES_DIR = ".entries"
PARTIAL_DIR = ".partial"
READY_PHASES = (CachePhase.CACHED, CachePhase.WARM, CachePhase.PINNED)
PROGRESS_LOG_INTERVAL_S = 10.0
"""How often a fetch logs its bytes, rate and ETA (and once when the files are all in)."""
STOP_GRACE_S = 5.0
"""How long a cancelled fetch may take to notice before its task is cancelled outright."""


class VerifyError(RuntimeError):
    """A file's sha256 differs from its digest; the message names the file."""


@dataclass
class _Entry:
    key: str
    request: StageRequest
    digests: dict[str, str]
    phase: CachePhase = CachePhase.PENDING
    bytes_total: int | None = None
    bytes_done: int = 0
    path: Path | None = None
    load_time_seconds: float | None = None
    message: str | None = None
    progress: Progress | None = None
    task: asyncio.Task[None] | None = None
    weights: WeightFiles | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def snapshot(self) -> CacheEntry:
        total, done = self.bytes_total, self.bytes_done
        if self.progress is not None and self.phase is CachePhase.DOWNLOADING:
            total, done = self.progress.bytes_total, self.progress.bytes_done
        if self.phase in READY_PHASES:
            fraction = 1.0
        elif self.phase is CachePhase.VERIFYING:
            fraction = 1.0 if total else 0.0
        else:
            fraction = min(done / total, 1.0) if total else 0.0
        return CacheEntry(
            key=self.key, source=self.request.source, phase=self.phase, progress=round(fraction, 4),
            bytes_total=total, bytes_done=done, path=str(self.path) if self.path else None,
            load_time_seconds=self.load_time_seconds, message=self.message,
        )

    def same_source(self, request: StageRequest, digests: dict[str, str]) -> str | None:
        """The first field that differs from the request this entry was staged with."""
        if request.source != self.request.source:
            return "source"
        if (request.revision or None) != (self.request.revision or None):
            return "revision"
        if digests != self.digests:
            return "digests"
        return None


class ModelCacheStore:
    """The cache under `root`; `in_use(key)` names the loaded models using an entry."""

    def __init__(
        self, root: Path, *, in_use: Callable[[str], list[str]], max_bytes: int | None = None,
        allow_pin: bool = True, hub_endpoint: str, hub_token: str | None = None,
        progress_log_interval_s: float = PROGRESS_LOG_INTERVAL_S,
    ) -> None:
        self.root = root
        self._in_use = in_use
        self._max_bytes = max_bytes
        self._allow_pin = allow_pin
        self._hub_endpoint = hub_endpoint
        self._hub_token = hub_token
        self._progress_log_interval_s = progress_log_interval_s
        self._entries: dict[str, _Entry] = {}

    # ---- lifecycle ----

    async def start(self) -> None:
        """Create the directories and take back the entries a previous run left complete."""
        restored = await asyncio.to_thread(self._scan)
        for entry in restored:
            self._entries[entry.key] = entry
            if entry.request.warm or entry.request.pin:
                entry.task = asyncio.create_task(self._finish(entry), name=f"cache-{entry.key}")
        log.info("model cache ready root=%s entries=%d", self.root, len(restored))

    async def close(self) -> None:
        for entry in self._entries.values():  # every fetching thread told at once, then waited for
            entry.cancel.set()
        for entry in self._entries.values():
            await self._stop_work(entry)
            if entry.weights is not None:
                entry.weights.close()
                entry.weights = None

    # ---- reading ----

    def entries(self) -> list[CacheEntry]:
        return [e.snapshot() for e in sorted(self._entries.values(), key=lambda e: e.key)]

    def get(self, key: str) -> CacheEntry:
        return self._entry(key).snapshot()

    def ready_path(self, key: str) -> Path:
        """The directory of a complete entry, to load a model from; errors name `cache_key`."""
        entry = self._entries.get(key)
        if entry is None:
            raise CacheEntryNotFound(f"cache_key: no cache entry {key!r} on this node (stage it with "
                                     f"PUT /v1/node/cache/{key})", param="cache_key")
        if entry.phase not in READY_PHASES or entry.path is None:
            raise CacheNotReady(f"cache_key: cache entry {key!r} is {entry.phase.value}"
                                f"{f' ({entry.message})' if entry.message else ''}; load it once Cached",
                                param="cache_key")
        return entry.path

    # ---- staging ----

    async def stage(self, key: str, request: StageRequest) -> CacheEntry:
        source = parse_source(request.source, request.revision)  # SourceError: the caller maps it to 400
        digests = check_digests(request.digests)
        entry = self._entries.get(key)
        if entry is not None and entry.phase is not CachePhase.FAILED:
            differing = entry.same_source(request, digests)
            if differing is not None:
                raise CacheConflict(
                    f"cache entry {key!r} is staged from {entry.request.source} with another {differing}; "
                    f"DELETE /v1/node/cache/{key} first to stage it anew", param=differing)
            if (request.warm, request.pin) != (entry.request.warm, entry.request.pin):
                await self._apply_flags(entry, request)
            return entry.snapshot()
        if entry is not None:  # Failed: start over
            await self._stop_work(entry)
        entry = _Entry(key, request, digests)
        self._entries[key] = entry
        entry.task = asyncio.create_task(self._stage(entry, source), name=f"cache-{key}")
        log.info("cache staging key=%s source=%s warm=%s pin=%s", key, request.source, request.warm, request.pin)
        return entry.snapshot()

    async def delete(self, key: str) -> CacheEntry:
        entry = self._entry(key)
        users = self._in_use(key)
        if users:
            raise CacheInUse(
                f"cache entry {key!r} is used by loaded model(s) {', '.join(users)}; unload them first "
                f"(DELETE /v1/node/models/{users[0]})", param="key")
        await self._stop_work(entry)
        if entry.weights is not None:
            entry.weights.close()
            entry.weights = None
        snapshot = entry.snapshot()
        del self._entries[key]
        await asyncio.to_thread(self._remove_files, key)
        log.info("cache entry deleted key=%s phase=%s", key, snapshot.phase.value)
        return snapshot

    # ---- the staging task ----

    async def _stage(self, entry: _Entry, source: Source) -> None:
        partial = self.root / PARTIAL_DIR / f"{os.getpid()}-{entry.key}-{uuid.uuid4().hex[:8]}"
        fetcher = Fetcher(self._hub_endpoint, self._hub_token)
        try:
            entry.phase = CachePhase.DOWNLOADING
            files = await asyncio.to_thread(fetcher.list_files, source, list(entry.digests), entry.cancel)
            sizes = [f.size for f in files]
            total = sum(s for s in sizes if s is not None) if None not in sizes else None
            room = self._room(entry.key)
            if room is not None and total is not None and total > room:
                raise FetchError(f"the entry needs {total} bytes but the cache has {room} bytes free "
                                 f"(weight_management.max_cache_bytes={self._max_bytes})")
            key = entry.key
            meter = ByteMeter(key, total, lambda m, final: log.info(
                "cache staging %s key=%s %s", "fetched" if final else "progress", key, m.line(with_label=False)),
                interval_s=self._progress_log_interval_s)
            entry.progress = Progress(bytes_total=total, limit_bytes=room, cancel=entry.cancel, meter=meter)
            partial.mkdir(parents=True)
            hashes = await asyncio.to_thread(fetcher.fetch, files, partial, entry.progress)
            meter.finish()
            entry.bytes_done = entry.progress.bytes_done
            entry.bytes_total = entry.bytes_done
            entry.phase = CachePhase.VERIFYING
            expected = {f.path: f.sha256 for f in files if f.sha256} | entry.digests
            await asyncio.to_thread(_verify, partial, expected, hashes, entry.cancel)
            final = await asyncio.to_thread(self._install, entry, partial)
        except (FetchError, VerifyError, OSError) as exc:
            entry.phase = CachePhase.FAILED
            entry.message = str(exc)
            log.warning("cache staging failed key=%s error=%s", entry.key, exc)
            return
        except Cancelled:
            return
        finally:
            fetcher.close()
            if entry.progress is not None:
                entry.bytes_done = entry.progress.bytes_done
                entry.bytes_total = entry.bytes_total or entry.progress.bytes_total
            await asyncio.to_thread(shutil.rmtree, partial, True)
        entry.path = final
        entry.phase = CachePhase.CACHED
        log.info("cache entry cached key=%s bytes=%d path=%s", entry.key, entry.bytes_total, final)
        await self._finish(entry)

    async def _finish(self, entry: _Entry) -> None:
        """Warm and/or pin a Cached entry as its request asks."""
        assert entry.path is not None
        if not (entry.request.warm or entry.request.pin):
            return
        try:
            weights = entry.weights or await WeightFiles.open(entry.path)
            entry.load_time_seconds = round(await weights.warm(), 4)
            entry.phase = CachePhase.WARM
            entry.message = None
            if entry.request.pin:
                await self._pin(entry, weights)
            if entry.weights is None:
                weights.close()
        except OSError as exc:
            entry.phase = CachePhase.FAILED
            entry.message = f"warming failed: {exc}"
            log.warning("cache warming failed key=%s error=%s", entry.key, exc)
            return
        log.info("cache entry %s key=%s load_time_s=%s", entry.phase.value.lower(), entry.key,
                 entry.load_time_seconds)

    async def _pin(self, entry: _Entry, weights: WeightFiles) -> None:
        if not self._allow_pin:
            entry.message = "not pinned: pinning is off on this node (weight_management.allow_pin=false)"
            return
        try:
            await weights.pin()
        except PinRefused as exc:
            entry.message = str(exc)
            log.warning("cache pin refused key=%s reason=%s", entry.key, exc)
            return
        entry.weights = weights
        entry.phase = CachePhase.PINNED

    async def _apply_flags(self, entry: _Entry, request: StageRequest) -> None:
        """A changed warm/pin on a live entry: applied in place (or at the end of staging)."""
        entry.request = request
        if entry.phase not in READY_PHASES:
            return  # the staging task reads the new flags when it gets there
        await self._stop_work(entry)
        if not request.pin and entry.weights is not None:
            entry.weights.close()  # unmapping unlocks; the pages stay in the page cache
            entry.weights = None
            entry.phase = CachePhase.WARM
        entry.message = None
        wants_pin = request.pin and entry.phase is not CachePhase.PINNED
        if wants_pin or (request.warm and entry.phase is CachePhase.CACHED):
            entry.task = asyncio.create_task(self._finish(entry), name=f"cache-{entry.key}")

    # ---- helpers ----

    def _entry(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            raise CacheEntryNotFound(f"no cache entry {key!r} on this node", param="key")
        return entry

    def _room(self, key: str) -> int | None:
        if self._max_bytes is None:
            return None
        used = sum(e.bytes_total or e.bytes_done for k, e in self._entries.items()
                   if k != key and e.phase is not CachePhase.FAILED)
        return max(self._max_bytes - used, 0)

    async def _stop_work(self, entry: _Entry) -> None:
        """Stop the entry's task: the fetching thread sees the cancel flag at its next chunk."""
        entry.cancel.set()
        if entry.task is not None and not entry.task.done():
            await asyncio.wait({entry.task}, timeout=STOP_GRACE_S)
            entry.task.cancel()
            await asyncio.gather(entry.task, return_exceptions=True)
        entry.task = None
        entry.cancel = threading.Event()
        if entry.progress is not None:
            entry.progress.cancel = entry.cancel

    def _install(self, entry: _Entry, partial: Path) -> Path:
        """Move the verified files into place, then record the entry (so a restart finds it).

        A copy already there (a failed entry's leftovers, or another agent's copy of the same
        key) is swapped out by rename, never deleted in place under someone reading it."""
        final = self.root / entry.key
        if final.exists():
            old = partial.with_name(partial.name + ".old")
            final.rename(old)
            partial.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(final)
        record = {"request": entry.request.model_dump(mode="json"), "bytes_total": entry.bytes_total}
        records = self.root / ENTRIES_DIR
        tmp = records / f".{entry.key}.json.tmp"
        tmp.write_text(json.dumps(record))
        tmp.rename(records / f"{entry.key}.json")
        return final

    def _remove_files(self, key: str) -> None:
        (self.root / ENTRIES_DIR / f"{key}.json").unlink(missing_ok=True)
        shutil.rmtree(self.root / key, ignore_errors=True)

    def _scan(self) -> list[_Entry]:
        (self.root / ENTRIES_DIR).mkdir(parents=True, exist_ok=True)
        partial = self.root / PARTIAL_DIR
        partial.mkdir(exist_ok=True)
        for leftover in partial.iterdir():  # downloads of agents that died (not of a live one sharing the dir)
            if not _pid_alive(leftover.name.partition("-")[0]):
                shutil.rmtree(leftover, ignore_errors=True)
        restored = []
        for record_path in sorted((self.root / ENTRIES_DIR).glob("*.json")):
            key = record_path.stem
            try:
                record = json.loads(record_path.read_text())
                request = StageRequest.model_validate(record["request"])
                digests = check_digests(request.digests)
            except (OSError, ValueError, KeyError, ValidationError) as exc:
                log.warning("cache record unreadable, ignored path=%s error=%s", record_path, exc)
                continue
            directory = self.root / key
            if not directory.is_dir():
                record_path.unlink(missing_ok=True)
                continue
            total = record.get("bytes_total")
            restored.append(_Entry(key, request, digests, phase=CachePhase.CACHED, bytes_total=total,
                                   bytes_done=total or 0, path=directory))
        return restored


def _pid_alive(text: str) -> bool:
    if not text.isdigit():
        return False
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _verify(directory: Path, expected: dict[str, str], known: dict[str, str], cancel: threading.Event) -> None:
    for path, digest in sorted(expected.items()):
        file = directory / path
        if not file.is_file():
            raise VerifyError(f"{path}: a digest is given but the source has no such file")
        actual = known.get(path) or sha256_of(file, cancel)
        if actual != digest:
            raise VerifyError(f"sha256 mismatch for {path}: expected {digest}, got {actual}")

