"""Turn a completion prompt or a chat conversation into the model's prompt tokens.

Chat uses the tokenizer's own chat template (mlx-lm's `TokenizerWrapper.
apply_chat_template`). A tokenizer without a template gets a plain fallback, one line
per message then the assistant's cue:

    system: You are terse.
    user: Hello
    assistant:

Tokenizing is CPU work, so it runs off the event loop, on one dedicated thread: Hugging
Face fast tokenizers are not safe to call from several threads at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol


class PromptError(ValueError):
    """The prompt cannot be encoded (e.g. the chat template rejects the conversation)."""


class Tokenizer(Protocol):
    """The part of mlx-lm's TokenizerWrapper this module needs."""

    has_chat_template: bool

    def __len__(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> list[int]: ...


def fallback_chat_text(messages: Sequence[dict[str, str]]) -> str:
    """The documented plain format for tokenizers without a chat template."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


class PromptEncoder:
    """Encodes prompts for one model; `close()` stops its thread."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    async def encode_text(self, text: str) -> list[int]:
        return await self._run(self._tokenizer.encode, text)

    async def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return await self._run(self.encode_chat_sync, messages)

    def encode_chat_sync(self, messages: Sequence[dict[str, str]]) -> list[int]:
        if not self._tokenizer.has_chat_template:
            return self._tokenizer.encode(fallback_chat_text(messages))
        try:
            return list(self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True))
        except Exception as exc:  # jinja raises its own errors for conversations it rejects
            raise PromptError(f"the model's chat template rejected the messages: {exc}") from exc

    async def _run(self, fn: Any, arg: Any) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, arg)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
