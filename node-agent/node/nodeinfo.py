"""Build the InferenceNode this agent registers: name, labels, spec and status.

Pure functions over `mlxpool.nodes` (the shared contract); `registration` does the
talking to the API server. Label and name checks follow Kubernetes' own syntax so a
typo fails at start-up, not as an API error on every heartbeat.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from mlxpool import __version__
from mlxpool.nodes import Hardware, LoadedModel, NodeSpec, NodeStatus, WarmupProgress
from mlxpool.resources import API_VERSION, NODE_KIND

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_NAME = re.compile(rf"^{_NAME}$")


def parse_labels(pairs: Iterable[str]) -> dict[str, str]:
    """`k=v` strings to a dict; ValueError naming the first bad one."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"label {pair!r} is not of the form key=value")
        prefix, slash, name = key.rpartition("/")
        if slash and not _DNS_SUBDOMAIN.match(prefix):
            raise ValueError(f"label key {key!r}: prefix {prefix!r} is not a DNS subdomain")
        if not _LABEL_NAME.match(name):
            raise ValueError(f"label key {key!r}: name must be 1-63 alphanumerics, '-', '_' or '.'")
        if value and not _LABEL_NAME.match(value):
            raise ValueError(f"label {key!r}: value {value!r} must be 0-63 alphanumerics, '-', '_' or '.'")
        labels[key] = value
    return labels


def check_node_name(name: str) -> str:
    if not _DNS_SUBDOMAIN.match(name):
        raise ValueError(f"node name {name!r} must be a lowercase DNS subdomain (a-z, 0-9, '-', '.')")
    return name


def default_node_name(hostname: str | None = None) -> str:
    """The host name, lowercased, with anything Kubernetes rejects turned into '-'."""
    raw = (hostname or socket.gethostname()).lower()
    name = re.sub(r"[^a-z0-9.-]+", "-", raw).strip("-.")
    return name[:253] or "agent"


def node_spec(endpoint: str, hardware: Hardware, max_models: int = 1) -> NodeSpec:
    return NodeSpec(endpoint=endpoint, hardware=hardware, max_models=max_models)


def node_status(
    ready: bool, models: Iterable[LoadedModel], free_memory_bytes: int | None, now: datetime | None = None,
    device_memory_used_bytes: int | None = None, warmup: Iterable[WarmupProgress] = (),
) -> NodeStatus:
    return NodeStatus(
        ready=ready,
        models=list(models),
        heartbeat_time=(now or datetime.now(UTC)).replace(microsecond=0),
        free_memory_bytes=free_memory_bytes,
        device_memory_used_bytes=device_memory_used_bytes,
        warmup=list(warmup),
        agent_version=__version__,
    )


def node_object(name: str, labels: dict[str, str], spec: NodeSpec) -> dict[str, Any]:
    """The body to create (status is ignored on create: it has its own subresource)."""
    return {
        "apiVersion": API_VERSION,
        "kind": NODE_KIND,
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": spec.to_wire(),
    }
