"""The routing table: the contract between the operator (writer) and routers (readers).

The operator writes one table per pool into the ConfigMap `<pool>-routes`, key
`routes.json`. Routers only read it: the operator owns health, routers add their own
fast local signals on top. The table lists only what a router needs to forward a
request; it is not a copy of the pool status.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class RouteEndpoint(BaseModel):
    """One agent able to serve one model."""

    model_config = ConfigDict(extra="forbid")

    node: str = Field(description="InferenceNode name.")
    url: str = Field(description="Base URL of the agent, e.g. http://127.0.0.1:8101.")
    weight: int = Field(default=1, ge=0, description="Relative share of traffic; 0 = drain.")
    healthy: bool = True


class RoutingTable(BaseModel):
    """Everything a router needs to pick an endpoint for a pool's model."""

    model_config = ConfigDict(extra="forbid")

    pool: str
    namespace: str
    revision: int = Field(ge=0, description="Increases by one on every change of the content.")
    strategy: str = "round-robin"
    selectable_strategies: list[str] = Field(default_factory=list, max_length=16)
    """Strategies a request may choose instead with the `x-mlxpool-strategy` header."""
    models: dict[str, list[RouteEndpoint]] = Field(default_factory=dict)
    updated: datetime | None = None

    def endpoints_for(self, model: str) -> list[RouteEndpoint]:
        """Healthy endpoints with a positive weight for `model` (empty if unknown)."""
        return [e for e in self.models.get(model, []) if e.healthy and e.weight > 0]

    def same_routes(self, other: RoutingTable | None) -> bool:
        """True when `other` routes exactly like this table (revision and time aside)."""
        return other is not None and (self.strategy, self.selectable_strategies, self.models) == (
            other.strategy, other.selectable_strategies, other.models)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def from_json(cls, text: str) -> RoutingTable:
        return cls.model_validate_json(text)
