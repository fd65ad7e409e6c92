"""Where a cache entry's files come from: parsing and checking a StageRequest (pure).

Three kinds of source, each a directory of model files:
- `file:///abs/dir`: a directory on this machine (copied, or hardlinked when it is on
  the cache's filesystem).
- `http(s)://host/dir/`: a directory served over HTTP. Its file list is the keys of
  the request's `digests` when given; otherwise the directory's `index.json`,
  `{"files": ["config.json", {"path": "model.safetensors", "size": 123, "sha256": "…"}]}`
  (strings or objects; `size` and `sha256` optional).
- `hf://org/repo[@revision]`: a Hugging Face repository, through the Hub's HTTP
  protocol at `HF_ENDPOINT` (default https://huggingface.co); the revision comes from
  `@revision` or the request's `revision` (default `main`). Only the files mlx-lm
  loads are fetched (`HUB_PATTERNS`).

Everything is checked here before any I/O: a bad URL, a `revision` for a source that
has none, a digest that is not 64 hex digits or names a path outside the model
directory — each a `SourceError` naming the request field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlsplit

DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
DEFAULT_HUB_REVISION = "main"
MANIFEST_NAME = "index.json"
# The files mlx-lm itself downloads for a model (mlx_lm.utils' allow_patterns).
HUB_PATTERNS = (
    "*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model",
    "*.txt", "*.jsonl", "*.jinja",
)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REPO_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SourceError(ValueError):
    """The request names an impossible source; `param` is the offending field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class FileSource:
    directory: Path


@dataclass(frozen=True)
class HttpSource:
    base_url: str
    """Ends with '/': file paths are joined onto it."""

    def url_of(self, path: str) -> str:
        return self.base_url + "/".join(quote(part, safe="") for part in PurePosixPath(path).parts)


@dataclass(frozen=True)
class HubSource:
    repo: str
    revision: str


Source = FileSource | HttpSource | HubSource


def parse_source(source: str, revision: str | None = None) -> Source:
    """The source a StageRequest names; SourceError naming `source` or `revision`."""
    scheme, _, rest = source.partition("://")
    if scheme == "file":
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise SourceError(f"source {source!r}: file:// URLs name a local path (file:///abs/dir)", "source")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise SourceError(f"source {source!r}: the path must be absolute", "source")
        if any(part in ("..", ".") for part in path.split("/")) or "\x00" in path:
            # /models/tiny/.. stages /models, which is no model: the path must name the directory itself
            raise SourceError(f"source {source!r}: the path must not contain '.' or '..' segments", "source")
        _no_revision(revision, "file://")
        return FileSource(Path(path))
    if scheme in ("http", "https"):
        parts = urlsplit(source)
        if not parts.hostname:
            raise SourceError(f"source {source!r}: no host", "source")
        if parts.query or parts.fragment:
            raise SourceError(f"source {source!r}: a directory URL takes no query or fragment", "source")
        _no_revision(revision, f"{scheme}://")
        return HttpSource(source if source.endswith("/") else source + "/")
    if scheme == "hf":
        repo, at, pinned = rest.partition("@")
        repo = repo.strip("/")
        if not _REPO_ID.match(repo):
            raise SourceError(f"source {source!r}: expected hf://org/repo[@revision]", "source")
        if at and not pinned:
            raise SourceError(f"source {source!r}: empty revision after '@'", "source")
        if pinned and revision and pinned != revision:
            raise SourceError(
                f"revision {revision!r} contradicts the source's @{pinned}; give one of them", "revision")
        return HubSource(repo, pinned or revision or DEFAULT_HUB_REVISION)
    raise SourceError(f"source {source!r}: the scheme must be file, http, https or hf", "source")


def check_digests(digests: dict[str, str]) -> dict[str, str]:
    """Digests keyed by normalized relative path, hex lowercased; SourceError naming the entry."""
    checked: dict[str, str] = {}
    for path, digest in digests.items():
        param = f"digests.{path}"
        try:
            normal = safe_relative_path(path)
        except ValueError as exc:
            raise SourceError(f"digests: {exc}", param) from None
        value = digest.lower().removeprefix("sha256:")
        if not _HEX64.match(value):
            raise SourceError(f"digests: {path!r}: expected a sha256 as 64 hex digits, got {digest!r}", param)
        if normal in checked:
            raise SourceError(f"digests: {path!r} is listed twice", param)
        checked[normal] = value
    return checked


def safe_relative_path(path: str) -> str:
    """`path` normalized ('a/./b' → 'a/b'); ValueError unless it stays inside the model directory."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise ValueError(f"{path!r} is not a relative path inside the model directory")
    parts = [p for p in PurePosixPath(path).parts if p != "."]
    if not parts or any(p == ".." for p in parts):
        raise ValueError(f"{path!r} is not a relative path inside the model directory")
    return "/".join(parts)


def hub_wants(path: str) -> bool:
    """Whether a Hub repository file is one mlx-lm loads (HUB_PATTERNS, on the file name)."""
    return any(PurePosixPath(path).match(pattern) for pattern in HUB_PATTERNS)


def _no_revision(revision: str | None, scheme: str) -> None:
    if revision:
        raise SourceError(f"revision applies to hf:// sources only, not {scheme}", "revision")
