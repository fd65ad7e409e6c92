"""Cache staging under hostile sources and faults: the real model cache (in-process, real
files, a real tmpfs for the disk-full case) and one real agent process for SIGTERM.

Problems found by hand before the fixes: a directory source with a symbolic-link loop
stayed `Downloading` forever with a core spinning, `DELETE` returned while the work went
on and SIGTERM no longer stopped the agent; `file:///models/tiny/..` staged a directory
that is not a model.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mlxpool.agent.operations.sources import SourceError
from mlxpool.agent.operations.staging import ModelCacheStore
from mlxpool.agentapi import CacheEntry, CachePhase, StageRequest
from mlxpool.dev import components

SETTLED = (CachePhase.CACHED, CachePhase.FAILED)


async def settle(cache: ModelCacheStore, key: str, timeout: float = 20) -> CacheEntry:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = cache.get(key)
        task = cache._entries[key].task
        if entry.phase in SETTLED and (task is None or task.done()):
            return entry
        await asyncio.sleep(0.02)
    raise AssertionError(f"{key} did not settle in {timeout}s: {cache.get(key)}")


@pytest.fixture
async def cache(tmp_path: Path):
    store = ModelCacheStore(tmp_path / "cache", in_use=lambda key: [], hub_endpoint="http://127.0.0.1:9")
    await store.start()
    yield store
    await store.close()


def model_with_loop(tiny_model: Path, where: Path) -> Path:
    """The tiny model plus a directory with two links back at its parent: a walk that follows
    links (as the one before the fix did) meets 2**depth paths before its paths grow too long,
    i.e. it never ends (with one link it ended after ~450 levels of copies)."""
    shutil.copytree(tiny_model, where)
    (where / "sub").mkdir()
    (where / "sub" / "loop").symlink_to(where)
    (where / "sub" / "loop2").symlink_to(where)
    (where / "sub" / "self").symlink_to(where / "sub" / "self")  # ELOOP: neither file nor directory
    return where


async def test_a_symlink_loop_is_walked_once_and_cached(cache, tiny_model, tmp_path):
    source = model_with_loop(tiny_model, tmp_path / "looped")
    start = time.monotonic()
    await cache.stage("looped", StageRequest(source=f"file://{source}"))
    entry = await settle(cache, "looped")
    assert entry.phase is CachePhase.CACHED, entry.message
    assert time.monotonic() - start < 10
    staged = sorted(p.relative_to(entry.path).as_posix() for p in Path(entry.path).rglob("*") if p.is_file())
    assert staged == sorted(p.name for p in tiny_model.iterdir() if p.is_file() and not p.name.startswith("."))


@pytest.mark.parametrize("kind", ["directory", "file"])
async def test_a_link_out_of_the_source_fails_naming_it(cache, tiny_model, tmp_path, kind):
    source = tmp_path / "escaping"
    shutil.copytree(tiny_model, source)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("not for the cache")
    (source / "out").symlink_to(outside if kind == "directory" else outside / "key.txt")
    await cache.stage("escaping", StageRequest(source=f"file://{source}"))
    entry = await settle(cache, "escaping")
    assert entry.phase is CachePhase.FAILED
    assert "outside the source directory" in entry.message and "out" in entry.message
    assert not (cache.root / "escaping").exists()


async def test_hub_snapshot_links_into_its_blobs_are_followed(cache, tiny_model, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in tiny_model.iterdir():
        shutil.copy(file, blobs / f"blob-{file.name}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob-{file.name}")
    await cache.stage("hub", StageRequest(source=f"file://{snapshot}"))
    entry = await settle(cache, "hub")
    assert entry.phase is CachePhase.CACHED, entry.message


@pytest.mark.parametrize("suffix", ["/..", "/../tiny", "/./"])
async def test_dot_segments_in_a_file_source_are_refused(cache, tiny_model, suffix):
    with pytest.raises(SourceError, match=r"'\.' or '\.\.' segments"):
        await cache.stage("dots", StageRequest(source=f"file://{tiny_model}{suffix}"))


async def test_a_directory_that_is_not_a_model_fails(cache, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    await cache.stage("notes", StageRequest(source=f"file://{tmp_path / 'notes'}"))
    entry = await settle(cache, "notes")
    assert entry.phase is CachePhase.FAILED and "no config.json" in entry.message


async def test_delete_stops_a_slow_walk(cache, tiny_model, tmp_path):
    """A wide tree (many directories) with a loop: DELETE cancels the walk between
    directories, and the thread that walked ends (before the fix DELETE returned and the
    thread walked on: the loop made it endless)."""
    source = model_with_loop(tiny_model, tmp_path / "wide")
    for i in range(3000):
        (source / f"d{i:04d}").mkdir()
    loop = asyncio.get_running_loop()
    walkers = ThreadPoolExecutor(2, thread_name_prefix="walker")
    loop.set_default_executor(walkers)  # the staging's threads, so the test can wait for them to end
    await cache.stage("wide", StageRequest(source=f"file://{source}"))
    await asyncio.sleep(0.01)
    start = time.monotonic()
    await cache.delete("wide")
    assert time.monotonic() - start < 5
    assert cache.entries() == [] and not (cache.root / "wide").exists()
    loop.set_default_executor(ThreadPoolExecutor(2))
    # Every thread that worked for the entry ends: nothing walks on after the DELETE (30 s: a hang guard).
    await asyncio.wait_for(asyncio.to_thread(walkers.shutdown, wait=True), 30)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KiB tmpfs: smaller than the tiny model (~460 KB)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_during_staging_is_failed_and_leaves_nothing(small_disk, tiny_model):
    store = ModelCacheStore(small_disk / "cache", in_use=lambda key: [], hub_endpoint="http://127.0.0.1:9")
    await store.start()
    try:
        await store.stage("tiny", StageRequest(source=f"file://{tiny_model}"))  # another fs: copied, not linked
        entry = await settle(store, "tiny")
        assert entry.phase is CachePhase.FAILED
        assert "No space left on device" in entry.message, entry.message
        assert not (store.root / "tiny").exists()
        partial = store.root / ".partial"
        assert not partial.exists() or list(partial.iterdir()) == []
    finally:
        await store.close()
    # A restarted store does not take the failed entry for a cached one.
    again = ModelCacheStore(small_disk / "cache", in_use=lambda key: [], hub_endpoint="http://127.0.0.1:9")
    await again.start()
    try:
        assert all(e.phase is not CachePhase.CACHED for e in again.entries())
    finally:
        await again.close()


@pytest.mark.integration
def test_sigterm_stops_an_agent_that_was_staging_a_loop(tiny_model, tmp_path):
    source = model_with_loop(tiny_model, tmp_path / "looped")
    token = tmp_path / "ops"
    token.write_text("ops-staging-test\n")
    agent = components.start_agent(None, tmp_path / "logs", ops_token_file=token)
    try:
        headers = {"authorization": "Bearer ops-staging-test"}
        reply = httpx.put(f"{agent.url}/v1/node/cache/looped", headers=headers, timeout=10,
                          json={"source": f"file://{source}"})
        assert reply.status_code in (200, 201, 202), reply.text
        deadline = time.monotonic() + 20
        while (phase := httpx.get(f"{agent.url}/v1/node/cache/looped", headers=headers).json()["phase"]) \
                not in ("Cached", "Failed"):
            assert time.monotonic() < deadline, f"still {phase}"
            time.sleep(0.05)
        assert phase == "Cached"
        os.kill(agent.pid, signal.SIGTERM)
        agent.popen.wait(10)
        assert agent.popen.returncode == 0
    finally:
        agent.stop()
