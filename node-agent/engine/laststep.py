"""No forward pass after the last token: mlx-lm's decode step, less the step nobody reads.

mlx-lm samples one token ahead (`GenerationBatch._step`): the step that returns token N
first launches the forward pass over N (which computes N+1), then waits for N. When every
sequence of the batch ends with N by length (`max_tokens`), that forward pass is wasted:
its token is never delivered, and its work delays N. On MLX's CPU backend the launch does
not even overlap (`mx.async_eval` blocks while more than a few tasks are queued), so N
waits for the whole pass: a 1-token completion took three forward passes (prompt, first
token, the wasted one) where two give the same token; measured on the 1.72 GB bench model
on the shared 2-core CPU, ~200 ms of its ~620 ms time to first token. On Metal the pass
overlaps the wait but still takes the GPU from the next request.

`install` wraps `GenerationBatch._step` once per process: when every sequence's next token
is its last by length, it evaluates and returns that token without launching a pass. The
KV then does not hold the last token, so it is left out of the batch's `tokens` (what a
finished sequence's `all_tokens` reports beside its cache, e.g. to the prefix cache):
tokens and cache agree, as they do when mlx-lm's pass runs. Any other step is mlx-lm's.

Written against mlx-lm 0.32 (the private `_step` and the batch's `_current_tokens`,
`_next_tokens`, `_num_tokens`, `max_tokens`, `uids`). Where a later mlx-lm lacks any of
them, `install` logs one warning and leaves mlx-lm as it is (correct, one pass slower).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch

from mlxpool.agent.engine import blas as _blas  # noqa: F401  (must precede mlx)

log = logging.getLogger(__name__)

_INSTALLED = "_mlxpool_last_step"
BATCH_ATTRIBUTES = ("uids", "max_tokens", "_num_tokens", "_current_tokens", "_next_tokens",
                    "_current_logprobs", "_next_logprobs")
"""What the wrapped step reads and writes on a `GenerationBatch` (mlx-lm 0.32)."""


def install(batch_class: Any = GenerationBatch) -> bool:
    """Wrap `batch_class._step` (idempotent); False, with one warning, when the class does
    not look like the mlx-lm it was written for (then it is left untouched)."""
    if getattr(batch_class, _INSTALLED, False):
        return True
    missing = [name for name in ("_step", *BATCH_ATTRIBUTES) if not _declares(batch_class, name)]
    if missing:
        log.warning("mlx-lm's %s lacks %s: the pass after a batch's last token is kept (engine.laststep off)",
                    getattr(batch_class, "__name__", batch_class), ", ".join(missing))
        return False
    original = batch_class._step

    def _step(self: Any) -> tuple[list[int], list[mx.array]]:
        if not ends_by_length(self):
            return original(self)
        self._current_tokens = self._next_tokens
        self._current_logprobs = self._next_logprobs
        inputs = self._current_tokens
        mx.eval(inputs, self._current_logprobs)
        return inputs.tolist(), self._current_logprobs

    batch_class._step = _step
    setattr(batch_class, _INSTALLED, True)
    return True


def _declares(batch_class: Any, name: str) -> bool:
    """`name` is an attribute of the class, or one its source assigns to `self` (mlx-lm sets
    the batch's state in `__init__`, invisible on the class itself)."""
    if hasattr(batch_class, name):
        return True
    try:
        source = inspect.getsource(batch_class)
    except (OSError, TypeError):
        return False
    return f"self.{name} =" in source


def ends_by_length(batch: Any) -> bool:
    """Every sequence of `batch` gets its last token (by `max_tokens`) from this step; False
    for the step a batch takes when it is made (its input is the prompt's last token, not a
    sampled one: `_current_tokens` is None then) and for an empty batch."""
    if not batch.uids or batch._current_tokens is None or batch._next_tokens is None:
        return False
    return all(n + 1 >= m for n, m in zip(batch._num_tokens, batch.max_tokens, strict=True))
