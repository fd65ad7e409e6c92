"""GitOps fit: the operator never writes `spec`, and every status it writes says which
generation it saw (kstatus `observedGeneration`).

Argo CD and Flux own `spec` (it is what Git holds): an operator that wrote it would
fight them on every sync. The apiserver's managedFields record which manager set each
field, so the test reads them after the operator has reconciled a pool through a
scale, a node going unready and back, and a restart, and checks that no field under
`spec` of a pool or a node is owned by a manager that is not this test's own kubectl
(or the agent identity that registers the nodes)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.operator.test_operator import create_pool, eventually, routed

pytestmark = pytest.mark.integration


def spec_owners(obj: dict[str, Any]) -> set[str]:
    """Managers that own any field under `spec` (status-subresource entries excluded)."""
    return {m["manager"] for m in obj["metadata"].get("managedFields") or []
            if m.get("subresource") != "status" and "f:spec" in (m.get("fieldsV1") or {})}


def managers(obj: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m["manager"], m.get("subresource", "")) for m in obj["metadata"].get("managedFields") or []}


def test_operator_never_writes_spec(controlplane, namespace, nodes, health_servers, run_operator):
    cp = controlplane
    a, b = health_servers(), health_servers()
    nodes.register("a", a.url)
    nodes.register("b", b.url)
    create_pool(cp, namespace, nodes, replicas=1)

    def node(short: str) -> dict[str, Any]:
        return json.loads(cp.kubectl("get", "inferencenode", nodes.name(short), "-o", "json",
                                     "--show-managed-fields").stdout)

    def get_pool(*_: Any) -> dict[str, Any]:
        return json.loads(cp.kubectl("get", "inferencepool", "tiny", "-n", namespace, "-o", "json",
                                     "--show-managed-fields").stdout)

    pool0, nodes0 = get_pool(cp, namespace), {s: node(s) for s in "ab"}
    owners0 = {"pool": spec_owners(pool0), **{s: spec_owners(n) for s, n in nodes0.items()}}
    assert owners0["pool"] and owners0["a"], "managedFields are not recorded: the test could not see a spec writer"

    operator = run_operator(namespace, "--probe-interval", "0.25", "--resync-interval", "0.25")
    eventually(lambda: get_pool(cp, namespace).get("status", {}).get("observedGeneration") == 1, 20,
               "status at generation 1", operator)
    # Our own spec change (scale subresource), then a node that stops answering and comes back.
    cp.kubectl("scale", "inferencepool", "tiny", "-n", namespace, "--replicas=2")
    eventually(lambda: len(routed(cp, namespace)) == 2, 10, "scaled to two", operator)
    a.stop()
    eventually(lambda: len(routed(cp, namespace)) == 1, 15, "unhealthy node unrouted", operator)
    a.start()
    eventually(lambda: len(routed(cp, namespace)) == 2, 15, "node routed again", operator)
    operator.stop()
    operator = run_operator(namespace, "--probe-interval", "0.25", "--resync-interval", "0.25")
    time.sleep(1.0)

    pool = get_pool(cp, namespace)
    status = pool["status"]
    # kstatus: the status says which generation it describes, and so does Ready.
    assert pool["metadata"]["generation"] == 2 == status["observedGeneration"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["observedGeneration"] == 2 and ready["status"] == "True"

    # The operator wrote (it has managedFields of its own, on status) but never under spec.
    operator_managers = {m for m, sub in managers(pool) if sub == "status"} - {m for m, _ in managers(pool0)}
    assert operator_managers, f"no status writer recorded besides the test's own: {managers(pool)}"
    scalers = {m for m, sub in managers(pool) if sub == "scale"}
    assert spec_owners(pool) <= owners0["pool"] | scalers, managers(pool)
    assert not (spec_owners(pool) & operator_managers)
    for short, before in nodes0.items():
        after = node(short)
        assert after["metadata"]["generation"] == before["metadata"]["generation"], f"spec of node {short} changed"
        assert after["spec"] == before["spec"]
        assert spec_owners(after) == owners0[short], managers(after)
        node_ready = next(c for c in after["status"]["conditions"] if c["type"] == "Ready")
        assert node_ready["observedGeneration"] == after["metadata"]["generation"], node_ready
