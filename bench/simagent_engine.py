"""The simulated agent's inference engine: continuous batching on a documented timing model.

A benchmark tool (`bench.scaling`), never a stand-in for the real agent in a test that
claims to test the agent. It lets one 2-core machine host dozens of "agents" of a fixed,
known capacity, so what a benchmark measures is the router, not MLX on a shared CPU.

The timing model (`TimingModel`), per agent and model:
- `slots` batch slots (decode concurrency). Requests beyond them wait, ordered by
  priority tier then arrival; more than `max_queue` waiting are refused (429 queue_full).
- Prefill: a request taking a slot computes its uncached prompt tokens at
  `prefill_tokens_per_second`, one request at a time, and the running batch does not
  decode meanwhile (as mlx-lm's batch generator: a prefill stalls the decode steps).
  The prefill yields the request's first token.
- Decode: one batched step emits one token to every running sequence and lasts
  `step_base_seconds + step_per_sequence_seconds * batch`. A sequence generates exactly
  its `max_tokens` (no EOS) and leaves its slot after its last token.
- Prefix cache: prompts are cut into blocks of `prefix_block_chars` characters (about
  `chars_per_token` characters a token: the simulator has no tokenizer), chained-hashed;
  the leading blocks a previous prompt left in the cache (LRU, `prefix_cache_blocks`
  blocks) are not computed again.
- `speed` scales every rate (0.5: a Mac half as fast).

Time is kept on the engine's own clock, `t`, advanced by exactly the model's durations
and slept to with absolute deadlines, so the simulated capacity does not drift when the
host's event loop is late; a loop more than `MAX_LAG_SECONDS` behind gives up the lost
time and counts it in `lag_seconds` (then the host, not the model, limited the run).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from mlxpool.loadsignals import ModelSignals
from mlxpool.priorities import Priority

MAX_LAG_SECONDS = 0.05
KV_BYTES_PER_TOKEN = 64 * 1024
"""KV bytes one token of context holds in the reports (an 8B model's order of magnitude)."""


@dataclass(frozen=True)
class TimingModel:
    slots: int = 8
    prefill_tokens_per_second: float = 4000.0
    step_base_seconds: float = 0.040
    step_per_sequence_seconds: float = 0.002
    max_queue: int = 512
    speed: float = 1.0
    chars_per_token: float = 4.0
    prefix_block_chars: int = 64
    prefix_cache_blocks: int = 8192

    def __post_init__(self) -> None:
        if self.slots < 1 or self.max_queue < 0 or self.prefix_block_chars < 1 or self.prefix_cache_blocks < 0:
            raise ValueError("slots and prefix_block_chars must be >= 1; max_queue and prefix_cache_blocks >= 0")
        if min(self.prefill_tokens_per_second, self.speed, self.chars_per_token) <= 0:
            raise ValueError("prefill_tokens_per_second, speed and chars_per_token must be positive")
        if self.step_base_seconds <= 0 or self.step_per_sequence_seconds < 0:
            raise ValueError("step_base_seconds must be positive, step_per_sequence_seconds >= 0")

    def step_seconds(self, batch: int) -> float:
        return (self.step_base_seconds + self.step_per_sequence_seconds * batch) / self.speed

    def prefill_seconds(self, tokens: float) -> float:
        return tokens / (self.prefill_tokens_per_second * self.speed)

    def tokens(self, chars: int) -> int:
        return max(1, math.ceil(chars / self.chars_per_token))

    def decode_tokens_per_second(self, batch: int) -> float:
        """Tokens per second of a batch of `batch` sequences decoding (all of them together)."""
        return batch / self.step_seconds(batch)


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Sequence:
    prompt: str
    max_tokens: int
    priority: Priority
    arrived: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated: int = 0
    done: bool = False
    cancelled: bool = False
    aborted: bool = False
    """The engine stopped under it (the agent was killed): the stream must break, not end."""
    tokens: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    """Counts of tokens emitted, one item per step (0 closes the stream)."""


def prompt_block_hashes(prompt: str, block_chars: int) -> list[bytes]:
    previous = b""
    hashes = []
    for start in range(0, len(prompt) // block_chars * block_chars, block_chars):
        previous = hashlib.blake2b(previous + prompt[start:start + block_chars].encode("utf-8", "surrogatepass"),
                                   digest_size=8).digest()
        hashes.append(previous)
    return hashes


class SimEngine:
    """One model's engine on one simulated agent."""

    def __init__(self, model: TimingModel, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.clock = clock
        self.waiting: list[tuple[int, int, Sequence]] = []
        self.running: list[Sequence] = []
        self.prefilling: Sequence | None = None
        self.prefix: OrderedDict[bytes, None] = OrderedDict()
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # lifetime counters (what /v1/signals and the benchmark read)
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.generated_tokens_total = 0
        self.decode_steps_total = 0
        self.decode_tokens_total = 0
        self.decode_seconds_total = 0.0
        self.lag_seconds = 0.0
        self.requests_total = 0
        self.refused_total = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    def abort(self) -> None:
        """Stop the engine (an agent killed): every open stream ends at once, short."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        pending = [*self.running, *(s for _, _, s in self.waiting)]
        if self.prefilling is not None:
            pending.append(self.prefilling)
        for seq in pending:
            seq.done = seq.aborted = True
            seq.tokens.put_nowait(0)
        self.running.clear()
        self.waiting.clear()
        self.prefilling = None

    # -- requests -------------------------------------------------------------------------
    def submit(self, prompt: str, max_tokens: int, priority: Priority) -> Sequence:
        if len(self.waiting) >= self.model.max_queue:
            self.refused_total += 1
            raise QueueFull(f"{len(self.waiting)} requests are waiting (limit {self.model.max_queue})")
        seq = Sequence(prompt, max(1, max_tokens), priority, self.clock(), prompt_tokens=self.model.tokens(len(prompt)))
        self.waiting.append((priority.rank, next(self._order), seq))
        self.waiting.sort(key=lambda item: item[:2])
        self.requests_total += 1
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """The client went away: free its slot (or its place in the queue)."""
        seq.cancelled = True
        self.waiting = [item for item in self.waiting if item[2] is not seq]

    # -- the engine loop ----------------------------------------------------------------------
    async def _sleep_until(self, t: float) -> float:
        now = self.clock()
        if t > now:
            await asyncio.sleep(t - now)
            return t
        await asyncio.sleep(0)
        if now - t > MAX_LAG_SECONDS:  # the host fell behind: give the time up, count it
            self.lag_seconds += now - t - MAX_LAG_SECONDS
            return now - MAX_LAG_SECONDS
        return t

    async def _run(self) -> None:
        t = self.clock()
        while True:
            self.running = [s for s in self.running if not s.cancelled]
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                t = max(t, self.clock())
                continue
            if self.waiting and len(self.running) < self.model.slots:
                seq = self.waiting.pop(0)[2]
                if seq.cancelled:
                    continue
                t = await self._prefill(seq, t)
                continue
            batch = len(self.running)
            step = self.model.step_seconds(batch)
            t = await self._sleep_until(t + step)
            self.decode_steps_total += 1
            self.decode_seconds_total += step
            for seq in self.running:
                if seq.cancelled:
                    continue
                seq.generated += 1
                self.generated_tokens_total += 1
                self.decode_tokens_total += 1
                seq.tokens.put_nowait(1)
                if seq.generated >= seq.max_tokens:
                    seq.done = True
                    seq.tokens.put_nowait(0)
            self.running = [s for s in self.running if not s.done]

    async def _prefill(self, seq: Sequence, t: float) -> float:
        blocks = prompt_block_hashes(seq.prompt, self.model.prefix_block_chars)
        hit = 0
        for block in blocks:
            if block not in self.prefix:
                break
            hit += 1
        cached_chars = hit * self.model.prefix_block_chars
        seq.cached_tokens = min(int(cached_chars / self.model.chars_per_token), seq.prompt_tokens - 1)
        self.prefilling = seq
        t = await self._sleep_until(t + self.model.prefill_seconds(seq.prompt_tokens - seq.cached_tokens))
        self.prefilling = None
        self.prompt_tokens_total += seq.prompt_tokens
        self.cached_tokens_total += seq.cached_tokens
        if self.model.prefix_cache_blocks:
            for block in blocks:
                self.prefix[block] = None
                self.prefix.move_to_end(block)
            while len(self.prefix) > self.model.prefix_cache_blocks:
                self.prefix.popitem(last=False)
        if seq.cancelled:
            return t
        seq.generated = 1  # the prefill's own output
        self.generated_tokens_total += 1
        seq.tokens.put_nowait(1)
        if seq.generated >= seq.max_tokens:
            seq.done = True
            seq.tokens.put_nowait(0)
        else:
            self.running.append(seq)
        return t

    # -- reports ------------------------------------------------------------------------------
    def signals(self) -> ModelSignals:
        waiting: dict[Priority, int] = {}
        for _, _, seq in self.waiting:
            waiting[seq.priority] = waiting.get(seq.priority, 0) + 1
        queued = sum(s.prompt_tokens for _, _, s in self.waiting)
        if self.prefilling is not None:
            queued += self.prefilling.prompt_tokens - self.prefilling.cached_tokens
        steps = self.decode_steps_total
        context = sum(s.prompt_tokens + s.generated for s in self.running)
        block_tokens = self.model.prefix_block_chars / self.model.chars_per_token
        return ModelSignals(
            waiting=waiting, running=len(self.running) + (self.prefilling is not None), slots=self.model.slots,
            queued_prompt_tokens=queued, kv_bytes=context * KV_BYTES_PER_TOKEN,
            prefix_cache_bytes=int(len(self.prefix) * block_tokens * KV_BYTES_PER_TOKEN),
            prefix_cache_max_bytes=int(self.model.prefix_cache_blocks * block_tokens * KV_BYTES_PER_TOKEN),
            prefill_tokens_per_second=self.model.prefill_tokens_per_second * self.model.speed,
            decode_step_seconds=self.decode_seconds_total / steps if steps else self.model.step_seconds(1),
            decode_tokens_per_second=(self.decode_tokens_total / self.decode_seconds_total if self.decode_seconds_total
                                      else self.model.decode_tokens_per_second(self.model.slots)),
        )
