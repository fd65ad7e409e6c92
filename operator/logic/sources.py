"""Where an agent gets a pool model it does not serve yet: pure, no I/O.

A pool model is resolved in this order (documented in the CRD and the README):
1. a `ModelCache` in the pool's namespace whose model name (`spec.model`, else its
   own name) is the pool model's name: the agent loads the staged copy (`cache_key`).
   The ModelCache decides where the bytes are staged; a pool only loads the model on
   nodes that already hold a ready copy (data placement and serving placement stay
   separate, like a PersistentVolume and the Pod that mounts it);
2. else the pool model's `source`: `file://PATH` is loaded from that directory on the
   node; `http(s)://` and `hf://` are staged by the operator on the chosen node under
   a key derived from the source, then loaded from that copy;
3. else nothing: only nodes that already serve the model (an agent started with
   `--model`) can serve it.

A LoRA adapter (`spec.models[].base`) resolves the same way (its files are the adapter's);
its load names the base, and `assignments.plan` asks for it only once the base is ready
on that node.

Cache keys follow `mlxpool.agentapi.CACHE_KEY_PATTERN`; a ModelCache's key changes
when its bytes do (source, revision or digests), never for warm/pin.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from mlxpool.agentapi import LoadModelRequest, StageRequest
from mlxpool.operator.logic.specs import CacheSpec, ModelRef

MAX_KEY = 253


@dataclass(frozen=True)
class CacheRef:
    """A ModelCache as pools see it (kept in the operator's registry of caches)."""

    namespace: str
    name: str
    model: str
    key: str
    pin: bool = False
    bytes: int | None = None
    """Size of the staged copy, from the cache's status (a size estimate for placement)."""

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> CacheRef:
        meta = body["metadata"]
        spec = CacheSpec.from_body(body)
        sizes = [n.get("bytes") for n in (body.get("status") or {}).get("nodes") or [] if n.get("bytes")]
        return cls(namespace=meta["namespace"], name=meta["name"], model=spec.model_name(meta["name"]),
                   key=cache_key(meta["namespace"], meta["name"], spec), pin=spec.pin,
                   bytes=max(sizes) if sizes else None)


@dataclass(frozen=True)
class LoadSource:
    """How to load one model on a node that does not serve it."""

    origin: str
    """Said in messages: `ModelCache ns/name` or `spec.models[].source`."""
    path: str | None = None
    cache_key: str | None = None
    stage: StageRequest | None = None
    """Set when the operator stages the copy itself (a pool source); None for a ModelCache,
    which stages on its own nodes."""
    pin: bool = False
    base: str | None = None
    """A LoRA adapter's base model (`spec.models[].base`): loaded over it, once it is ready
    on the node."""

    def request(self, model: str) -> LoadModelRequest:
        return LoadModelRequest(name=model, path=self.path, cache_key=self.cache_key, warm=True, pin=self.pin,
                                base=self.base)


def cache_key(namespace: str, name: str, spec: CacheSpec) -> str:
    """`<namespace>.<name>.<content id>`, hashed when that would be too long."""
    content = spec.content_id()[:12]
    key = f"{namespace}.{name}.{content}"
    if len(key) <= MAX_KEY:
        return key
    return f"mc-{hashlib.sha256(f'{namespace}/{name}'.encode()).hexdigest()[:24]}.{content}"


def source_key(source: str) -> str:
    """The cache key of a copy staged for a pool model's source."""
    return f"src-{hashlib.sha256(source.encode()).hexdigest()[:24]}"


def file_path(source: str) -> str:
    """`file:///a/b%20c` -> `/a/b c`; ValueError for a file URL naming another host."""
    parsed = urlparse(source)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{source}: a file:// source names a path on the node itself, not host {parsed.netloc!r}")
    return unquote(parsed.path)


def resolve(models: Sequence[ModelRef], caches: Mapping[str, CacheRef]) -> dict[str, LoadSource | None]:
    """Each pool model's load source; `caches` are the namespace's ModelCaches by model name."""
    resolved: dict[str, LoadSource | None] = {}
    for model in models:
        cache = caches.get(model.name)
        if cache is not None:
            resolved[model.name] = LoadSource(origin=f"ModelCache {cache.namespace}/{cache.name}",
                                              cache_key=cache.key, pin=cache.pin, base=model.base)
        elif model.source is None:
            resolved[model.name] = None
        elif model.source.startswith("file://"):
            try:
                resolved[model.name] = LoadSource(origin="spec.models[].source", path=file_path(model.source),
                                                  base=model.base)
            except ValueError:
                resolved[model.name] = None
        else:
            resolved[model.name] = LoadSource(origin="spec.models[].source", cache_key=source_key(model.source),
                                              stage=StageRequest(source=model.source), base=model.base)
    return resolved
