"""The ModelCache status the operator wants: per-node phases and conditions. Pure.

Each selected node's entry mirrors what its agent says about the cache key (phase,
progress in percent, bytes, measured load time, message); a node whose agent has not
been asked yet, or holds nothing yet, is `Pending`. A cache is Ready when every
selected node holds the copy in a finished phase: `Cached` or better, or `Warm` or
better when `spec.warm` asks for it (an agent that cannot pin says so in its message
and stays `Warm`; that counts, it does not pretend).

Once a model is loaded from the copy, the node's entry also says where its weights are
(`weights`: total, resident, pinned and mapped bytes, summed over the models loaded from
the copy there, with their names), from the node's InferenceNode status
(`models[].weights`); a node serving nothing from the copy has no `weights`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from mlxpool.agentapi import CacheEntry, CachePhase
from mlxpool.nodes import WeightsResidency, gib
from mlxpool.operator.logic.conditions import DEGRADED, PROGRESSING, READY, set_condition
from mlxpool.operator.logic.specs import CacheSpec

_FINISHED = frozenset({CachePhase.CACHED, CachePhase.WARM, CachePhase.PINNED})
_WARMED = frozenset({CachePhase.WARM, CachePhase.PINNED})


def finished_phases(spec: CacheSpec) -> frozenset[CachePhase]:
    return _WARMED if spec.warm else _FINISHED


def cache_weights(key: str, path: str | None,
                  loaded: Iterable[tuple[str, str | None, WeightsResidency]]) -> dict[str, Any] | None:
    """`weights` of one node's entry: the residency of the node's models loaded from the copy
    of `key` at `path` (a model loaded from the cache has the entry's directory, named after
    the key, as its path; matched by name too, since the agent resolves symlinks in the path
    it reports). None when no loaded model there comes from the copy."""
    models: list[str] = []
    total = resident = pinned = mapped = 0
    for model, model_path, where in loaded:
        if model_path is None or not (model_path == path or PurePosixPath(model_path).name == key):
            continue
        models.append(model)
        total += where.total_bytes
        resident += where.resident_bytes
        pinned += where.pinned_bytes
        mapped += where.mapped_bytes
    if not models:
        return None
    return {"models": sorted(models), "totalBytes": total, "residentBytes": resident, "pinnedBytes": pinned,
            "mappedBytes": mapped}


def node_entry(node: str, entry: CacheEntry | None, message: str | None = None,
               weights: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One `status.nodes` item (`weights`: `cache_weights` of the node, if any)."""
    if entry is None:
        item: dict[str, Any] = {"node": node, "phase": CachePhase.PENDING.value}
    else:
        item = {"node": node, "phase": entry.phase.value, "progress": round(entry.progress * 100)}
        size = entry.bytes_total if entry.bytes_total is not None else entry.bytes_done
        if size:
            item["bytes"] = size
        if entry.load_time_seconds is not None:
            item["loadTimeSeconds"] = round(entry.load_time_seconds, 3)
        message = message or entry.message
        if weights:
            item["weights"] = dict(weights)
    if message:
        item["message"] = message[:1024]
    return item


def cache_status(*, spec: CacheSpec, key: str, generation: int, nodes: Sequence[Mapping[str, Any]],
                 previous: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    finished = finished_phases(spec)
    entries = sorted((dict(n) for n in nodes), key=lambda n: n["node"])
    done = [n["node"] for n in entries if n["phase"] in finished]
    failed = [f"{n['node']}: {n.get('message') or 'failed'}" for n in entries if n["phase"] == CachePhase.FAILED]
    waiting = len(entries) - len(done) - len(failed)
    goal = "warm" if spec.warm else "cached"
    conditions = [dict(c) for c in previous.get("conditions") or []]
    if not entries:
        ready = (False, "NoNodes", "no ready InferenceNode matches the nodeSelector")
    elif len(done) == len(entries):
        ready = (True, "Staged", f"{len(done)}/{len(entries)} nodes hold the model {goal}")
    else:
        ready = (False, "Staging", f"{len(done)}/{len(entries)} nodes hold the model {goal}")
    progressing = (True, "Staging", f"{waiting} node(s) still staging") if waiting else \
        (False, "Complete", "no node is staging")
    degraded = (True, "StagingFailed", "; ".join(failed)[:2048]) if failed else (False, "NoFailures", "no node failed")
    for type_, (status, reason, message) in ((READY, ready), (PROGRESSING, progressing), (DEGRADED, degraded)):
        conditions = set_condition(conditions, type=type_, status=status, reason=reason, message=message,
                                   generation=generation, now=now)
    result: dict[str, Any] = {
        "observedGeneration": generation,
        "cacheKey": key,
        "readySummary": f"{len(done)}/{len(entries)}",
        "nodes": entries,
        "conditions": conditions,
    }
    serving = [n["weights"] for n in entries if n.get("weights")]
    if serving:  # the printer column: bytes of the copy's weights in memory, all nodes together
        result["resident"] = gib(sum(w["residentBytes"] for w in serving))
    return result
