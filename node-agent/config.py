"""The agent's settings, grouped by topic; built from the command line by `main`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RegistrationConfig:
    """Where and how this agent registers its InferenceNode."""

    kubeconfig: str
    node_name: str
    labels: dict[str, str] = field(default_factory=dict)
    advertise_url: str | None = None
    """URL the operator and routers use to reach this agent; the bound URL if unset."""
    heartbeat_interval: float = 5.0
    """Seconds between status writes."""


@dataclass(frozen=True)
class AgentConfig:
    model_path: Path
    model_name: str
    """The name clients put in `"model"`; defaults to the model directory's name."""
    host: str = "127.0.0.1"
    port: int = 8100
    """0 picks a free port; the ready log line names the real one."""
    max_tokens_default: int = 256
    """Completion budget when a request gives no max_tokens (capped by the context)."""
    max_running: int = 32
    """Sequences decoded together in one batch."""
    drain_timeout: float = 30.0
    """Seconds a SIGTERM waits for in-flight requests before exiting anyway."""
    registration: RegistrationConfig | None = None
    log_level: str = "INFO"
