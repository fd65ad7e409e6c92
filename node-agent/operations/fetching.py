"""Bring a source's files into a directory: list them, then copy, link or download each.

Synchronous on purpose: the stager runs a whole fetch on a worker thread
(`asyncio.to_thread`), so file writes and hashing never touch the event loop, and a
plain loop over chunks is the clearest way to report progress and honour a cancel.
HTTP goes through one `httpx.Client` (streaming, redirects followed, as the Hub's
resolve URLs redirect to a CDN). Every failure is a `FetchError` whose message names
the file or URL that failed.

Files read in full on the way in (downloads, copies) are hashed as they stream by;
hardlinked files are not read at all, and the Verifying step hashes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from mlxpool.agent.operations.sources import (
    MANIFEST_NAME,
    FileSource,
    HttpSource,
    HubSource,
    Source,
    hub_wants,
    safe_relative_path,
)
from mlxpool.progress import ByteMeter

CHUNK_BYTES = 1 << 20
MAX_SOURCE_FILES = 10_000
"""Files a directory source may hold; a model has tens. Bounds a walk gone wrong."""
MAX_SOURCE_DEPTH = 16
MODEL_MARKER = "config.json"
"""What makes a directory a model (mlx-lm and transformers read it first)."""
TIMEOUT = httpx.Timeout(30.0, read=120.0)


class FetchError(RuntimeError):
    """A file could not be listed or fetched; the message names it."""


class Cancelled(RuntimeError):
    """The fetch was cancelled (the entry was deleted)."""


@dataclass(frozen=True)
class SourceFile:
    path: str
    """Relative to the model directory, normalized."""
    size: int | None = None
    sha256: str | None = None
    """The digest the source itself publishes (manifest, Hub LFS metadata), if any."""
    location: str = ""
    """A URL, or a local path for file:// sources."""


@dataclass
class Progress:
    """Byte counters written by the fetching thread, read by the event loop (GIL-atomic ints)."""

    bytes_total: int | None = None
    bytes_done: int = 0
    limit_bytes: int | None = None
    """Fail once more than this many bytes arrive (the cache's free room)."""
    cancel: threading.Event = field(default_factory=threading.Event)
    meter: ByteMeter | None = None
    """Reports bytes and rate (periodic log lines) as they arrive, when set."""

    def add(self, n: int) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled")
        self.bytes_done += n
        if self.meter is not None:
            self.meter.advance(n)
        if self.limit_bytes is not None and self.bytes_done > self.limit_bytes:
            raise FetchError(f"the entry outgrew the cache's free room of {self.limit_bytes} bytes "
                             "(weight_management.max_cache_bytes)")


class _ManifestFile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    path: str
    size: int | None = None
    sha256: str | None = None


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    files: list[str | _ManifestFile]


