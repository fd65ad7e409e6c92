"""The operator's HTTP transport to agents: one small pool per agent (`mlxpool.httptransports`,
shared with the router, which had the same pool-bookkeeping cost on its request path)."""

from __future__ import annotations

from mlxpool.httptransports import MAX_HOSTS, PerHostTransport

__all__ = ["MAX_HOSTS", "PerHostTransport"]
