"""A prompt's KV cache as bytes and back: what agents share through Redis.

The format is a small JSON header (tokens, per layer the shape and dtype of keys and
values) behind a 4-byte length, then the raw array bytes in header order. Raw bytes,
not numpy's or pickle's formats: nothing executable is ever loaded from the shared
store, and bfloat16 (which numpy lacks) travels as its 16-bit pattern. Only plain
key/value caches (mlx-lm's `KVCache`, what the batch hands back per layer) are
encoded; anything else (rotating or quantized caches) is refused, and the caller
simply does not share it.

Engine thread only (imports MLX).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from mlxpool.agent.engine import blas as _blas  # noqa: F401  (must precede mlx)

FORMAT = "mlxpool-kv/1"
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_CARRIERS = {"float32": (mx.float32, np.float32), "float16": (mx.float16, np.float16),
             "bfloat16": (mx.uint16, np.uint16)}  # bfloat16 as its bit pattern


class KVCodecError(ValueError):
    """The cache cannot be encoded, or the bytes are not an encoded cache."""


def encode(layers: Sequence[Any], tokens: int) -> bytes:
    """The first `tokens` positions of every layer's keys and values, as bytes."""
    header: dict[str, Any] = {"format": FORMAT, "tokens": tokens, "layers": []}
    chunks: list[bytes] = []
    for layer in layers:
        if type(layer) is not KVCache or layer.keys is None or layer.values is None:
            raise KVCodecError(f"cannot share a {type(layer).__name__}")
        if layer.offset < tokens:
            raise KVCodecError(f"the cache holds {layer.offset} tokens, not {tokens}")
        entry = []
        for array in (layer.keys[..., :tokens, :], layer.values[..., :tokens, :]):
            name = str(array.dtype).removeprefix("mlx.core.")
            if name not in _CARRIERS:
                raise KVCodecError(f"cannot share {name} arrays")
            carrier, _ = _CARRIERS[name]
            raw = np.array(array.view(carrier) if carrier != array.dtype else array)
            entry.append({"shape": list(array.shape), "dtype": name})
            chunks.append(raw.tobytes())
        header["layers"].append(entry)
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([struct.pack(">I", len(head)), head, *chunks])


def decode(blob: bytes, tokens: int | None = None) -> list[KVCache]:
    """Per layer a fresh `KVCache` holding the encoded positions (the first `tokens` of them)."""
    try:
        (size,) = struct.unpack_from(">I", blob)
        header = json.loads(blob[4:4 + size])
        if header.get("format") != FORMAT:
            raise KVCodecError(f"not a {FORMAT} blob")
        held = int(header["tokens"])
        keep = held if tokens is None else tokens
        if not 0 < keep <= held:
            raise KVCodecError(f"asked for {keep} of the {held} tokens encoded")
        offset, caches = 4 + size, []
        for entry in header["layers"]:
            arrays = []
            for spec in entry:
                carrier, np_type = _CARRIERS[spec["dtype"]]
                count = int(np.prod(spec["shape"]))
                raw = np.frombuffer(blob, dtype=np_type, count=count, offset=offset).reshape(spec["shape"])
                offset += raw.nbytes
                array = mx.array(np.ascontiguousarray(raw[..., :keep, :]))
                if carrier != _DTYPES[spec["dtype"]]:
                    array = array.view(_DTYPES[spec["dtype"]])
                arrays.append(array)
            cache = KVCache()
            cache.state = (arrays[0], arrays[1], keep)
            caches.append(cache)
    except KVCodecError:
        raise
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise KVCodecError(f"not an encoded KV cache: {exc}") from exc
    if offset != len(blob):
        raise KVCodecError(f"{len(blob) - offset} trailing bytes")
    mx.eval([(c.keys, c.values) for c in caches])
    return caches
