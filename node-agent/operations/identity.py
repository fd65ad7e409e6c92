"""What a model *is*: a hash of its content (weights, tokenizer, config), not its name or sizes.

Two checkpoints of one run, or a fine-tune and its base, have the same config and the
same file names and sizes; only their bytes differ. Anything that treats two models as
the same (the distributed KV cache's keys, the prefix index, every dedupe) must go by
this identity, or one model is handed the other's KV state and answers wrongly.

The identity is blake2b over, for each file that decides the model's outputs (weights,
`config.json`, the tokenizer's files, an adapter's config) in path order: its relative
path, its size and its own blake2b digest. For safetensors files the digest is built
from each tensor's own digest (the bytes of one tensor, hashed once), which is what
shared-tensor accounting compares across models.

Hashing reads every byte once (~1 GB/s per core), so it runs off the event loop and its
result is cached beside the files (`.mlxpool-identity.json`), keyed by each file's path,
size and mtime: a second load, or a restarted agent, reads a few hundred bytes instead.
A directory that cannot be written still gets its identity, just not cached on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

CACHE_FILE = ".mlxpool-identity.json"
CACHE_VERSION = 1
CHUNK_BYTES = 8 * 1024 * 1024
DIGEST_BYTES = 16
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
"""A larger header is not a safetensors file we can parse (the format caps it at 100 MB)."""
WEIGHT_SUFFIXES = (".safetensors", ".npz", ".gguf", ".bin")
DECIDING_NAMES = frozenset({
    "config.json", "adapter_config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
})
"""Files besides the weights that change what a model answers (a README does not)."""


@dataclass(frozen=True)
class ContentIdentity:
    digest: str
    """32 hex characters: equal for byte-identical models, whatever their names or paths."""
    tensors: dict[str, str] = field(default_factory=dict, repr=False)
    """Safetensors tensor name -> digest of its bytes (dtype and shape included)."""
    tensor_bytes: dict[str, int] = field(default_factory=dict, repr=False)
    """Safetensors tensor name -> its size in bytes."""
    bytes_hashed: int = 0
    """Bytes read to compute it (0: it came from the cache)."""
    seconds: float = 0.0


def deciding_files(directory: Path) -> list[Path]:
    """The files whose bytes decide the model's outputs, in a stable order."""
    found = []
    for path in directory.rglob("*"):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix in WEIGHT_SUFFIXES or path.name in DECIDING_NAMES:
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def content_identity(directory: str | Path) -> ContentIdentity:
    """The identity of the model in `directory` (blocking: call it off the event loop)."""
    root = Path(directory)
    started = time.perf_counter()
    files = deciding_files(root)
    stamps = {p.relative_to(root).as_posix(): _stamp(p) for p in files}
    cached = _read_cache(root, stamps)
    if cached is not None:
        return cached
    total = hashlib.blake2b(b"mlxpool-identity-v1", digest_size=DIGEST_BYTES)
    tensors: dict[str, str] = {}
    tensor_bytes: dict[str, int] = {}
    hashed = 0
    for path in files:
        rel = path.relative_to(root).as_posix()
        with path.open("rb") as f:
            file_tensors = _safetensors_digests(f) if path.suffix == ".safetensors" else None
            if file_tensors is None:
                f.seek(0)
                digest = _digest_stream(f, None)
            else:
                digest = hashlib.blake2b(
                    json.dumps(sorted((k, v[0]) for k, v in file_tensors.items())).encode(),
                    digest_size=DIGEST_BYTES).hexdigest()
                for name, (tensor_digest, size) in file_tensors.items():
                    tensors[name] = tensor_digest
                    tensor_bytes[name] = size
        hashed += stamps[rel][0]
        total.update(json.dumps([rel, stamps[rel][0], digest]).encode())
    identity = ContentIdentity(total.hexdigest(), tensors, tensor_bytes, hashed,
                               round(time.perf_counter() - started, 4))
    _write_cache(root, stamps, identity)
    log.info("content identity computed path=%s identity=%s bytes=%d seconds=%.3f",
             root, identity.digest, hashed, identity.seconds)
    return identity


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _digest_stream(f: BinaryIO, length: int | None) -> str:
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    left = length
    while left is None or left > 0:
        chunk = f.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
        if not chunk:
            break
        digest.update(chunk)  # hashlib releases the GIL on large buffers
        if left is not None:
            left -= len(chunk)
    return digest.hexdigest()


def _safetensors_digests(f: BinaryIO) -> dict[str, tuple[str, int]] | None:
    """Tensor name -> (digest of dtype, shape and bytes; size); None: not a parsable safetensors file."""
    head = f.read(8)
    if len(head) != 8:
        return None
    (length,) = struct.unpack("<Q", head)
    if length > MAX_SAFETENSORS_HEADER:
        return None
    try:
        header = json.loads(f.read(length))
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    entries: list[tuple[int, int, str, Any]] = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return None
        entries.append((begin, end, name, meta))
    out: dict[str, tuple[str, int]] = {}
    base = 8 + length
    for begin, end, name, meta in sorted(entries, key=lambda e: e[0]):
        f.seek(base + begin)
        digest = hashlib.blake2b(json.dumps([meta.get("dtype"), meta.get("shape")]).encode(),
                                 digest_size=DIGEST_BYTES)
        digest.update(bytes.fromhex(_digest_stream(f, end - begin)))
        out[name] = (digest.hexdigest(), end - begin)
    return out


def _read_cache(root: Path, stamps: dict[str, tuple[int, int]]) -> ContentIdentity | None:
    try:
        data = json.loads((root / CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return None
    if data.get("files") != {k: list(v) for k, v in stamps.items()}:
        return None  # a file changed, appeared or went: hash again
    try:
        return ContentIdentity(str(data["identity"]), dict(data["tensors"]), dict(data["tensor_bytes"]))
    except (KeyError, TypeError, ValueError):
        return None


def _write_cache(root: Path, stamps: dict[str, tuple[int, int]], identity: ContentIdentity) -> None:
    body = json.dumps({"version": CACHE_VERSION, "identity": identity.digest,
                       "files": {k: list(v) for k, v in stamps.items()},
                       "tensors": identity.tensors, "tensor_bytes": identity.tensor_bytes})
    tmp = root / f"{CACHE_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, root / CACHE_FILE)
    except OSError as exc:  # a read-only model directory: fine, it is just not cached
        log.info("content identity not cached path=%s error=%s", root, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def combined(base: str, adapter: str) -> str:
    """The identity of a LoRA adapter served over a base: both contents, so an adapter's KV is
    never taken for its base's, nor one base's adapter for another's."""
    return hashlib.blake2b(f"lora\0{base}\0{adapter}".encode(), digest_size=DIGEST_BYTES).hexdigest()
