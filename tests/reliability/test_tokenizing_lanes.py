"""Tokenizing lanes (`serving.tokenizing`): a long prompt never holds up a short one.

Pure unit tests: a fake tokenizer whose encode of a long text blocks on an event until the
test releases it, so the order is proven by events, not by timing. With the one tokenizer
thread of `PromptEncoder` (the problem as found: a normal request waited 3.9-4.9 s behind
three prompts of a million CJK characters) the short prompt below could not finish
before the long one was released and `test_a_short_prompt_passes_a_blocked_long_one`
fails (`PromptEncoder` in place of `LanedPromptEncoder`: TimeoutError).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from mlxpool.agent.engine.prompts import PromptEncoder
from mlxpool.agent.serving.tokenizing import LanedPromptEncoder

LONG = 100
WAIT = 30.0
"""Only a bound on a hang: nothing below waits for time to pass."""


class BlockingTokenizer:
    """Encodes one id per character; a text of LONG or more characters blocks until released."""

    has_chat_template = False

    def __init__(self, shared: dict[str, Any] | None = None) -> None:
        self.shared = shared or {"release": threading.Event(), "entered": threading.Event(),
                                 "threads": set(), "copies": 0}

    def __len__(self) -> int:
        return 1 << 20

    def __deepcopy__(self, memo: dict[int, Any]) -> BlockingTokenizer:
        self.shared["copies"] += 1
        return BlockingTokenizer(self.shared)

    def encode(self, text: str) -> list[int]:
        self.shared["threads"].add((id(self), threading.current_thread().name))
        if len(text) >= LONG:
            self.shared["entered"].set()
            assert self.shared["release"].wait(WAIT), "never released"
        return [ord(c) for c in text]

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> list[int]:
        raise AssertionError("no template")


async def started(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT)


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
async def test_a_short_prompt_passes_a_blocked_long_one(chat: bool) -> None:
    tokenizer = BlockingTokenizer()
    encoder = LanedPromptEncoder(tokenizer, long_chars=LONG)
    try:
        if chat:
            long = asyncio.create_task(encoder.encode_chat([{"role": "user", "content": "x" * LONG}]))
        else:
            long = asyncio.create_task(encoder.encode_text("x" * LONG))
        await started(tokenizer.shared["entered"])
        short = await asyncio.wait_for(encoder.encode_text("hi"), WAIT)
        assert short == [ord("h"), ord("i")]
        assert not long.done(), "the long prompt is still blocked: the short one overtook it"
        tokenizer.shared["release"].set()
        assert len(await asyncio.wait_for(long, WAIT)) >= LONG
    finally:
        tokenizer.shared["release"].set()
        encoder.close()
    # Each lane has its own tokenizer: never one tokenizer on two threads.
    by_tokenizer: dict[int, set[str]] = {}
    for ident, thread in tokenizer.shared["threads"]:
        by_tokenizer.setdefault(ident, set()).add(thread)
    assert len(by_tokenizer) == 2 and all(len(t) == 1 for t in by_tokenizer.values()), by_tokenizer
    assert tokenizer.shared["copies"] == 1


async def test_the_one_thread_encoder_serializes() -> None:
    """What the lanes fix, shown with the same tokenizer: the short prompt waits."""
    tokenizer = BlockingTokenizer()
    encoder = PromptEncoder(tokenizer)
    try:
        long = asyncio.create_task(encoder.encode_text("x" * LONG))
        await started(tokenizer.shared["entered"])
        short = asyncio.create_task(encoder.encode_text("hi"))
        done, _ = await asyncio.wait({short}, timeout=0.2)
        assert not done, "one thread: the short prompt cannot pass"
        tokenizer.shared["release"].set()
        assert await asyncio.wait_for(short, WAIT) == [ord("h"), ord("i")]
        await long
    finally:
        tokenizer.shared["release"].set()
        encoder.close()


async def test_an_uncopyable_tokenizer_keeps_the_one_lane() -> None:
    class Uncopyable(BlockingTokenizer):
        def __deepcopy__(self, memo: dict[int, Any]) -> BlockingTokenizer:
            raise TypeError("cannot copy")

    tokenizer = Uncopyable()
    tokenizer.shared["release"].set()
    encoder = LanedPromptEncoder(tokenizer, long_chars=LONG)
    try:
        assert await encoder.encode_text("y" * LONG) == [ord("y")] * LONG
        assert await encoder.encode_text("y" * LONG) == [ord("y")] * LONG
    finally:
        encoder.close()
    assert {ident for ident, _ in tokenizer.shared["threads"]} == {id(tokenizer)}
