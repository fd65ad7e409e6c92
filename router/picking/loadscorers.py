"""Scorer plugins on the agents' own load reports (`signals.LoadView`), not this router's view.

- `queue-depth`: fewer requests waiting on the agent scores higher (llm-d's queue scorer).
- `slot-utilisation`: a lower share of batch slots taken (running + waiting over
  slots) scores higher; at 1.0 the next request waits. Our stand-in for KV usage: an
  MLX agent has no fixed KV block pool, its batch slots are what runs out.
- `predicted-ttft`: a lower predicted time to first token scores higher ("predicted
  latency" routing): the agent's queued prompt tokens plus this prompt's, over the
  prefill rate it measured, plus a wait for a batch slot when none is free.
- `sticky-prefix`: llm-d's "sticky until saturated": the endpoint recently sent the
  longest leading part of this prompt keeps it until its queued uncached prefill
  passes `max_queued_prompt_tokens`; then it scores 0 and the prompt spills elsewhere.

When a report is fresh they score on it; when stale, `LoadView.saturated` (the
`saturated` policy) scores the endpoint 0, else (`fallback`, or an agent serving no
signals) they score on this router's own requests in flight, as `least-in-flight`.
Pure functions of their inputs: no clock (the request carries `now`), no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from mlxpool.loadsignals import ModelSignals
from mlxpool.router.picking.plugins import PickRequest, Scorer, spread
from mlxpool.router.picking.prefixindex import BlockHash, PrefixIndex, prompt_blocks
from mlxpool.router.picking.signals import EndpointSignals, Freshness, LoadView
from mlxpool.routing import RouteEndpoint


def views(request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals) -> list[LoadView]:
    return [signals.load(e.url, request.model, request.now) for e in endpoints]


def _fallback(endpoints: Sequence[RouteEndpoint], signals: EndpointSignals, seen: list[LoadView]) -> list[float]:
    """Scores on local in-flight counts; saturated endpoints 0."""
    scores = spread([signals.get(e.url).in_flight for e in endpoints], higher_is_better=False)
    return [0.0 if v.saturated else s for s, v in zip(scores, seen, strict=True)]


def _on_reports(values: list[float | None], seen: list[LoadView]) -> list[float]:
    """Min-max scores of the fresh endpoints' `values` (lower is better); saturated ones 0."""
    known = [v for v, view in zip(values, seen, strict=True) if v is not None and not view.saturated]
    if not known:
        return [0.0 if view.saturated else 1.0 for view in seen]
    lo, hi = min(known), max(known)
    scores = []
    for v, view in zip(values, seen, strict=True):
        if view.saturated or v is None:
            scores.append(0.0)
        elif hi == lo:
            scores.append(1.0)
        else:
            scores.append((hi - v) / (hi - lo))
    return scores


def _all_reported(seen: list[LoadView]) -> bool:
    """Every endpoint either has a fresh report or is known saturated: reports are comparable."""
    return all(v.report is not None or v.saturated for v in seen)


class QueueDepthScorer(Scorer):
    """Prefers endpoints whose agent has fewer requests waiting."""

    type_name = "queue-depth"

    def score(self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals,
              ) -> list[float]:
        seen = views(request, endpoints, signals)
        if not _all_reported(seen):
            return _fallback(endpoints, signals, seen)
        return _on_reports([float(v.report.waiting_total) if v.report else None for v in seen], seen)


class SlotUtilisationScorer(Scorer):
    """Prefers endpoints with a smaller share of their batch slots taken."""

    type_name = "slot-utilisation"

    def score(self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals,
              ) -> list[float]:
        seen = views(request, endpoints, signals)
        if not _all_reported(seen):
            return _fallback(endpoints, signals, seen)
        return _on_reports([v.report.slot_usage if v.report else None for v in seen], seen)


class PredictedTtftParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    chars_per_token: float = Field(
        default=4.0, gt=0, le=64, description="Prompt characters per token (the router has no tokenizer).")
    mean_output_tokens: int = Field(
        default=128, ge=1, le=65536,
        description="Tokens a running request still generates on average: how long a batch slot takes to free.")
    default_prefill_tokens_per_second: float = Field(
        default=1000.0, gt=0, description="Rate assumed for an agent that has not measured its own yet.")