class Fetcher:
    """Lists and fetches the files of one source; `close()` releases the HTTP client."""

    def __init__(self, hub_endpoint: str, hub_token: str | None = None) -> None:
        self.hub_endpoint = hub_endpoint.rstrip("/")
        self._hub_token = hub_token
        self._client = httpx.Client(follow_redirects=True, timeout=TIMEOUT)

    def close(self) -> None:
        self._client.close()

    # ---- listing ----

    def list_files(self, source: Source, digest_paths: list[str],
                   cancel: threading.Event | None = None) -> list[SourceFile]:
        """The source's files; FetchError when there are none that make a model (no config.json)."""
        files = self._list(source, digest_paths, cancel)
        if not any(f.path == MODEL_MARKER for f in files):
            raise FetchError(f"the source is not a model directory: it has no {MODEL_MARKER} at its top")
        return files

    def _list(self, source: Source, digest_paths: list[str], cancel: threading.Event | None) -> list[SourceFile]:
        if isinstance(source, FileSource):
            return self._list_directory(source.directory, digest_paths, cancel)
        if isinstance(source, HttpSource):
            if digest_paths:  # the digests name the files: no manifest needed
                return [SourceFile(p, self._head_size(source.url_of(p)), None, source.url_of(p))
                        for p in digest_paths]
            return self._list_manifest(source)
        return self._list_hub(source)

    def _list_directory(self, directory: Path, digest_paths: list[str],
                        cancel: threading.Event | None = None) -> list[SourceFile]:
        if not directory.is_dir():
            raise FetchError(f"source directory {directory} does not exist or is not a directory")
        files = []
        for path in sorted(_walk(directory, cancel)):
            relative = path.relative_to(directory).as_posix()
            files.append(SourceFile(relative, path.stat().st_size, None, str(path)))
        present = {f.path for f in files}
        missing = [p for p in digest_paths if p not in present]
        if missing:
            raise FetchError(f"a digest names {missing[0]}, which {directory} does not have")
        return files

    def _list_manifest(self, source: HttpSource) -> list[SourceFile]:
        url = source.url_of(MANIFEST_NAME)
        body = self._get_json(url, "the manifest")
        try:
            manifest = _Manifest.model_validate(body)
        except ValidationError as exc:
            raise FetchError(f"{url}: not a manifest ({{\"files\": [...]}}): {exc.errors()[0]['msg']}") from None
        files = []
        for item in manifest.files:
            entry = _ManifestFile(path=item) if isinstance(item, str) else item
            path = _checked_path(entry.path, url)
            files.append(SourceFile(path, entry.size, _hex_or_none(entry.sha256), source.url_of(path)))
        if not files:
            raise FetchError(f"{url} lists no files")
        return files

    def _list_hub(self, source: HubSource) -> list[SourceFile]:
        api = (f"{self.hub_endpoint}/api/models/{source.repo}/revision/"
               f"{quote(source.revision, safe='')}?blobs=true")
        info = self._get_json(api, f"Hub repository {source.repo}@{source.revision}", hub=True)
        commit = info.get("sha") or source.revision
        files = []
        for sibling in info.get("siblings") or []:
            name = sibling.get("rfilename")
            if not isinstance(name, str) or not hub_wants(name):
                continue
            path = _checked_path(name, api)
            lfs = sibling.get("lfs") or {}
            size = lfs.get("size", sibling.get("size"))
            url = f"{self.hub_endpoint}/{source.repo}/resolve/{quote(commit, safe='')}/{quote(path)}"
            files.append(SourceFile(path, size if isinstance(size, int) else None,
                                    _hex_or_none(lfs.get("sha256")), url))
        if not files:
            raise FetchError(f"Hub repository {source.repo}@{source.revision} has no model files")
        return files

    # ---- fetching ----

    def fetch(self, files: list[SourceFile], dest: Path, progress: Progress) -> dict[str, str]:
        """Put every file under `dest`; the sha256 of each file that was read while fetched."""
        hashes: dict[str, str] = {}
        for file in files:
            target = dest / file.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if file.location.startswith(("http://", "https://")):
                hashes[file.path] = self._download(file, target, progress)
            elif _try_hardlink(Path(file.location), target):
                progress.add(target.stat().st_size)
            else:
                hashes[file.path] = _copy(file, target, progress)
        return hashes

    def _download(self, file: SourceFile, target: Path, progress: Progress) -> str:
        digest = hashlib.sha256()
        received = 0
        try:
            with self._client.stream("GET", file.location, headers=self._headers(file.location)) as response:
                if response.status_code != 200:
                    raise FetchError(f"GET {file.location}: HTTP {response.status_code} for {file.path}")
                with open(target, "wb") as out:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        progress.add(len(chunk))
        except httpx.HTTPError as exc:
            raise FetchError(f"GET {file.location}: {type(exc).__name__}: {exc} (file {file.path})") from None
        if file.size is not None and received != file.size:
            raise FetchError(f"{file.path}: received {received} bytes, the source announced {file.size}")
        return digest.hexdigest()

    # ---- HTTP helpers ----

    def _headers(self, url: str) -> dict[str, str]:
        if self._hub_token and url.startswith(self.hub_endpoint + "/"):
            return {"Authorization": f"Bearer {self._hub_token}"}
        return {}

    def _get_json(self, url: str, what: str, hub: bool = False) -> Any:
        try:
            response = self._client.get(url, headers=self._headers(url))
        except httpx.HTTPError as exc:
            raise FetchError(f"GET {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            hint = " (private or gated? set HF_TOKEN)" if hub and response.status_code in (401, 403) else ""
            raise FetchError(f"{what}: GET {url}: HTTP {response.status_code}{hint}")
        try:
            return response.json()
        except json.JSONDecodeError:
            raise FetchError(f"{what}: GET {url}: the body is not JSON") from None

    def _head_size(self, url: str) -> int | None:
        try:
            response = self._client.head(url, headers=self._headers(url))
        except httpx.HTTPError:
            return None
        length = response.headers.get("content-length")
        return int(length) if response.status_code == 200 and length and length.isdigit() else None


def sha256_of(path: Path, cancel: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            digest.update(chunk)
    return digest.hexdigest()


def _walk(directory: Path, cancel: threading.Event | None = None) -> Iterator[Path]:
    """Regular files under `directory` (hidden files and directories, .git or .cache, skipped).

    Symbolic links are followed only where they stay confined: to a directory inside
    `directory`, each real directory walked once (so a link loop ends instead of spinning
    forever), and to a file inside `directory` or, for a Hugging Face cache snapshot
    (`models--org--name/snapshots/<rev>`), inside its repository's `blobs/`, where the
    Hub's links point. Anything else is a FetchError naming the link. Bounded in files
    and depth; `cancel` is honoured between directories.
    """
    root = directory.resolve()
    allowed = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        allowed.append(root.parent.parent / "blobs")
    seen: set[tuple[int, int]] = set()
    pending = [(root, directory, 0)]
    count = 0
    while pending:
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled")
        real, shown, depth = pending.pop()
        status = real.stat()
        if (status.st_dev, status.st_ino) in seen:  # a link loop, or a second link to one directory
            continue
        seen.add((status.st_dev, status.st_ino))
        with os.scandir(real) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        for item in entries:
            if item.name.startswith("."):
                continue
            try:  # both follow links; a looping or dangling link is neither, and has no file to stage
                is_dir, is_file = item.is_dir(), item.is_file()
                if not (is_dir or is_file):
                    continue
                target = Path(os.path.realpath(item.path, strict=True))
            except OSError:
                continue
            if is_dir:
                if not target.is_relative_to(root):
                    raise FetchError(f"{shown / item.name} links to {target}, outside the source directory")
                if depth + 1 > MAX_SOURCE_DEPTH:
                    raise FetchError(f"{shown / item.name}: directories nest deeper than {MAX_SOURCE_DEPTH}")
                pending.append((target, shown / item.name, depth + 1))
            else:
                if item.is_symlink() and not any(target.is_relative_to(a) for a in allowed):
                    raise FetchError(f"{shown / item.name} links to {target}, outside the source directory")
                count += 1
                if count > MAX_SOURCE_FILES:
                    raise FetchError(f"{directory} holds more than {MAX_SOURCE_FILES} files; not a model directory")
                yield shown / item.name


def _try_hardlink(source: Path, target: Path) -> bool:
    """Link when source and target share a filesystem; False means copy instead."""
    try:
        os.link(source.resolve(), target)
        return True
    except OSError:  # EXDEV across filesystems, EPERM where links are not allowed
        return False


def _copy(file: SourceFile, target: Path, progress: Progress) -> str:
    digest = hashlib.sha256()
    try:
        with open(file.location, "rb") as src, open(target, "wb") as out:
            while chunk := src.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                progress.add(len(chunk))
        shutil.copymode(file.location, target)
    except OSError as exc:
        raise FetchError(f"copy {file.location}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _checked_path(path: str, where: str) -> str:
    try:
        return safe_relative_path(path)
    except ValueError as exc:
        raise FetchError(f"{where}: {exc}") from None


def _hex_or_none(value: Any) -> str | None:
    return value.lower() if isinstance(value, str) and len(value) == 64 else None
