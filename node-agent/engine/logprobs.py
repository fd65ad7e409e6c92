"""Log-probabilities of generated tokens, read for a whole decode step at once.

mlx-lm's batch generator hands back, per sequence and step, the full row of
log-probabilities the token was sampled from. Reading one value per sequence would
synchronize once per sequence; `read` stacks the rows of every sequence that asked
for log-probabilities and does one gather (and one top-n partition) for all of them.
Token texts are decoded once per token id and remembered.

Engine thread only (imports MLX).
"""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx

from mlxpool.agent.engine import blas as _blas  # noqa: F401  (must precede mlx)
from mlxpool.agent.engine.interface import TokenLogprob

_MAX_TEXTS = 65536


class LogprobReader:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            if len(self._texts) >= _MAX_TEXTS:
                self._texts.clear()
            text = self._texts[token_id] = self._tokenizer.decode([token_id])
        return text

    def read(self, rows: list[mx.array], tokens: list[int], top_n: list[int]) -> list[TokenLogprob]:
        """For each sequence: its chosen token's log-probability and its `top_n` best alternatives."""
        stacked = mx.stack(rows)
        chosen = mx.take_along_axis(stacked, mx.array(tokens)[:, None], axis=-1)[:, 0]
        k = min(max(top_n), stacked.shape[-1])
        top_ids: list[list[int]] = [[] for _ in tokens]
        top_values: list[list[float]] = [[] for _ in tokens]
        if k > 0:
            candidates = mx.argpartition(-stacked, kth=k - 1, axis=-1)[:, :k]
            values = mx.take_along_axis(stacked, candidates, axis=-1)
            order = mx.argsort(-values, axis=-1)
            # `tolist()` is typed for any rank; of these 2-D arrays it is a list of rows.
            top_ids = cast("list[list[int]]", mx.take_along_axis(candidates, order, axis=-1).tolist())
            top_values = cast("list[list[float]]", mx.take_along_axis(values, order, axis=-1).tolist())
        text = self.token_text
        return [
            TokenLogprob(
                token=text(token), logprob=logprob,
                top=tuple((text(i), v) for i, v in zip(ids[:n], vals[:n], strict=True)),
            )
            for token, logprob, n, ids, vals in zip(tokens, cast("list[float]", chosen.tolist()), top_n, top_ids,
                                                    top_values, strict=True)
        ]