def predicted_ttft(report: ModelSignals, prompt_tokens: float, params: PredictedTtftParams) -> float:
    """Seconds until this request's first token on an agent in the state `report` describes.

    Prefill: everything queued ahead plus this prompt, at the agent's measured rate. Slot
    wait: when no slot is free, the requests ahead beyond the slots each wait for a slot
    to free, which takes `mean_output_tokens` decode steps shared by all slots.
    """
    rate = report.prefill_tokens_per_second or params.default_prefill_tokens_per_second
    prefill = (report.queued_prompt_tokens + prompt_tokens) / rate
    ahead = report.running + report.waiting_total - report.slots + 1
    if ahead <= 0 or report.slots <= 0:
        return prefill
    step = report.decode_step_seconds or 0.02
    return prefill + ahead * params.mean_output_tokens * step / report.slots


class PredictedTtftScorer(Scorer):
    """Prefers the endpoint predicted to give this request its first token soonest."""

    type_name = "predicted-ttft"
    Params = PredictedTtftParams
    params: PredictedTtftParams

    def score(self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals,
              ) -> list[float]:
        seen = views(request, endpoints, signals)
        if not _all_reported(seen):
            return _fallback(endpoints, signals, seen)
        tokens = len(request.prompt) / self.params.chars_per_token
        predicted = [predicted_ttft(v.report, tokens, self.params) if v.report else None for v in seen]
        known = [p for p, v in zip(predicted, seen, strict=True) if p is not None and not v.saturated]
        if not known:
            return [0.0] * len(endpoints)
        best = min(known)
        # best / predicted: the fastest scores 1, one predicted twice as slow 0.5 (a ratio,
        # not min-max, so a 10 ms difference between two idle agents does not decide alone).
        return [0.0 if p is None or v.saturated else (1.0 if p <= 0 else min(best / p, 1.0))
                for p, v in zip(predicted, seen, strict=True)]


class StickyPrefixParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(default=64, ge=8, le=8192, description="Characters per hashed prompt block.")
    max_prompt_blocks: int = Field(default=256, ge=1, le=65536, description="Leading blocks of a prompt considered.")
    max_entries: int = Field(default=100_000, ge=1, le=100_000_000, description="(block, endpoint) pairs remembered.")
    max_queued_prompt_tokens: int = Field(
        default=8192, ge=1,
        description="An endpoint whose agent has more prompt tokens queued than this is saturated: warm or not, "
                    "it gets no affinity until it drains.")
    max_in_flight: int = Field(
        default=32, ge=1, description="Without a fresh report: saturated at this many requests in flight from here.")


class StickyPrefixScorer(Scorer):
    """Keeps a prefix on the endpoint that holds it, until that endpoint is saturated."""

    type_name = "sticky-prefix"
    Params = StickyPrefixParams
    params: StickyPrefixParams

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self.index = PrefixIndex(self.params.max_entries)
        self._last: tuple[PickRequest, list[BlockHash]] | None = None

    def blocks(self, request: PickRequest) -> list[BlockHash]:
        if self._last is not None and self._last[0] is request:
            return self._last[1]
        blocks = prompt_blocks(request.model, request.prompt, self.params.block_size, self.params.max_prompt_blocks)
        self._last = (request, blocks)
        return blocks

    def saturated(self, view: LoadView, in_flight: int) -> bool:
        if view.saturated:
            return True
        if view.freshness is Freshness.FRESH and view.report is not None:
            return view.report.queued_prompt_tokens > self.params.max_queued_prompt_tokens
        return in_flight >= self.params.max_in_flight

    def score(self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals,
              ) -> list[float]:
        blocks = self.blocks(request)
        if not blocks:
            return [0.0] * len(endpoints)
        matched = self.index.match(blocks, [e.url for e in endpoints])
        return [0.0 if self.saturated(v, signals.get(e.url).in_flight) else n / len(blocks)
                for n, v, e in zip(matched, views(request, endpoints, signals), endpoints, strict=True)]

    def picked(self, request: PickRequest, ranked: Sequence[RouteEndpoint]) -> None:
        self.index.record(self.blocks(request), ranked[0].url)
