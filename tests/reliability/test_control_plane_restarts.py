"""The operator and the kube-apiserver restarted under a live pool, real processes: the
real apiserver + etcd of the session, the real operator, two real agents (registered,
heartbeating every second, an API key and the ops token) and a real router following the
pool's ConfigMap.

- The pool's first placement loads the model once, on one agent (no churn).
- The operator killed (SIGKILL) in the middle of a scale-up, and a scale-down made while
  none runs: the next operator finishes the first and carries out the second, each once
  (every agent loads the model at most once, unloads it at most once).
- kube-apiserver stopped and started again on its port (etcd keeps the data): clients keep
  being served through the router meanwhile, the agents' heartbeats (Leases) resume by
  themselves, the operator's watches reconnect (a scale after the restart is acted on).
- Nothing the suite produced (every process's log, the apiserver's objects and Events)
  contains the ops token or the API key.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml

from mlxpool.dev import components
from mlxpool.dev.controlplane import SYSTEM_NAMESPACE, ControlPlane
from mlxpool.dev.processes import Process, wait_for
from mlxpool.resources import ROUTES_DATA_KEY, routes_configmap_name
from mlxpool.routing import RoutingTable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

OPS = "ops-restarts-5d1e0c9b8a7f"
KEY = "sk-restarts-3c2b1a0f9e8d"


def models(agent: Process) -> list[tuple[str, str]]:
    report = httpx.get(agent.base_url + "/v1/node", headers={"authorization": f"Bearer {OPS}"}, timeout=10).json()
    return sorted((m["name"], m["phase"]) for m in report["models"])


def loads_and_unloads(agent: Process) -> tuple[int, int]:
    text = agent.log_text()
    return text.count("model ready name=tiny"), text.count("model unloaded name=tiny")


def table_urls(cp: ControlPlane, namespace: str) -> list[str]:
    out = cp.kubectl("get", "configmap", routes_configmap_name("pool"), "-n", namespace, "-o", "json", check=False)
    if out.returncode != 0:
        return []
    table = RoutingTable.from_json(json.loads(out.stdout)["data"][ROUTES_DATA_KEY])
    return sorted(e.url for e in table.endpoints_for("tiny"))


def lease_renewed(cp: ControlPlane, node: str) -> float:
    """The node's Lease renewTime, as a Unix time."""
    out = cp.kubectl("get", "lease", node, "-n", SYSTEM_NAMESPACE, "-o", "jsonpath={.spec.renewTime}")
    return datetime.fromisoformat(out.stdout.replace("Z", "+00:00")).timestamp()


def _delta(after: list[tuple[int, int]], before: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)]


def scale(cp: ControlPlane, namespace: str, replicas: int) -> None:
    cp.kubectl("scale", "inferencepool/pool", "-n", namespace, f"--replicas={replicas}")


