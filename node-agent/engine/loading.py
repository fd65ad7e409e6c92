"""Load a model directory with mlx-lm: weights, tokenizer, and what we need to know.

Called on the engine thread (all MLX work of a model stays on one thread). Only local
directories are accepted: an agent never reaches out to a model hub on its own; the
ModelCache machinery puts files on disk first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxpool.agent.engine import blas as _blas
from mlxpool.agent.engine.interface import ModelInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    tokenizer: TokenizerWrapper
    info: ModelInfo
    vocab_size: int
    """Width of the model's output (may exceed the tokenizer's vocabulary: padded vocabs)."""


def check_model_dir(path: str | Path) -> Path:
    """The resolved directory, or ValueError naming what is missing."""
    directory = Path(path).expanduser().resolve()
    if not directory.is_dir():
        raise ValueError(f"model path {str(path)!r} is not a directory")
    if not (directory / "config.json").is_file():
        raise ValueError(f"model path {str(path)!r} has no config.json")
    return directory


def load(path: str | Path) -> LoadedModel:
    directory = check_model_dir(path)
    started = time.perf_counter()
    # mlx-lm types both of these for all their call forms: with `return_config` it returns
    # three items, and `tree_flatten` without a destination returns (path, array) pairs.
    model, tokenizer, config = cast("tuple[nn.Module, TokenizerWrapper, dict[str, Any]]",
                                    mlx_lm.load(str(directory), return_config=True))
    memory = sum(v.nbytes for _, v in cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters())))
    info = ModelInfo(path=str(directory), memory_bytes=memory, context_length=_context_length(config))
    log.info(
        "model loaded path=%s memory_bytes=%d context_length=%s seconds=%.2f blas=%s device=%s",
        directory, memory, info.context_length, time.perf_counter() - started,
        _blas.preloaded or "bundled", mx.default_device(),
    )
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or len(tokenizer)
    return LoadedModel(model, tokenizer, info, int(vocab))


def _context_length(config: dict[str, Any]) -> int | None:
    for key in ("max_position_embeddings", "max_sequence_length", "n_ctx", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
