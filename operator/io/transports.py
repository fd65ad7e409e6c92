"""The operator's HTTP transport to agents: one small pool per agent (`mlxpool.httptransports`,
shared with the router, which had the same pool-bookkeeping cost on its request path),
and the one TLS context its pools share for `https://` agents."""

from __future__ import annotations

import ssl
from pathlib import Path

from mlxpool.httptransports import MAX_HOSTS, PerHostTransport

__all__ = ["MAX_HOSTS", "PerHostTransport", "agent_tls"]


def agent_tls(ca_file: Path | None) -> ssl.SSLContext:
    """How agents' certificates are checked: against `ca_file` (`--agent-ca-file`), else the system's store."""
    if ca_file is None:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=str(ca_file))
