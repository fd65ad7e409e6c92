"""Domain errors of the agent: one class per failure, each fixing its status and code.

Every layer raises these (the engine included: a full queue or a passed deadline is
the same error from the engine to the client, never translated); `http.errors` maps
the base class to OpenAI's error shape `{"error": {"message", "type", "param",
"code"}}` in one table. Nothing here imports a web framework.
"""

from __future__ import annotations

from typing import ClassVar

from mlxpool.apierrors import ApiError
from mlxpool.priorities import Priority

_RETRY_SOON: dict[str, str] = {"Retry-After": "1"}
"""The header of every 503 here: the condition is short-lived, or another node can answer."""


class AgentError(ApiError):
    """Base class of the agent's errors (inference and operations APIs)."""

    def response_headers(self) -> dict[str, str] | None:
        """The headers of its response: the class's, unless the instance computes its own."""
        return self.headers


class InvalidRequest(AgentError):
    status_code = 400
    error_type = "invalid_request_error"


class TooManyWatches(AgentError):
    """Every `GET /health/watch` slot is taken (each holds a connection open)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "too_many_watches"


class ModelNotFound(AgentError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotReady(AgentError):
    """The agent cannot take generation requests yet (loading) or any more (draining)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "not_ready"
    headers: ClassVar[dict[str, str] | None] = _RETRY_SOON


class Draining(NotReady):
    code = "draining"


class ModelLoadFailed(NotReady):
    """A model loaded on request (`multi_model.load_on_request`) failed to load; the message says
    why. The other models keep serving; another node may have it."""

    code = "model_load_failed"


class ModelLoading(NotReady):
    """An inference request names a model still on its way in (loading or warming)."""

    code = "model_loading"


class ModelUnloading(NotReady):
    """An inference request names a model whose unload has begun; another node may serve it."""

    code = "model_unloading"


class Refused(AgentError):
    """Refused at once, before waiting: 429 with a Retry-After from the predicted wait."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int, param: str | None = "priority") -> None:
        super().__init__(message, param=param)
        self.retry_after_s = max(1, retry_after_s)

    def response_headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after_s)}


class QueueFull(Refused):
    """The request's priority tier already has as many requests waiting as allowed."""

    code = "queue_full"

    def __init__(self, priority: Priority, limit: int, retry_after_s: int = 1) -> None:
        super().__init__(f"the {priority.value} tier already has {limit} request(s) waiting (its maximum); "
                         f"retry after {max(1, retry_after_s)} s", retry_after_s)
        self.priority = priority
        self.limit = limit


class TargetUnreachable(Refused):
    """A sheddable tier's request whose predicted first token already misses the tier's target."""

    code = "target_unreachable"

    def __init__(self, priority: Priority, target_s: float, predicted_s: float, retry_after_s: int) -> None:
        super().__init__(f"the {priority.value} tier's time-to-first-token target of {target_s * 1000:.0f} ms "
                         f"cannot be met: the first token is predicted after {predicted_s * 1000:.0f} ms; "
                         f"retry after {max(1, retry_after_s)} s", retry_after_s)
        self.priority = priority


class DeadlineUnreachable(Refused):
    """A request whose predicted wait for a batch slot is already past its deadline."""

    code = "deadline_unreachable"

    def __init__(self, deadline_s: float, predicted_wait_s: float, retry_after_s: int) -> None:
        super().__init__(f"the request's deadline ({deadline_s * 1000:.0f} ms left to wait for a batch slot) cannot "
                         f"be met: a slot is predicted to free after {predicted_wait_s * 1000:.0f} ms; retry after "
                         f"{max(1, retry_after_s)} s or allow a longer deadline_ms", retry_after_s, param="deadline_ms")
        self.deadline_s = deadline_s
        self.predicted_wait_s = predicted_wait_s


class WaitBound(Refused):
    """A request whose predicted wait for a batch slot would age it into a more urgent,
    preempting tier's lane (`engine.scheduling.lane_wait_bound`)."""

    code = "wait_bound"

    def __init__(self, priority: Priority, lane: Priority, bound_s: float, predicted_wait_s: float,
                 retry_after_s: int) -> None:
        super().__init__(f"the {priority.value} tier's queue is too long: a batch slot is predicted to free after "
                         f"{predicted_wait_s:.1f} s, and a {priority.value} request waiting over {bound_s:.1f} s "
                         f"would be served in the {lane.value} tier's place; retry after {max(1, retry_after_s)} s",
                         retry_after_s)
        self.priority = priority
        self.lane = lane
        self.bound_s = bound_s
        self.predicted_wait_s = predicted_wait_s


class TierNotAllowed(AgentError):
    """The API key may not claim the tier asked for (`priority_scheduling.over_tier: reject`)."""

    status_code = 403
    error_type = "permission_error"
    code = "tier_not_allowed"

    def __init__(self, asked: Priority, allowed: Priority) -> None:
        super().__init__(f"priority: this API key may claim at most the {allowed.value} tier; "
                         f"it asked for {asked.value}", param="priority")
        self.asked = asked
        self.allowed = allowed


class InsufficientMemory(AgentError):
    """The request's projected KV cache (prompt + max_tokens) does not fit in the node's memory."""

    status_code = 503
    error_type = "service_unavailable"
    code = "insufficient_memory"
    headers: ClassVar[dict[str, str] | None] = _RETRY_SOON

    def __init__(self, message: str, shortfall_bytes: int) -> None:
        super().__init__(message, param="max_tokens")
        self.shortfall_bytes = shortfall_bytes


class DeadlineExceeded(AgentError):
    """The request's deadline passed while it waited for a batch slot; it never ran."""

    status_code = 504
    error_type = "timeout_error"
    code = "deadline_exceeded"

    def __init__(self) -> None:
        super().__init__("the request's deadline passed while it waited for a batch slot", param="deadline_ms")


class GenerationFailed(AgentError):
    status_code = 500
    error_type = "server_error"
    code = "generation_failed"
