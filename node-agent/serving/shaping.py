"""Token events into OpenAI shapes: log-probabilities, and stream chunks made cheaply.

A streamed response sends one small JSON object per token. Most of them differ from
the previous one only in the text, so `ChunkTemplate` renders the request's chunk
once through the pydantic model with a placeholder for the text and afterwards only
splices in the JSON-escaped text: same bytes on the wire as the model would give,
for a fraction of the work per token. Chunks that carry more (a finish reason,
log-probabilities, usage) go through the pydantic models as usual.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from pydantic import BaseModel

from mlxpool.agent.engine.interface import TokenLogprob
from mlxpool.agent.serving import openai as api

_PLACEHOLDER = "\x00mlxpool-text\x00"


class ChunkTemplate:
    """Renders `make(text)` for any text by splicing into one pre-rendered chunk."""

    def __init__(self, make: Callable[[str], BaseModel]) -> None:
        rendered = make(_PLACEHOLDER).model_dump_json()
        quoted = json.dumps(_PLACEHOLDER)
        if rendered.count(quoted) != 1:  # pragma: no cover - guards a change in pydantic's escaping
            raise ValueError("the chunk template must contain the placeholder exactly once")
        self._prefix, self._suffix = rendered.split(quoted)

    def render(self, text: str) -> str:
        return self._prefix + json.dumps(text, ensure_ascii=False) + self._suffix


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> api.CompletionLogprobs:
    """The completions shape; `offset` is the text length before the first token."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return api.CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[dict(e.top) for e in entries] if any(e.top for e in entries) else None,
        text_offset=offsets,
    )


def chat_logprobs(entries: Sequence[TokenLogprob]) -> api.ChatLogprobs:
    return api.ChatLogprobs(content=[
        api.TokenLogprobEntry(
            token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
            top_logprobs=[api.TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in e.top],
        )
        for e in entries
    ])
