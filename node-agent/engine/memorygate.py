"""One engine's side of the node's memory books: admission by projected KV bytes.

The engine asks the gate at two points. On arrival (`refuse_on_arrival`): a request that
can never fit, or a long one while the node is under pressure, is refused at once with
`InsufficientMemory` (503, naming the shortfall), before it queues. At admission
(`admit`): each sequence the scheduler picked reserves its projected KV in the books,
plus its prefill's scratch (`memory.prefill_scratch_bytes`: attention scores, logits and
activations that exist only while its prompt is processed; prefilled together, several
prompts' scratch adds up) until its prompt is done (`prefilled`), then only the KV;
one that does not fit goes back to wait (the prefix cache is shed first, when shedding
makes room), and one that waited longer than `wait_seconds` is refused. Under pressure
the whole prefix cache goes before anything else. What a sequence reserved is released
when it leaves the engine (`done`). Never aborts: the worst a request gets is a clear 503.

MLX-free; runs on the engine thread (the books lock for the other engines).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from mlxpool.agent.engine.interface import GenerationRequest
from mlxpool.agent.engine.memory import (
    MemoryBooks,
    PrefillShape,
    Verdict,
    prefill_scratch_bytes,
    projected_kv_bytes,
)
from mlxpool.agent.errors import InsufficientMemory

log = logging.getLogger(__name__)


class Sheddable(Protocol):
    @property
    def nbytes(self) -> int: ...

    def shed(self, nbytes: int) -> int:
        """Drop least recently used entries until `nbytes` are freed (or it is empty); bytes freed."""
        ...


class _HasRequest(Protocol):
    @property
    def request(self) -> GenerationRequest: ...


S = TypeVar("S", bound=_HasRequest)
Refusal = InsufficientMemory


class MemoryGate:
    def __init__(self, books: MemoryBooks, model: str, kv_bytes_per_token: int,
                 available: Callable[[], int | None], wait_seconds: float,
                 clock: Callable[[], float] = time.monotonic, prefill: PrefillShape | None = None,
                 prefill_step: int = 2048) -> None:
        self.books = books
        self.prefill = prefill
        self.prefill_step = prefill_step
        self.model = model
        self.kv_bytes_per_token = kv_bytes_per_token
        self._available = available
        self._wait_seconds = wait_seconds
        self._clock = clock
        self._waiting_since: dict[str, float] = {}
        self.refused = 0
        self.shed_bytes = 0

    def projected(self, request: GenerationRequest) -> int:
        """The request's KV at its longest: what stays reserved once its prompt is processed."""
        return projected_kv_bytes(len(request.prompt_tokens), request.sampling.max_tokens, self.kv_bytes_per_token)

    def scratch(self, request: GenerationRequest) -> int:
        return prefill_scratch_bytes(len(request.prompt_tokens), self.prefill, self.prefill_step)

    def reservation(self, request: GenerationRequest) -> int:
        """What admission reserves: the KV and, while its prompt is processed, the prefill's scratch."""
        return self.projected(request) + self.scratch(request)

    def prefilled(self, request: GenerationRequest) -> None:
        """Its prompt is processed: the scratch goes back, the KV stays (a request already
        done, or never admitted, holds nothing and gets nothing)."""
        self.books.shrink(request.request_id, self.projected(request))

    def refuse_on_arrival(self, request: GenerationRequest) -> InsufficientMemory | None:
        decision = self.books.decide(self.reservation(request), self._available())
        if decision.verdict is Verdict.REFUSE:
            return self._refusal(request, decision.reason, decision.shortfall_bytes)
        return None

    def admit(self, picked: Sequence[S], prefix: Sheddable) -> tuple[list[S], list[S], list[tuple[S, Refusal]]]:
        """(to insert now, to put back in the queue, to refuse) out of what the scheduler picked."""
        available = self._available()
        if self.books.under_pressure(available) and prefix.nbytes > 0:
            freed = prefix.shed(prefix.nbytes)
            self.shed_bytes += freed
            log.warning("memory pressure: prefix cache shed model=%s freed_bytes=%d available_bytes=%s",
                        self.model, freed, available)
        go: list[S] = []
        back: list[S] = []
        refused: list[tuple[S, Refusal]] = []
        now = self._clock()
        for item in picked:
            request = item.request
            nbytes = self.reservation(request)
            if back:  # keep their order: nobody overtakes a sequence sent back to wait
                back.append(item)
                continue
            decision = self.books.decide(nbytes, available)
            if decision.verdict is Verdict.SHED_THEN_ADMIT:
                self.shed_bytes += prefix.shed(decision.shortfall_bytes)
                self.books.set_prefix_bytes(self.model, prefix.nbytes)
            if decision.verdict in (Verdict.ADMIT, Verdict.SHED_THEN_ADMIT) and self.books.reserve(
                    request.request_id, nbytes):
                self._waiting_since.pop(request.request_id, None)
                go.append(item)
                continue
            if decision.verdict is Verdict.REFUSE:
                refused.append((item, self._refusal(request, decision.reason, decision.shortfall_bytes)))
                continue
            since = self._waiting_since.setdefault(request.request_id, now)
            if now - since >= self._wait_seconds:
                refused.append((item, self._refusal(
                    request, f"{decision.reason or 'it did not fit'}; waited {now - since:.1f} s "
                    "(weight_management.memory_wait_seconds)", decision.shortfall_bytes)))
                continue
            back.append(item)
        return go, back, refused

    def done(self, request_id: str) -> None:
        self._waiting_since.pop(request_id, None)
        self.books.release(request_id)

    def prefix_changed(self, nbytes: int) -> None:
        self.books.set_prefix_bytes(self.model, nbytes)

    def _refusal(self, request: GenerationRequest, reason: str, shortfall: int) -> InsufficientMemory:
        self._waiting_since.pop(request.request_id, None)
        self.refused += 1
        log.info("request refused for memory request_id=%s model=%s shortfall_bytes=%d", request.request_id,
                 self.model, shortfall)
        return InsufficientMemory(
            f"not enough memory for this request: {reason} (prompt {len(request.prompt_tokens)} + max_tokens "
            f"{request.sampling.max_tokens} tokens at {self.kv_bytes_per_token} KV bytes per token, and "
            f"{self.scratch(request)} bytes of prefill scratch while the prompt is processed; "
            f"short by {shortfall} bytes)", shortfall)
