"""The model cache in-process: staging from file://, http(s):// and hf:// (a real local
HTTP server), progress, digests, limits, warm/pin, delete, restart."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from mlxpool.agent.operations.errors import CacheConflict, CacheEntryNotFound, CacheInUse, CacheNotReady
from mlxpool.agent.operations.sources import SourceError
from mlxpool.agent.operations.staging import ModelCacheStore
from mlxpool.agentapi import CacheEntry, CachePhase, StageRequest
from mlxpool.progress import human_bytes

SETTLED = (CachePhase.CACHED, CachePhase.WARM, CachePhase.PINNED, CachePhase.FAILED)


def visible_files(directory: Path) -> list[Path]:
    """The model's files as staging sees them: hidden ones (the content-identity cache an agent
    writes beside the files it loaded) are never staged."""
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))



def store(root: Path, users: dict[str, list[str]] | None = None, hub: str = "http://127.0.0.1:9", **kwargs
          ) -> ModelCacheStore:
    users = users if users is not None else {}
    return ModelCacheStore(root, in_use=lambda key: users.get(key, []), hub_endpoint=hub, **kwargs)


async def settle(cache: ModelCacheStore, key: str, timeout: float = 30) -> CacheEntry:
    for _ in range(int(timeout / 0.02)):
        entry = cache.get(key)
        if entry.phase in SETTLED and not _busy(cache, key):
            return entry
        await asyncio.sleep(0.02)
    raise AssertionError(f"{key} did not settle: {cache.get(key)}")


def _busy(cache: ModelCacheStore, key: str) -> bool:
    task = cache._entries[key].task
    return task is not None and not task.done()


@pytest.fixture
async def cache(tmp_path: Path):
    caches: list[ModelCacheStore] = []

    async def make(**kwargs) -> ModelCacheStore:
        c = store(tmp_path / "cache", **kwargs)
        await c.start()
        caches.append(c)
        return c

    yield make
    for c in caches:
        await c.close()


async def test_file_source_is_hardlinked_and_cached(cache, tiny_model):
    c = await cache()
    entry = await c.stage("tiny", StageRequest(source=f"file://{tiny_model}"))
    assert entry.phase is CachePhase.PENDING and entry.source == f"file://{tiny_model}"
    entry = await settle(c, "tiny")
    assert entry.phase is CachePhase.CACHED, entry.message
    # Hidden files (the content-identity cache another test may have written) are not staged.
    files = [p for p in tiny_model.iterdir() if not p.name.startswith(".")]
    size = sum(p.stat().st_size for p in files)
    assert (entry.bytes_total, entry.bytes_done, entry.progress) == (size, size, 1.0)
    staged = Path(entry.path)
    assert sorted(p.name for p in staged.iterdir()) == sorted(p.name for p in files)
    # Same filesystem: a hardlink, not a copy.
    assert (staged / "model.safetensors").stat().st_ino == (tiny_model / "model.safetensors").stat().st_ino
    assert c.ready_path("tiny") == staged


async def test_a_missing_source_directory_fails_naming_it(cache, tmp_path):
    c = await cache()
    await c.stage("nope", StageRequest(source=f"file://{tmp_path}/missing"))
    entry = await settle(c, "nope")
    assert entry.phase is CachePhase.FAILED and f"{tmp_path}/missing" in entry.message


async def test_http_source_with_manifest_reports_progress_while_downloading(cache, tiny_model, model_server):
    model_server.chunk_delay = 0.05
    url = model_server.add("tiny", tiny_model)
    c = await cache()
    await c.stage("tiny-http", StageRequest(source=url))
    seen: list[CacheEntry] = []
    while (entry := c.get("tiny-http")).phase not in SETTLED:
        seen.append(entry)
        await asyncio.sleep(0.02)
    assert entry.phase is CachePhase.CACHED, entry.message
    midway = [e for e in seen if e.phase is CachePhase.DOWNLOADING and 0 < e.progress < 1]
    assert midway, [(e.phase, e.progress) for e in seen]
    assert all(e.bytes_total == entry.bytes_total for e in midway)
    assert (Path(entry.path) / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert ("GET", "/models/tiny/index.json") in [(m, p) for m, p, _ in model_server.requests]


async def test_a_download_logs_bytes_rate_and_eta_then_a_final_line(cache, tiny_model, model_server, caplog):
    url = model_server.add("tiny", tiny_model)
    c = await cache(progress_log_interval_s=0)  # a line at every chunk (10 s in an agent)
    with caplog.at_level(logging.INFO, logger="mlxpool.agent.operations.staging"):
        await c.stage("tiny-log", StageRequest(source=url))
        entry = await settle(c, "tiny-log")
    assert entry.phase is CachePhase.CACHED, entry.message
    total = human_bytes(entry.bytes_total)
    lines = [r.getMessage() for r in caplog.records if "key=tiny-log" in r.getMessage()]
    progress = [line for line in lines if line.startswith("cache staging progress")]
    assert len(progress) >= 3, lines  # one per file here: config, tokenizer files, weights
    assert all(f"/ {total} (" in line and "/s eta " in line for line in progress), progress
    fetched = [line for line in lines if line.startswith("cache staging fetched")]
    assert len(fetched) == 1 and f"{total} / {total} (100%)" in fetched[0] and " in " in fetched[0], lines


async def test_http_source_without_manifest_takes_the_file_list_from_digests(cache, tiny_model, model_server,
                                                                             digests):
    model_server.manifest = False
    url = model_server.add("tiny", tiny_model)
    c = await cache()
    await c.stage("tiny", StageRequest(source=url, digests=digests))
    entry = await settle(c, "tiny")
    assert entry.phase is CachePhase.CACHED, entry.message
    assert entry.bytes_total == sum(p.stat().st_size for p in visible_files(tiny_model))
    assert not any(p.endswith("index.json") for _, p, _ in model_server.requests)


async def test_a_digest_mismatch_fails_naming_the_file(cache, tiny_model, model_server, digests):
    url = model_server.add("tiny", tiny_model)
    c = await cache()
    wrong = {**digests, "tokenizer.json": "0" * 64}
    await c.stage("tiny", StageRequest(source=url, digests=wrong))
    entry = await settle(c, "tiny")
    assert entry.phase is CachePhase.FAILED
    assert "sha256 mismatch for tokenizer.json" in entry.message and "0" * 64 in entry.message
    assert not (c.root / "tiny").exists() and list((c.root / ".partial").iterdir()) == []
    with pytest.raises(CacheNotReady):
        c.ready_path("tiny")
    # A failed entry is staged afresh by the next PUT.
    await c.stage("tiny", StageRequest(source=url, digests=digests))
    assert (await settle(c, "tiny")).phase is CachePhase.CACHED


async def test_corrupted_bytes_in_transit_fail_verification(cache, tiny_model, model_server, digests):
    url = model_server.add("tiny", tiny_model)
    model_server.corrupt.add("tiny/model.safetensors")
    c = await cache()
    await c.stage("tiny", StageRequest(source=url, digests=digests))
    entry = await settle(c, "tiny")
    assert entry.phase is CachePhase.FAILED and "sha256 mismatch for model.safetensors" in entry.message


async def test_hub_source_speaks_the_hub_protocol(tmp_path, tiny_model, model_server, monkeypatch):
    model_server.add("org/tiny", tiny_model)
    c = store(tmp_path / "cache", hub=model_server.url, hub_token="hf_secret")
    await c.start()
    try:
        await c.stage("tiny-hub", StageRequest(source="hf://org/tiny@v1"))
        entry = await settle(c, "tiny-hub")
        assert entry.phase is CachePhase.CACHED, entry.message
        # README.md is listed by the Hub but is not a file mlx-lm loads: not fetched.
        names = sorted(p.name for p in visible_files(tiny_model))
        assert sorted(p.name for p in visible_files(Path(entry.path))) == names
        paths = [p for _, p, _ in model_server.requests]
        assert "/api/models/org/tiny/revision/v1" in paths
        assert f"/org/tiny/resolve/{'0123456789abcdef' * 2 + '01234567'}/model.safetensors" in paths
        assert any(p.startswith("/cdn/org/tiny/") for p in paths)  # the resolve redirect was followed
        api_headers = next(h for _, p, h in model_server.requests if p.startswith("/api/"))
        assert api_headers.get("Authorization") == "Bearer hf_secret"
    finally:
        await c.close()


async def test_hub_lfs_digests_are_verified_without_request_digests(tmp_path, tiny_model, model_server):
    model_server.add("org/tiny", tiny_model)
    model_server.corrupt.add("org/tiny/model.safetensors")
    c = store(tmp_path / "cache", hub=model_server.url)
    await c.start()
    try:
        await c.stage("tiny-hub", StageRequest(source="hf://org/tiny"))
        entry = await settle(c, "tiny-hub")
        assert entry.phase is CachePhase.FAILED and "sha256 mismatch for model.safetensors" in entry.message
        await c.stage("gone", StageRequest(source="hf://org/missing"))
        entry = await settle(c, "gone")
        assert entry.phase is CachePhase.FAILED and "HTTP 404" in entry.message and "org/missing" in entry.message
    finally:
        await c.close()


async def test_the_cache_size_cap_is_enforced(cache, tiny_model, second_model):
    size = sum(p.stat().st_size for p in visible_files(tiny_model))
    c = await cache(max_bytes=size + size // 2)
    await c.stage("a", StageRequest(source=f"file://{tiny_model}"))
    assert (await settle(c, "a")).phase is CachePhase.CACHED
    await c.stage("b", StageRequest(source=f"file://{second_model}"))
    entry = await settle(c, "b")
    assert entry.phase is CachePhase.FAILED and "max_cache_bytes" in entry.message


async def test_warm_then_pin_in_place_then_unpin(cache, tiny_model):
    c = await cache()
    await c.stage("tiny", StageRequest(source=f"file://{tiny_model}", warm=True))
    entry = await settle(c, "tiny")
    assert entry.phase is CachePhase.WARM and entry.load_time_seconds is not None
    # Changing pin on a live entry applies in place (same source, no new download).
    await c.stage("tiny", StageRequest(source=f"file://{tiny_model}", warm=True, pin=True))
    entry = await settle(c, "tiny")
    assert entry.phase is CachePhase.PINNED and entry.message is None
    weights = c._entries["tiny"].weights
    assert weights is not None and weights.pinned and await weights.resident_fraction() == 1.0
    await c.stage("tiny", StageRequest(source=f"file://{tiny_model}", warm=True))
    entry = await settle(c, "tiny")
    assert entry.phase is CachePhase.WARM and c._entries["tiny"].weights is None


async def test_pinning_off_by_config_says_so(cache, tiny_model):
    c = await cache(allow_pin=False)
    await c.stage("tiny", StageRequest(source=f"file://{tiny_model}", pin=True))
    entry = await settle(c, "tiny")
    assert entry.phase is CachePhase.WARM and "allow_pin=false" in entry.message


async def test_another_source_for_a_live_key_is_a_conflict(cache, tiny_model, second_model):
    c = await cache()
    await c.stage("m", StageRequest(source=f"file://{tiny_model}"))
    with pytest.raises(CacheConflict) as caught:
        await c.stage("m", StageRequest(source=f"file://{second_model}"))
    assert caught.value.status_code == 409 and caught.value.param == "source"
    first = c._entries["m"].task
    again = await c.stage("m", StageRequest(source=f"file://{tiny_model}"))  # idempotent
    assert c._entries["m"].task is first and again.source == f"file://{tiny_model}"


async def test_bad_requests_name_the_field(cache):
    c = await cache()
    with pytest.raises(SourceError) as caught:
        await c.stage("x", StageRequest(source="file:///m", revision="main"))
    assert caught.value.param == "revision"
    with pytest.raises(SourceError) as caught:
        await c.stage("x", StageRequest(source="hf://org/m", digests={"model.safetensors": "xyz"}))
    assert caught.value.param == "digests.model.safetensors"
    assert c.entries() == []


async def test_delete_removes_the_files_unless_a_model_uses_them(tmp_path, tiny_model):
    users: dict[str, list[str]] = {"tiny": ["chat"]}
    c = store(tmp_path / "cache", users=users)
    await c.start()
    try:
        await c.stage("tiny", StageRequest(source=f"file://{tiny_model}"))
        path = Path((await settle(c, "tiny")).path)
        with pytest.raises(CacheInUse) as caught:
            await c.delete("tiny")
        assert caught.value.status_code == 409 and "chat" in caught.value.message
        users.clear()
        deleted = await c.delete("tiny")
        assert deleted.key == "tiny" and not path.exists()
        assert not (c.root / ".entries" / "tiny.json").exists()
        with pytest.raises(CacheEntryNotFound):
            c.get("tiny")
        with pytest.raises(CacheEntryNotFound):
            await c.delete("tiny")
    finally:
        await c.close()


async def test_delete_during_a_download_cancels_it(cache, tiny_model, model_server):
    model_server.chunk_delay = 0.1
    url = model_server.add("tiny", tiny_model)
    c = await cache()
    await c.stage("slow", StageRequest(source=url))
    for _ in range(200):
        if c.get("slow").bytes_done > 0:
            break
        await asyncio.sleep(0.02)
    assert c.get("slow").phase is CachePhase.DOWNLOADING
    await c.delete("slow")
    assert c.entries() == [] and not (c.root / "slow").exists()
    assert list((c.root / ".partial").iterdir()) == []


async def test_a_restarted_store_finds_its_entries_again(tmp_path, tiny_model):
    first = store(tmp_path / "cache")
    await first.start()
    await first.stage("tiny", StageRequest(source=f"file://{tiny_model}", warm=True))
    staged = await settle(first, "tiny")
    await first.close()
    partial = tmp_path / "cache" / ".partial"
    (partial / "999999999-tiny-dead").mkdir()  # a download of an agent that died
    (partial / f"{os.getppid()}-tiny-live").mkdir()  # one of a live agent sharing the directory
    second = store(tmp_path / "cache")
    await second.start()
    try:
        entry = await settle(second, "tiny")
        assert entry.phase is CachePhase.WARM and entry.path == staged.path
        assert entry.bytes_total == staged.bytes_total
        assert [p.name for p in partial.iterdir()] == [f"{os.getppid()}-tiny-live"]
    finally:
        await second.close()


@pytest.fixture
def digests(tiny_model: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(visible_files(tiny_model))}


def test_links_are_possible_here(tmp_path):  # the hardlink test above relies on it
    (tmp_path / "a").write_text("x")
    os.link(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").stat().st_nlink == 2
