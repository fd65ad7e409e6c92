"""First-use observability against real parts: the real apiserver, the operator, two agents
(sharing KV through a real redis-server) and a router, started once for this module.

- Every metric that the Grafana dashboard and the Prometheus alert rules reference
  (manifests/observability) is exported by a real agent, router or operator: the PromQL
  is parsed with promql-parser and the names compared with what /metrics serves.
- `mlxpool status` summarises the pool and its nodes as the objects say, and a pool's
  ready count agrees with its nodes' READY, before and after an agent dies.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mlxpool import status
from mlxpool.dev.components import start_agent, start_operator, start_router
from mlxpool.dev.controlplane import REPO_ROOT, ControlPlane
from mlxpool.dev.processes import Process, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

OBSERVABILITY = REPO_ROOT / "manifests" / "observability"
PROMETHEUS_OWN = {"up", "scrape_duration_seconds"}
"""Series Prometheus itself makes for every target (none referenced now; allowed if they are)."""
TARGET_LABELS = {"instance", "job", "namespace", "pod", "service", "container", "endpoint"}
"""Labels Prometheus adds from the scrape target (kubernetes_sd / ServiceMonitor relabelling)."""


# ---- what the dashboard and the rules reference ----

def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus would see."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?[a-zA-Z_]+\}?", "x", expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, and the metric of every label_values() variable."""
    dash = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    queries = [(f"panel {panel['title']!r}", grafana_to_promql(target["expr"]))
               for panel in dash["panels"] for target in panel.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert match, f"variable {var['name']}: not a label_values(metric, label) query"
            queries.append((f"variable {var['name']}", match.group(1)))
    return queries


def rule_queries() -> list[tuple[str, str]]:
    body = yaml.safe_load((OBSERVABILITY / "prometheus-rules.yaml").read_text())
    return [(f"alert {rule['alert']}", rule["expr"]) for group in body["spec"]["groups"] for rule in group["rules"]]


@dataclass(frozen=True)
class Selector:
    where: str
    metric: str
    labels: frozenset[str]


def selectors(where: str, expr: str) -> list[Selector]:
    found: list[Selector] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            labels = frozenset(m.name for m in node.matchers.matchers if m.name != "__name__")
            found.append(Selector(where, node.name, labels))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def test_the_kustomization_builds_the_dashboard_configmap_and_the_rules(controlplane: ControlPlane):
    built = list(yaml.safe_load_all(controlplane.kubectl("kustomize", str(OBSERVABILITY)).stdout))
    kinds = {doc["kind"]: doc for doc in built}
    assert set(kinds) == {"ConfigMap", "PrometheusRule"}
    dashboard = kinds["ConfigMap"]
    assert dashboard["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert json.loads(dashboard["data"]["mlxpool.json"])["uid"] == "mlxpool-overview"


def test_the_dashboard_and_the_rules_are_well_formed():
    dash = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(p.get("targets") for p in dash["panels"] if p["type"] != "row")
    rules = yaml.safe_load((OBSERVABILITY / "prometheus-rules.yaml").read_text())["spec"]["groups"]
    names = [r["alert"] for g in rules for r in g["rules"]]
    assert len(names) == len(set(names))
    for group in rules:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
    for where, expr in dashboard_queries() + rule_queries():
        assert selectors(where, expr), f"{where}: no metric in {expr!r}"
    # What the issue asks alerts for, each covered by at least one rule.
    text = json.dumps(rules)
    for metric in ("mlxpool_operator_node_ready", "mlxpool_time_to_first_token_seconds_bucket",
                   "mlxpool_requests_waiting", 'reason=\\"memory\\"', "mlxpool_shared_kv_errors_total"):
        assert metric in text, metric


# ---- the real stack ----

@dataclass
class Stack:
    namespace: str
    names: list[str]
    agents: list[Process]
    router: Process
    operator: Process
    model: str


@pytest.fixture(scope="module")
def stack(controlplane: ControlPlane, tiny_model: Path, redis_server: Process,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("observability")
    logs = tmp / "logs"
    namespace = f"obs-{uuid.uuid4().hex[:8]}"
    label = {"mlxpool.dev/test": namespace}
    config = tmp / "runtime.yaml"
    config.write_text(f"distributed_cache: {{redis_url: '{redis_server.url}', key_prefix: '{namespace}'}}\n")
    controlplane.kubectl("create", "namespace", namespace)
    names = [f"{namespace}-agent-{i}" for i in range(2)]
    procs: list[Process] = []
    try:
        with ThreadPoolExecutor(3) as pool:  # the three start in parallel: each waits for its ready line
            operator_f = pool.submit(start_operator, logs, kubeconfig=controlplane.kubeconfig("operator"),
                                     extra=["--namespace", namespace, "--probe-interval", "0.5"])
            agent_fs = [pool.submit(start_agent, tiny_model, logs, name=f"agent-{i}", node_name=names[i],
                                    kubeconfig=controlplane.kubeconfig("agent"), labels=label,
                                    extra=["--config", str(config)]) for i in range(2)]
            operator = operator_f.result()
            procs.append(operator)
            agents = [f.result() for f in agent_fs]
            procs.extend(agents)
        controlplane.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": "tiny", "namespace": namespace},
            "spec": {"replicas": 2, "models": [{"name": tiny_model.name}], "nodeSelector": {"matchLabels": label}},
        }))
        router = start_router(logs, pool=f"{namespace}/tiny", kubeconfig=controlplane.kubeconfig("router"))
        procs.append(router)
        controlplane.kubectl("wait", "--for=condition=Ready", "inferencepool/tiny", "-n", namespace,
                             "--timeout=60s")
        yield Stack(namespace, names, agents, router, operator, tiny_model.name)
    finally:
        for proc in reversed(procs):
            proc.stop()
        controlplane.kubectl("delete", "inferencenodes", "-l", f"mlxpool.dev/test={namespace}", "--wait=false",
                             check=False)
        controlplane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def exported(url: str) -> dict[str, set[str]]:
    """Series names a /metrics serves, each with the label names seen on its samples."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    names: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count"),
                "gauge": ("",), "unknown": ("",), "info": ("_info",)}
    for family in text_string_to_metric_families(text):
        # Families without samples yet (a labelled counter nobody incremented) still count as exported.
        for suffix in suffixes.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def test_every_metric_the_dashboard_and_rules_use_is_exported(stack: Stack):
    # Traffic first, so the histograms and per-model series carry their labels.
    for stream in (False, True):
        r = httpx.post(f"{stack.router.url}/v1/completions", timeout=60, json={
            "model": stack.model, "prompt": "Hello there", "max_tokens": 4, "temperature": 0, "stream": stream})
        assert r.status_code == 200, r.text
    wait_for(lambda: "mlxpool_operator_node_ready{" in httpx.get(f"{stack.operator.url}/metrics").text, 10,
             "the operator to export its node verdicts")
    series: dict[str, set[str]] = {}
    sources: dict[str, str] = {}
    for source, url in [("agent", stack.agents[0].url), ("router", stack.router.url),
                        ("operator", stack.operator.url)]:
        for name, labels in exported(url).items():
            series.setdefault(name, set()).update(labels)
            sources[name] = source

    missing, wrong_labels = [], []
    for where, expr in dashboard_queries() + rule_queries():
        for sel in selectors(where, expr):
            if sel.metric in PROMETHEUS_OWN:
                continue
            if sel.metric not in series:
                missing.append(f"{where}: {sel.metric}")
            elif series[sel.metric] and not sel.labels <= series[sel.metric] | TARGET_LABELS:
                wrong_labels.append(f"{where}: {sel.metric}{sorted(sel.labels)} has {sorted(series[sel.metric])}")
    assert not missing, "referenced but not exported:\n" + "\n".join(missing)
    assert not wrong_labels, "selected on labels the metric lacks:\n" + "\n".join(wrong_labels)

    text = httpx.get(f"{stack.operator.url}/metrics").text
    for name in stack.names:
        assert f'mlxpool_operator_node_ready{{node="{name}"}} 1.0' in text


# ---- mlxpool status ----

def summary_now(controlplane: ControlPlane, namespace: str) -> status.Summary:
    snapshot = asyncio.run(status.fetch(controlplane.kubeconfig("admin"), namespace, events=50))
    return status.summarise(snapshot, datetime.now(UTC), events=50)


def kubectl_json(controlplane: ControlPlane, *args: str) -> dict:
    return json.loads(controlplane.kubectl("get", *args, "-o", "json").stdout)


def test_status_summarises_the_pool_and_its_nodes_and_they_agree(controlplane: ControlPlane, stack: Stack):
    namespace, names = stack.namespace, stack.names

    def settled() -> status.Summary | None:
        s = summary_now(controlplane, namespace)
        nodes = [n for n in s.nodes if n.name in names]
        ok = (s.pools and s.pools[0].ready == "2/2" and len(nodes) == 2 and all(n.ready == "True" for n in nodes)
              and not s.disagreements)
        return s if ok else None

    def agreeing() -> tuple[status.Summary, dict] | None:
        # Read twice: the routing revision may move between the summary and kubectl's read.
        summary = settled()
        if summary is None:
            return None
        live = kubectl_json(controlplane, "inferencepool", "tiny", "-n", namespace)
        return (summary, live) if summary.pools[0].revision == live["status"]["routingRevision"] else None

    summary, live = wait_for(agreeing, 20, "the pool 2/2, both nodes READY True, the same routing revision")
    (row,) = summary.pools
    assert (row.namespace, row.name, row.status, row.models) == (namespace, "tiny", "True", [stack.model])
    assert row.revision == live["status"]["routingRevision"] and row.revision >= 1
    assert sorted(row.nodes) == sorted(names)
    for node in (n for n in summary.nodes if n.name in names):
        inode = kubectl_json(controlplane, "inferencenode", node.name)
        assert node.models == [stack.model] and node.agent_ready
        assert node.memory == inode["spec"]["hardware"]["memory"] and node.memory.endswith(" GiB")
        assert node.free.endswith(" GiB")
        assert node.heartbeat_age_seconds is not None and node.heartbeat_age_seconds < 15  # the Lease, renewed each 1 s
        assert node.pools == [f"{namespace}/tiny"]
    assert any(e.object == f"InferencePool/{namespace}/tiny" for e in summary.events), summary.events

    # The CLI prints the same thing, as text and as JSON.
    cli = [sys.executable, "-m", "mlxpool", "status", "--kubeconfig", str(controlplane.kubeconfig("admin")),
           "-n", namespace]
    text = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "POOLS:" in text and "NODES:" in text and "EVENTS:" in text and "DISAGREEMENTS" not in text
    pool_line = next(line for line in text.splitlines() if line.split()[:2] == [namespace, "tiny"])
    assert pool_line.split()[2:4] == ["2/2", "True"]
    as_json = json.loads(subprocess.run([*cli, "-o", "json"], capture_output=True, text=True, timeout=60,
                                        check=True).stdout)
    assert as_json["pools"][0]["ready"] == "2/2"

    # One agent dies: the pool counts 1, that node's READY goes False, and the two still agree.
    stack.agents[0].popen.kill()
    stack.agents[0].popen.wait()

    def dropped() -> status.Summary | None:
        s = summary_now(controlplane, namespace)
        verdict = {n.name: n.ready for n in s.nodes}
        ok = (s.pools[0].ready == "1/2" and verdict.get(names[0]) != "True" and verdict.get(names[1]) == "True"
              and not s.disagreements)
        return s if ok else None

    summary = wait_for(dropped, 30, "the pool at 1/2 and the dead node not READY")
    assert summary.pools[0].nodes == [names[1]]
    # kubectl's printer columns say the same as the summary.
    header, *printed = controlplane.kubectl("get", "inferencenode", names[0], names[1]).stdout.splitlines()
    start, end = header.index("READY"), header.index("REPORTED")  # cells hold spaces ("0.5 GiB"): slice by header
    ready_column = {line.split()[0]: line[start:end].strip() for line in printed}
    assert ready_column[names[1]] == "True" and ready_column[names[0]] != "True", printed
    # And the operator's metric, which the NodeDown alert reads, follows the verdict.
    wait_for(lambda: f'mlxpool_operator_node_ready{{node="{names[0]}"}} 0.0'
             in httpx.get(f"{stack.operator.url}/metrics").text, 10, "the node_ready gauge to drop")
