"""One copy of a tensor that several loaded models have in common (a fine-tune and its base).

A fine-tune that changed a few layers shares most of its tensors, byte for byte, with its
base; two checkpoints of a run whose embeddings were frozen share those. The content
identity already holds a digest of every safetensors tensor's bytes
(`operations.identity`); at a load (`loading.load`, on the engine thread) each parameter
whose file tensor's digest is held here by another loaded model, with the same shape and
dtype and equal values (`mx.array_equal`, since mlx-lm's `sanitize` may change a tensor),
is replaced by that model's array: one copy in memory, whichever models use it. The new
model's own `Weights` (its pinning, residency and `memory_bytes`) leave such a tensor out;
the memory books count it once under its digest, for as long as any model holds it
(`MemoryBooks.add_weights(..., shared=...)`), so unloading the model that brought it
first keeps the books true while another still holds it.

Tensors are shared across models only: two equal tensors inside one model stay two.
What this never shares is KV state: that goes by the models' content identities, which
differ whenever one byte of their weights does.

MLX-free (the arrays are held as opaque objects); thread-safe (engine threads load at once).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Held:
    array: Any
    nbytes: int
    holders: set[str] = field(default_factory=set)


class TensorShare:
    """Content digest -> the one array loaded for it, with the models holding it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._by_model: dict[str, set[str]] = {}

    def candidate(self, model: str, digest: str) -> Any | None:
        """The array another model holds for `digest` (None: none, or only `model` itself)."""
        with self._lock:
            held = self._held.get(digest)
            if held is None or not (held.holders - {model}):
                return None
            return held.array

    def join(self, model: str, digest: str, array: Any) -> bool:
        """`model` uses the held `array` for `digest` (from `candidate`, found equal); False if
        it is no longer held (its models went meanwhile: then `offer` the model's own)."""
        with self._lock:
            held = self._held.get(digest)
            if held is None or held.array is not array or model in held.holders:
                return False  # gone, or `model` holds it already (for another of its tensors)
            held.holders.add(model)
            self._by_model.setdefault(model, set()).add(digest)
            return True

    def offer(self, model: str, digest: str, array: Any, nbytes: int) -> bool:
        """Hold `model`'s own `array` for `digest` when none is held (False: one is, and this
        one stays the model's alone)."""
        with self._lock:
            if digest in self._held:
                return False
            self._held[digest] = _Held(array, nbytes, {model})
            self._by_model.setdefault(model, set()).add(digest)
            return True

    def release(self, model: str) -> None:
        """`model` is dropped from memory: a tensor nobody else holds is let go."""
        with self._lock:
            for digest in self._by_model.pop(model, set()):
                held = self._held.get(digest)
                if held is None:
                    continue
                held.holders.discard(model)
                if not held.holders:
                    del self._held[digest]

    def held_by(self, model: str) -> dict[str, int]:
        """Digest -> bytes of every tensor `model` holds here (its own offered, or joined)."""
        with self._lock:
            return {d: self._held[d].nbytes for d in self._by_model.get(model, ()) if d in self._held}

    def shared_bytes(self, model: str) -> int:
        """Bytes of `model`'s tensors that another loaded model holds too."""
        with self._lock:
            return sum(self._held[d].nbytes for d in self._by_model.get(model, ())
                       if d in self._held and len(self._held[d].holders) > 1)

    @property
    def saved_bytes(self) -> int:
        """Bytes not in memory thanks to sharing: each shared tensor once per extra holder."""
        with self._lock:
            return sum(h.nbytes * (len(h.holders) - 1) for h in self._held.values())

    @property
    def held_bytes(self) -> int:
        """Bytes of every tensor held here, each once."""
        with self._lock:
            return sum(h.nbytes for h in self._held.values())
