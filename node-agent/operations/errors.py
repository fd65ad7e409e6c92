"""The operations API's domain errors; the agent's one error table maps them to HTTP.

Each is an `AgentError` subclass fixing status and code, so clients can branch on
`error.code` without parsing messages. The inference API's errors, the data plane's
and the engine's, are in `mlxpool.agent.errors`.
"""

from __future__ import annotations

from mlxpool.agent.errors import AgentError


class _Conflict(AgentError):
    status_code = 409
    error_type = "conflict_error"


class ModelConflict(_Conflict):
    """The name is taken by a model from another source."""

    code = "model_conflict"


class UnloadInProgress(_Conflict):
    """A load names a model whose unload has not finished yet; load it again once it is gone.

    (An inference request for such a model is `errors.ModelUnloading`, a 503.)
    """

    code = "model_unloading"


class MaxModelsReached(_Conflict):
    code = "max_models_reached"


class MemoryBudgetExceeded(AgentError):
    status_code = 507
    error_type = "insufficient_storage"
    code = "memory_budget_exceeded"


class CacheEntryNotFound(AgentError):
    status_code = 404
    error_type = "not_found_error"
    code = "cache_entry_not_found"


class CacheConflict(_Conflict):
    """The key is staged from another source."""

    code = "cache_conflict"


class CacheInUse(_Conflict):
    code = "cache_in_use"


class CacheNotReady(_Conflict):
    code = "cache_not_ready"


class PolicyNotFound(AgentError):
    """The model has no pool scheduling policy on this node (it runs under the node's defaults)."""

    status_code = 404
    error_type = "not_found_error"
    code = "scheduling_policy_not_found"