def test_operator_and_apiserver_restarted_under_a_live_pool(controlplane: ControlPlane, namespace, tiny_model,
                                                            tmp_path: Path):
    cp = controlplane
    logs = tmp_path / "logs"
    ops, keys = tmp_path / "ops-token", tmp_path / "api-keys"
    ops.write_text(OPS + "\n")
    keys.write_text(KEY + "\n")
    label = {"mlxpool.dev/test": namespace}
    nodes = [f"{namespace}-agent-{i}"[:63] for i in range(2)]
    operator_args = {"kubeconfig": cp.kubeconfig("operator"), "agent_token_file": ops,
                     "extra": ["--namespace", namespace, "--report-interval", "0.5"]}
    procs: list[Process] = []
    # A freshly started apiserver answers lists 429 while its watch cache initializes; the
    # restarts below are what is measured, not an operator started into that.
    wait_for(lambda: cp.kubectl("get", "inferencepools", "-A", check=False).returncode == 0, 30,
             "the apiserver to list pools")
    try:
        procs.append(operator := components.start_operator(logs, **operator_args))
        agents = [components.start_agent(None, logs, name=f"agent-{i}", kubeconfig=cp.kubeconfig("agent"),
                                         node_name=nodes[i], labels=label, ops_token_file=ops,
                                         extra=["--api-key-file", str(keys), "--no-warmup"])
                  for i in range(2)]
        procs += agents
        procs.append(router := components.start_router(logs, pool=f"{namespace}/pool",
                                                       kubeconfig=cp.kubeconfig("router")))
        pool = {"apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
                "metadata": {"name": "pool", "namespace": namespace},
                "spec": {"models": [{"name": "tiny", "source": f"file://{tiny_model}"}], "replicas": 1,
                         "nodeSelector": {"matchLabels": label}}}
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool))
        cp.kubectl("wait", "--for=condition=Ready", "inferencepool/pool", "-n", namespace, "--timeout=90s")
        urls = sorted(a.base_url for a in agents)
        wait_for(lambda: sorted(len(models(a)) for a in agents) == [0, 1], 30, "the model on one agent")
        before = [loads_and_unloads(a) for a in agents]
        # The first placement is made once: no load, unload and reload while the node that
        # loads the model is slow to answer (it churned so: [(1, 1), (2, 1)], test_first_load).
        assert sorted(before) == [(0, 0), (1, 0)], f"(loads, unloads) per agent after the first placement: {before}"

        # ---- the operator killed mid-change, and a change made while none runs ----
        scale(cp, namespace, 2)
        os.kill(operator.pid, signal.SIGKILL)
        operator.popen.wait(10)
        procs.append(operator := components.start_operator(logs, name="operator-2", **operator_args))
        started = time.monotonic()
        wait_for(lambda: all(models(a) == [("tiny", "ready")] for a in agents) and table_urls(cp, namespace) == urls,
                 60, "both agents serving after the operator restart")
        scale_up_s = time.monotonic() - started
        grown = [loads_and_unloads(a) for a in agents]
        assert sorted(_delta(grown, before)) == [(0, 0), (1, 0)], f"(loads, unloads) per agent: {before} -> {grown}"
        operator.stop(10)
        scale(cp, namespace, 1)
        procs.append(operator := components.start_operator(logs, name="operator-3", **operator_args))
        started = time.monotonic()
        wait_for(lambda: sorted(len(models(a)) for a in agents) == [0, 1] and len(table_urls(cp, namespace)) == 1,
                 60, "one agent unloaded after the scale-down made while no operator ran")
        scale_down_s = time.monotonic() - started
        counts = [loads_and_unloads(a) for a in agents]
        assert sorted(_delta(counts, grown)) == [(0, 0), (0, 1)], f"(loads, unloads) per agent: {grown} -> {counts}"

        # ---- kube-apiserver restarted: clients served meanwhile, heartbeats and watches resume ----
        serving = next(a for a in agents if models(a))
        statuses: list[int | str] = []
        stop = threading.Event()

        def ask() -> None:
            with httpx.Client(timeout=10) as client:
                for _ in range(2000):
                    if stop.is_set():
                        return
                    try:
                        reply = client.post(router.base_url + "/v1/completions",
                                            headers={"authorization": f"Bearer {KEY}"},
                                            json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
                        statuses.append(reply.status_code)
                    except httpx.HTTPError as exc:
                        statuses.append(type(exc).__name__)
                    time.sleep(0.05)

        asker = threading.Thread(target=ask)
        asker.start()
        try:
            down_s = cp.restart_apiserver()
            back = time.time()
            restarted = time.monotonic()
            for node in nodes:
                wait_for(lambda node=node: lease_renewed(cp, node) > back, 30, f"{node}'s heartbeat after the restart")
            heartbeat_s = time.monotonic() - restarted
        finally:
            stop.set()
            asker.join(30)
        assert statuses and all(s == 200 for s in statuses), f"requests failed while the apiserver was down: {statuses}"
        started = time.monotonic()
        scale(cp, namespace, 2)
        wait_for(lambda: all(models(a) == [("tiny", "ready")] for a in agents) and table_urls(cp, namespace) == urls,
                 60, "the scale made after the apiserver restart")
        rescale_s = time.monotonic() - started
        after_restart = [loads_and_unloads(a) for a in agents]
        assert sorted(_delta(after_restart, counts)) == [(0, 0), (1, 0)], f"{counts} -> {after_restart}"
        assert models(serving) == [("tiny", "ready")]

        # ---- no secret anywhere the suite's processes wrote ----
        objects = cp.kubectl("get", "inferencepools,inferencenodes,configmaps,events,leases", "-A",
                             "-o", "json").stdout
        assert "inferencenode" in objects.lower() and namespace in objects
    finally:
        for proc in reversed(procs):
            proc.stop(10)
        cp.kubectl("delete", "inferencepool", "pool", "-n", namespace, "--wait=false", check=False)
        cp.kubectl("delete", "inferencenodes", "-l", f"mlxpool.dev/test={namespace}", "--wait=false", check=False)
    produced = objects + "".join(p.read_text(errors="replace") for p in logs.rglob("*.log"))
    produced += (cp.workdir / "kube-apiserver.log").read_text(errors="replace")
    for secret in (OPS, KEY):
        assert secret not in produced, "a secret leaked into a log, an object's status or an Event"
    print(f"operator killed mid scale-up: done {scale_up_s:.1f}s after the new one started; scale-down made "
          f"while none ran: done in {scale_down_s:.1f}s; each action once (loads, unloads per agent "
          f"{before} -> {grown} -> {counts}). "
          f"kube-apiserver down {down_s:.1f}s: {len(statuses)} requests through the router, all 200; "
          f"heartbeats resumed {heartbeat_s:.1f}s after it was back; a later scale done in {rescale_s:.1f}s")
