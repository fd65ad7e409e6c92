"""Load a model directory with mlx-lm: weights, tokenizer, and what we need to know.

Called on the engine thread (all MLX work of a model stays on one thread). Only local
directories are accepted: an agent never reaches out to a model hub on its own; the
ModelCache machinery puts files on disk first.

mlx-lm builds the model (its architecture classes, `sanitize`, quantization) exactly as
`mlx_lm.load` does; with `LoadOptions.native` the bytes come through the native weight
manager (`weightreading`) instead of `mx.load`: mlx-lm is asked for a lazy model (its
own lazily-read arrays are never evaluated, so never read) and the native arrays replace
them, strictly (a missing or extra tensor is an error). Pinning follows, then the log
line says how the bytes came (reader, copy or zero-copy, GB/s, pinned).
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_lm_utils
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxpool.agent.engine import blas as _blas
from mlxpool.agent.engine import densecopies, device, weightreading, wiredlimit
from mlxpool.agent.engine.interface import LoadOptions, LoadReport, ModelInfo
from mlxpool.agent.engine.memory import kv_bytes_per_token, prefill_shape
from mlxpool.agent.engine.tensorshare import TensorShare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    tokenizer: TokenizerWrapper
    info: ModelInfo
    vocab_size: int
    """Width of the model's output (may exceed the tokenizer's vocabulary: padded vocabs)."""
    weights: weightreading.Weights
    """The parameters' pin set and residency; `close()` it before dropping the model. Tensors
    taken from another model (`Sharing`) are not in it: that model's weights pin them."""
    shared: dict[str, int] = field(default_factory=dict)
    """Digest -> bytes of its tensors held in the node's tensor share (its own, or another's)."""
    unshared_bytes: int | None = None
    """Bytes of its weights that are not in the tensor share (None: no share: all of them)."""
    received_bytes: int = 0
    """Bytes of tensors it uses that another loaded model brought (not read into memory again)."""
    dense: densecopies.DenseCopies | None = None
    """Dense copies of its quantized linears (counted in `info.memory_bytes`), if made."""


@dataclass(frozen=True)
class Sharing:
    """Where a load looks for tensors another loaded model holds (`engine.tensorshare`)."""

    share: TensorShare
    model: str
    """The name the model is loaded under (its holder name in the share)."""
    digests: Mapping[str, str]
    """Safetensors tensor name -> digest of its bytes (the content identity's `tensors`)."""


def check_model_dir(path: str | Path) -> Path:
    """The resolved directory, or ValueError naming what is missing."""
    directory = Path(path).expanduser().resolve()
    if not directory.is_dir():
        raise ValueError(f"model path {str(path)!r} is not a directory")
    if not (directory / "config.json").is_file():
        raise ValueError(f"model path {str(path)!r} has no config.json")
    return directory


def load(path: str | Path, options: LoadOptions | None = None, host_memory: bool | None = None,
         sharing: Sharing | None = None) -> LoadedModel:
    """`host_memory`: whether the weights live in host pages (None: as the device says,
    `device.weights_in_host_memory`). Where they do not (CUDA), mlx-lm's reader puts them
    straight into device memory (through a transient host buffer per tensor) and nothing
    views or pins them: the native reader's copy goes through host pages, which would
    leave the model in managed memory, counted in RSS. `sharing`: tensors equal to one
    another loaded model holds are that model's array, not a second copy (`share_tensors`)."""
    options = options or LoadOptions()
    directory = check_model_dir(path)
    started = time.perf_counter()
    if host_memory is None:
        host_memory = device.weights_in_host_memory(device.accelerator().kind)
    if options.native and host_memory:
        model, tokenizer, config, report = _load_native(directory, options)
    else:
        model, tokenizer, config, report = _load_mlx(directory, options)
    parameters = dict(cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters())))
    received: set[str] = set()
    registered: set[str] = set()
    if sharing is not None:
        received, registered = share_tensors(model, parameters, sharing)
    own = {k: a for k, a in parameters.items() if k not in received}
    weights = weightreading.Weights(own, report, host_views=host_memory)
    if options.pin_policy != "none":
        report = weights.pin(options.pin_policy, options.pin_budget_bytes)
    memory = weights.total_bytes
    dense = _dense_copies(model, options)
    if dense is not None:
        memory += dense.bytes
    wired = wiredlimit.raise_wired_limit(memory)  # Metal only (not run here)
    if wired is not None:
        log.info("metal %s", wired)
    info = ModelInfo(path=str(directory), memory_bytes=memory, context_length=_context_length(config),
                     kv_bytes_per_token=_kv_bytes_per_token(config, parameters), weights=weights,
                     prefill=prefill_shape(config, _itemsize(parameters)))
    log.info(
        "model loaded path=%s memory_bytes=%d context_length=%s seconds=%.2f reader=%s transfer=%s files=%d "
        "read_seconds=%.3f load_gbps=%.2f prefetch_threads=%d pin_policy=%s pinned_bytes=%d dense_copy_bytes=%d "
        "blas=%s device=%s",
        directory, memory, info.context_length, time.perf_counter() - started, report.reader, report.transfer,
        report.files, report.seconds, report.gbps, report.prefetch_threads, report.pin_policy, report.pinned_bytes,
        dense.bytes if dense else 0, _blas.preloaded or "bundled", mx.default_device(),
    )
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or len(tokenizer)
    if sharing is None:
        return LoadedModel(model, tokenizer, info, int(vocab), weights, dense=dense)
    received_bytes = sum(parameters[k].nbytes for k in received)
    unshared = sum(a.nbytes for k, a in parameters.items() if k not in registered)
    if received:
        log.info("tensors shared path=%s model=%s tensors=%d shared_bytes=%d own_bytes=%d", directory, sharing.model,
                 len(received), received_bytes, memory)
    return LoadedModel(model, tokenizer, info, int(vocab), weights, sharing.share.held_by(sharing.model),
                       unshared, received_bytes, dense)


