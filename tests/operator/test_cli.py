"""`mlxpool operator` argument parsing (pure; the process itself runs in test_operator)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxpool.operator.config import OperatorConfig
from mlxpool.operator.main import parse_args


def test_defaults_reconcile_every_namespace_without_metrics():
    config, _ = parse_args([])
    assert config == OperatorConfig()
    assert config.namespaces == () and config.probe_interval is None and config.metrics_port is None


def test_flags():
    config, args = parse_args(["--kubeconfig", "/k", "-n", "a", "--namespace", "b", "--probe-interval", "0.5",
                               "--probe-timeout", "0.2", "--node-stale-seconds", "9", "--metrics-port", "0",
                               "--liveness", "http://127.0.0.1:8081/healthz", "--log-format", "json"])
    assert config == OperatorConfig(kubeconfig=Path("/k"), namespaces=("a", "b"), probe_interval=0.5,
                                    probe_timeout=0.2, node_stale_after=9.0, metrics_port=0,
                                    liveness_endpoint="http://127.0.0.1:8081/healthz")
    assert args.log_format == "json"


@pytest.mark.parametrize("argv", [
    ["--namespace", "a", "--all-namespaces"],
    ["--probe-interval", "0"],
    ["--probe-timeout", "-1"],
    ["--log-format", "xml"],
])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert "usage: mlxpool operator" in capsys.readouterr().err
