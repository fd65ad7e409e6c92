"""Tokenizing in two lanes, so that one long prompt cannot stall the short ones.

`engine.prompts.PromptEncoder` tokenizes on one dedicated thread per model (Hugging Face
fast tokenizers are not safe to call from several threads at once). A prompt of the
maximum size (`limits.max_prompt_chars`, 1,000,000 characters) takes seconds there (2.0 s
for a million random CJK characters on the shared 2-core machine), and every request of
the model queued behind it: a normal request waited 3.9-4.9 s behind three of them.

`LanedPromptEncoder` keeps short prompts on that thread and sends prompts of at least
`long_chars` characters (text, or the total content of a conversation) to a second
thread with a tokenizer of its own, a deep copy made there on the first long prompt (so
neither the model's load nor the event loop pays for it, and a model never sent a long
prompt never holds the copy). Long prompts wait for one another, bounded by the prompt
limit; short prompts wait only for short ones. The fast tokenizers release the GIL while
they encode, so the two lanes really run at once. If the tokenizer cannot be copied, long
prompts fall back to the short lane (the old behaviour), logged once.

What this does not do: split one long prompt, or bound how many long prompts may wait
(each one's body is already bounded by `limits.max_body_bytes`).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from mlxpool.agent.engine.prompts import PromptEncoder, Tokenizer

log = logging.getLogger(__name__)

LONG_PROMPT_CHARS = 16_384
"""From this many characters a prompt goes to the long lane: ~10-30 ms of tokenizing
here, so a short prompt waits at most a few of those."""


class LanedPromptEncoder(PromptEncoder):
    """A `PromptEncoder` whose long prompts run on a lane (thread and tokenizer) of their own."""

    def __init__(self, tokenizer: Tokenizer, *, long_chars: int = LONG_PROMPT_CHARS) -> None:
        super().__init__(tokenizer)
        self.long_chars = long_chars
        self._source = tokenizer
        self._long_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer-long")
        self._long: tuple[Tokenizer, PromptEncoder] | None = None
        """The copy and an encoder over it (for its chat template); touched only on the long lane's thread."""
        self._copy_failed = False

    async def encode_text(self, text: str) -> list[int]:
        if len(text) < self.long_chars or self._copy_failed:
            return await super().encode_text(text)
        return await self._on_long_lane(lambda lane: lane[0].encode(text), text)

    async def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        if sum(len(m.get("content") or "") for m in messages) < self.long_chars or self._copy_failed:
            return await super().encode_chat(messages)
        return await self._on_long_lane(lambda lane: lane[1].encode_chat_sync(messages), messages)

    async def _on_long_lane(self, fn: Callable[[tuple[Tokenizer, PromptEncoder]], list[int]],
                            arg: str | Sequence[dict[str, str]]) -> list[int]:
        def run() -> list[int] | None:
            lane = self._long_lane()
            return None if lane is None else fn(lane)

        tokens = await asyncio.get_running_loop().run_in_executor(self._long_executor, run)
        if tokens is not None:
            return tokens
        if isinstance(arg, str):  # no copy: the short lane, as before
            return await super().encode_text(arg)
        return await super().encode_chat(arg)

    def _long_lane(self) -> tuple[Tokenizer, PromptEncoder] | None:
        if self._long is None and not self._copy_failed:
            try:
                tokenizer = copy.deepcopy(self._source)
                self._long = (tokenizer, PromptEncoder(tokenizer))  # its executor never starts a thread
            except Exception as exc:  # a tokenizer that cannot be copied keeps the one lane
                self._copy_failed = True
                log.warning("tokenizer cannot be copied, long prompts share the one tokenizer thread: %s", exc)
        return self._long

    def close(self) -> None:
        super().close()
        self._long_executor.shutdown(wait=False, cancel_futures=True)