def share_tensors(model: nn.Module, parameters: dict[str, mx.array], sharing: Sharing) -> tuple[set[str], set[str]]:
    """Put `model`'s tensors into the node's tensor share: each one whose file digest another
    loaded model holds, with equal shape, dtype and values, becomes that model's array (the
    copy just read is dropped); the others are offered as this model's own. Returns (the
    names taken from another model, the names held in the share either way)."""
    taken: dict[str, mx.array] = {}
    registered: set[str] = set()
    share, me = sharing.share, sharing.model
    for name, array in parameters.items():
        digest = sharing.digests.get(name)
        if digest is None:
            continue  # not a file tensor under this name (sanitize made it): never shared
        other = share.candidate(me, digest)
        # Same file bytes need not mean the same array (sanitize may change it): compare values.
        if (other is not None and other.shape == array.shape and other.dtype == array.dtype
                and bool(mx.array_equal(other, array).item()) and share.join(me, digest, other)):
            taken[name] = other
            registered.add(name)
        elif share.offer(me, digest, array, array.nbytes):
            registered.add(name)
    if taken:
        model.load_weights(list(taken.items()), strict=False)
        parameters.update(taken)
        # The copies just read are dropped: give their buffers back to the OS now, or MLX's
        # buffer cache, then glibc's arenas, keep them resident (an agent measured +93 MB of
        # RSS for a fine-tune adding 10.5 MB; +101 MB with sharing off).
        mx.clear_cache()
        _trim_heap()
    return set(taken), registered


def _dense_copies(model: nn.Module, options: LoadOptions) -> densecopies.DenseCopies | None:
    """The copies, where the policy, the device and their size say so (`densecopies.wanted`)."""
    accelerator = device.accelerator()
    if not densecopies.wanted(options.dense_copies, accelerator.kind, accelerator.memory_bytes,
                              densecopies.dense_bytes(model)):
        return None
    return densecopies.attach(model)


ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")


def check_adapter_dir(path: str | Path) -> Path:
    """The resolved adapter directory (mlx-lm's format), or ValueError naming what is missing."""
    directory = Path(path).expanduser().resolve()
    if not directory.is_dir():
        raise ValueError(f"adapter path {str(path)!r} is not a directory")
    for name in ADAPTER_FILES:
        if not (directory / name).is_file():
            raise ValueError(f"adapter path {str(path)!r} has no {name} (not an mlx-lm adapter)")
    return directory


