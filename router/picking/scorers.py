"""Scorer plugins: each endpoint gets a score in [0, 1], higher is better.

- `weighted-round-robin`: smooth weighted round-robin (nginx's), per model; stateful,
  it advances in `picked`.
- `least-in-flight`: fewer requests in flight from this router scores higher.
- `low-latency`: a lower EWMA of time to first byte scores higher; unmeasured
  endpoints score as the best so they get measured.
- `prefix-affinity`: the share of the prompt's leading blocks an endpoint was recently
  sent (`prefixindex`), so prompts sharing a prefix (a system prompt, a few-shot
  preamble, a conversation's earlier turns) reach the agent whose prefix cache holds
  it; stateful, it records the chosen endpoint's blocks in `picked`.
- `session-affinity`: a request naming its conversation (`x-session-id`) scores 1 on
  one endpoint, the highest of hash(session, endpoint URL) (rendezvous hashing), 0
  elsewhere; without a session it scores 0 everywhere. Stateless: every router replica
  picks the same endpoint for a conversation, and an endpoint leaving moves only its
  own conversations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from mlxpool.router.picking.plugins import PickRequest, Scorer, spread
from mlxpool.router.picking.prefixindex import BlockHash, PrefixIndex, prompt_blocks
from mlxpool.router.picking.signals import EndpointSignals
from mlxpool.routing import RouteEndpoint


class WeightedRoundRobinScorer(Scorer):
    """Rotates over endpoints in proportion to their table weight, spreading each turn.

    Smooth weighted round-robin: each pick every endpoint's credit grows by its weight,
    the endpoint with most credit wins and pays back the total. The score is the credit
    after growth, normalised, so the ranking after the winner is the rotation order:
    exactly what failover should walk.
    """

    type_name = "weighted-round-robin"

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._credit: dict[str, dict[str, float]] = {}  # model -> url -> credit

    def _grown(self, model: str, endpoints: Sequence[RouteEndpoint]) -> list[float]:
        credit = self._credit.get(model, {})
        return [credit.get(e.url, 0.0) + e.weight for e in endpoints]

    def score(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[float]:
        return spread(self._grown(request.model, endpoints), higher_is_better=True)

    def picked(self, request: PickRequest, ranked: Sequence[RouteEndpoint]) -> None:
        grown = self._grown(request.model, ranked)
        credit = {e.url: c for e, c in zip(ranked, grown, strict=True)}
        # Endpoints missing from this pick (filtered out) restart from zero later.
        credit[ranked[0].url] -= sum(e.weight for e in ranked)
        self._credit[request.model] = credit


class LeastInFlightScorer(Scorer):
    """Prefers endpoints with fewer requests in flight from this router."""

    type_name = "least-in-flight"

    def score(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[float]:
        return spread([signals.get(e.url).in_flight for e in endpoints], higher_is_better=False)


class LowLatencyScorer(Scorer):
    """Prefers endpoints with a lower smoothed time to first byte."""

    type_name = "low-latency"

    def score(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[float]:
        measured = [signals.get(e.url).first_byte_ewma for e in endpoints]
        known = [m for m in measured if m is not None]
        if not known:
            return [1.0] * len(endpoints)
        best = min(known)
        return spread([best if m is None else m for m in measured], higher_is_better=False)


class PrefixAffinityParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(
        default=64, ge=8, le=8192,
        description="Characters per hashed prompt block. 64 is about 16 tokens of English, the fewest cached "
                    "tokens an agent reuses; a prompt shorter than one block gets no affinity.")
    max_prompt_blocks: int = Field(
        default=256, ge=1, le=65536,
        description="Leading blocks of a prompt considered (by default its first 16,384 characters): bounds "
                    "the hashing each pick does on the event loop.")
    max_entries: int = Field(
        default=100_000, ge=1, le=100_000_000,
        description="(block, endpoint) pairs remembered, least recently used evicted first; about 200 bytes each.")


class PrefixAffinityScorer(Scorer):
    """Prefers the endpoints recently sent the longest leading part of this prompt.

    The score is matched leading blocks / the prompt's blocks: 1.0 for an endpoint
    recently sent this very prompt (or a longer one), 0.0 everywhere when nothing
    matches or the prompt is shorter than a block, leaving the choice to the other
    scorers. Only the endpoints given are scored, so endpoints that left the table are
    never chosen; their entries age out of the index. The endpoint ranked first is
    recorded even if failover then answers from another: a failing endpoint is soon
    filtered out (connect-cooldown) or leaves the table.
    """

    type_name = "prefix-affinity"
    Params = PrefixAffinityParams
    params: PrefixAffinityParams

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self.index = PrefixIndex(self.params.max_entries)
        self._last: tuple[PickRequest, list[BlockHash]] | None = None
        """The blocks of the request being picked: `score` and `picked` share them."""

    def _blocks(self, request: PickRequest) -> list[BlockHash]:
        if self._last is not None and self._last[0] is request:
            return self._last[1]
        blocks = prompt_blocks(request.model, request.prompt, self.params.block_size, self.params.max_prompt_blocks)
        self._last = (request, blocks)
        return blocks

    def score(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[float]:
        blocks = self._blocks(request)
        if not blocks:
            return [0.0] * len(endpoints)
        return [n / len(blocks) for n in self.index.match(blocks, [e.url for e in endpoints])]

    def picked(self, request: PickRequest, ranked: Sequence[RouteEndpoint]) -> None:
        self.index.record(self._blocks(request), ranked[0].url)


class SessionAffinityScorer(Scorer):
    """One endpoint per conversation, the same on every replica (rendezvous hashing)."""

    type_name = "session-affinity"

    def score(
        self, request: PickRequest, endpoints: Sequence[RouteEndpoint], signals: EndpointSignals
    ) -> list[float]:
        if not request.session or not endpoints:
            return [0.0] * len(endpoints)
        keys = [rendezvous_key(request.session, e.url) for e in endpoints]
        best = max(keys)
        return [1.0 if k == best else 0.0 for k in keys]


def rendezvous_key(session: str, url: str) -> bytes:
    """hash(session, url): the endpoint with the highest key holds the session."""
    digest = hashlib.blake2b(url.encode(), digest_size=8, key=session.encode("utf-8", "surrogatepass")[:64])
    return digest.digest()
