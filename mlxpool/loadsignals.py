"""Load signals: what an agent says about how busy it is, the contract with routers.

`GET /v1/signals` on every agent answers one compact `AgentSignals` document (a few
hundred bytes per model, no Prometheus text to parse), cheap enough for every router
replica to read every 50-200 ms, as llm-d's endpoint picker scrapes its engines. It
carries, per model served: requests waiting by tier, sequences running, batch slots,
prompt tokens queued and not yet prefilled, KV and prefix-cache usage, and the rates
the engine measured (prefill tokens per busy second, decode step time), from which a
router predicts a request's time to first token. Open like `/metrics`: it says how
busy a node is, nothing about its requests.

Rates are lifetime ratios of the engine's counters (tokens computed / seconds spent
computing them), not the last second's throughput: an idle node still reports what it
can do. 0 means not measured yet.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from mlxpool.priorities import Priority

SIGNALS_PATH = "/v1/signals"
SIGNALS_VERSION = 1


class ModelSignals(BaseModel):
    """How busy one model's engine is on one agent."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # ignore: newer agents may add fields

    waiting: dict[Priority, int] = Field(default_factory=dict)
    """Requests accepted and not yet in the batch, by tier (tiers with none may be left out)."""
    running: int = Field(default=0, ge=0)
    """Sequences in the batch (prefilling or decoding)."""
    slots: int = Field(default=0, ge=0)
    """Batch slots (decode concurrency); 0 if unknown."""
    queued_prompt_tokens: int = Field(default=0, ge=0)
    """Prompt tokens of waiting requests and of admitted ones not fully prefilled yet."""
    kv_bytes: int = Field(default=0, ge=0)
    """Bytes of the running batch's key/value cache."""
    prefix_cache_bytes: int = Field(default=0, ge=0)
    prefix_cache_max_bytes: int = Field(default=0, ge=0)
    prefill_tokens_per_second: float = Field(default=0.0, ge=0)
    """Prompt tokens computed per second spent prefilling (0: not measured yet)."""
    decode_step_seconds: float = Field(default=0.0, ge=0)
    """Mean duration of one batched decode step (0: not measured yet)."""
    decode_tokens_per_second: float = Field(default=0.0, ge=0)
    """Tokens generated per second spent decoding, all sequences of the batch together."""

    @property
    def waiting_total(self) -> int:
        return sum(self.waiting.values())

    @property
    def free_slots(self) -> int:
        """Batch slots a new request could take at once (0 when unknown)."""
        return max(self.slots - self.running - self.waiting_total, 0)

    @property
    def slot_usage(self) -> float:
        """Running plus waiting over slots: 1.0 means the next request waits; may exceed 1."""
        if self.slots <= 0:
            return 0.0
        return (self.running + self.waiting_total) / self.slots


class AgentSignals(BaseModel):
    """What `GET /v1/signals` answers."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: int = SIGNALS_VERSION
    draining: bool = False
    """The agent is shutting down: it takes no new request."""
    models: dict[str, ModelSignals] = Field(default_factory=dict)