def load_adapter(base: LoadedModel, path: str | Path, options: LoadOptions | None = None) -> LoadedModel:
    """A LoRA adapter over `base`'s weights, which it shares: a second instance of the base's
    architecture whose parameters are `base`'s own arrays (no byte read or copied; mlx-lm's
    lazy load of the base files is never evaluated), with mlx-lm's LoRA layers
    (`tuner.utils.load_adapters`) over them. Only the adapter's tensors are new memory: they
    are what its `weights` and `memory_bytes` count. mlx_lm.server, given another adapter,
    reloads the base."""
    from mlx_lm.tuner.utils import load_adapters

    options = options or LoadOptions()
    directory = check_adapter_dir(path)
    base_dir = Path(base.info.path)
    started = time.perf_counter()
    model, config = cast("tuple[nn.Module, dict[str, Any]]", mlx_lm_utils.load_model(base_dir, lazy=True))
    shared = cast("list[tuple[str, mx.array]]", tree_flatten(base.model.parameters()))
    model.load_weights(shared, strict=True)
    base_ids = {id(a) for _, a in shared}
    model = load_adapters(model, str(directory))
    model.eval()
    own = {k: a for k, a in cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))
           if id(a) not in base_ids}
    mx.eval(list(own.values()))
    tokenizer = mlx_lm_utils.load_tokenizer(base_dir, eos_token_ids=config.get("eos_token_id"))
    file = directory / "adapters.safetensors"
    report = LoadReport(reader="mlx", transfer="copy", files=1, bytes=file.stat().st_size,
                        seconds=time.perf_counter() - started, prefetch_threads=0,
                        pin_policy=options.pin_policy, pinned_bytes=0)
    weights = weightreading.Weights(own, report, host_views=device.weights_in_host_memory(device.accelerator().kind))
    info = ModelInfo(path=str(directory), memory_bytes=weights.total_bytes, context_length=base.info.context_length,
                     kv_bytes_per_token=base.info.kv_bytes_per_token, weights=weights, prefill=base.info.prefill)
    log.info("adapter loaded path=%s base=%s adapter_bytes=%d shared_base_bytes=%d seconds=%.3f", directory,
             base_dir, weights.total_bytes, base.weights.total_bytes, time.perf_counter() - started)
    return LoadedModel(model, tokenizer, info, base.vocab_size, weights)


def _trim_heap() -> None:
    """glibc's `malloc_trim(0)`: free pages inside its arenas go back to the OS (freed buffers
    below its mmap threshold otherwise stay resident). Elsewhere (macOS, musl): nothing."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if _libc is not False and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


_libc: Any = None

_Loaded = tuple[nn.Module, TokenizerWrapper, dict[str, Any], LoadReport]


def _load_native(directory: Path, options: LoadOptions) -> _Loaded:
    # The architecture, sanitize and quantization are mlx-lm's; lazy=True leaves its own
    # (lazily read) weights unevaluated, so the files are read once, by the native path.
    arrays, report = weightreading.read(directory, options)  # first: its errors name file and offset
    model, config = cast("tuple[nn.Module, dict[str, Any]]", mlx_lm_utils.load_model(directory, lazy=True))
    if hasattr(model, "sanitize"):
        arrays = model.sanitize(arrays)
    model.load_weights(list(arrays.items()), strict=True)
    mx.eval(model.parameters())  # a no-op unless sanitize computed new arrays
    model.eval()
    tokenizer = mlx_lm_utils.load_tokenizer(directory, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config, report


def _load_mlx(directory: Path, options: LoadOptions) -> _Loaded:
    started = time.perf_counter()
    # mlx-lm types both of these for all their call forms: with `return_config` it returns three items.
    model, tokenizer, config = cast("tuple[nn.Module, TokenizerWrapper, dict[str, Any]]",
                                    mlx_lm.load(str(directory), return_config=True))
    files = weightreading.weight_files(directory)
    report = LoadReport(reader="mlx", transfer="copy", files=len(files), bytes=sum(f.stat().st_size for f in files),
                        seconds=time.perf_counter() - started, prefetch_threads=0,
                        pin_policy=options.pin_policy, pinned_bytes=0)
    return model, tokenizer, config, report


def _itemsize(parameters: dict[str, mx.array]) -> int:
    # The KV cache and activations take the dtype the model computes in: that of its floating weights.
    floating = [a.dtype for a in parameters.values() if mx.issubdtype(a.dtype, mx.floating)]
    return floating[0].size if floating else 2


def _kv_bytes_per_token(config: dict[str, Any], parameters: dict[str, mx.array]) -> int | None:
    itemsize = _itemsize(parameters)
    try:
        return kv_bytes_per_token(config, itemsize)
    except ValueError:
        return None  # an architecture whose config we cannot size: no memory admission for it


def _context_length(config: dict[str, Any]) -> int | None:
    for key in ("max_position_embeddings", "max_sequence_length", "n_ctx", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
