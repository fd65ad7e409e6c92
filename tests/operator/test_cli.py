"""`mlxpool operator` argument parsing (pure; the process itself runs in test_operator)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxpool.operator.config import OperatorConfig
from mlxpool.operator.main import parse_args


def test_defaults_reconcile_every_namespace_without_metrics(monkeypatch):
    monkeypatch.delenv("MLXPOOL_AGENT_TOKEN", raising=False)
    config, _ = parse_args([])
    assert config == OperatorConfig()
    assert config.namespaces == () and config.probe_interval is None and config.metrics_port is None


def test_the_agent_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MLXPOOL_AGENT_TOKEN", raising=False)
    assert parse_args([])[0].agent_token is None
    monkeypatch.setenv("MLXPOOL_AGENT_TOKEN", "from-env")
    assert parse_args([])[0].agent_token == "from-env"
    token = tmp_path / "token"
    token.write_text("from-file\n")
    config, _ = parse_args(["--agent-token-file", str(token)])
    assert config.agent_token == "from-file"
    assert "from-file" not in repr(config)  # never logged


@pytest.mark.parametrize(("content", "message"), [(None, "No such file or directory"), ("\n", "the file is empty")])
def test_an_unusable_token_file_is_refused(tmp_path, capsys, content, message):
    token = tmp_path / "token"
    if content is not None:
        token.write_text(content)
    with pytest.raises(SystemExit):
        parse_args(["--agent-token-file", str(token)])
    assert message in capsys.readouterr().err


def test_flags(monkeypatch):
    monkeypatch.delenv("MLXPOOL_AGENT_TOKEN", raising=False)
    config, args = parse_args(["--kubeconfig", "/k", "-n", "a", "--namespace", "b", "--probe-interval", "0.5",
                               "--probe-timeout", "0.2", "--node-stale-seconds", "9", "--metrics-port", "0",
                               "--liveness", "http://127.0.0.1:8081/healthz", "--log-format", "json",
                               "--agent-timeout", "3", "--report-interval", "2", "--scrape-interval", "4",
                               "--load-retry-seconds", "60", "--resync-interval", "20",
                               "--orphan-grace-seconds", "7"])
    assert config == OperatorConfig(kubeconfig=Path("/k"), namespaces=("a", "b"), probe_interval=0.5,
                                    probe_timeout=0.2, node_stale_after=9.0, metrics_port=0,
                                    liveness_endpoint="http://127.0.0.1:8081/healthz", agent_timeout=3.0,
                                    report_interval=2.0, scrape_interval=4.0, load_retry_after=60.0,
                                    resync_interval=20.0, orphan_grace=7.0)
    assert args.log_format == "json"


def test_the_owner_on_the_agents_carries_the_namespace_scope():
    assert OperatorConfig().owner == "mlxpool-operator"
    assert OperatorConfig(namespaces=("b", "a")).owner == "mlxpool-operator:a,b"
    many = OperatorConfig(namespaces=tuple(f"namespace-{i}" for i in range(40))).owner
    assert many.startswith("mlxpool-operator:") and len(many) <= 253


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


def test_a_shard_is_a_pool_selector_and_a_peering_name(monkeypatch):
    monkeypatch.delenv("MLXPOOL_AGENT_TOKEN", raising=False)
    config, _ = parse_args(["--pool-selector", " mlxpool.dev/shard=a ", "--shard", "a", "--priority", "5",
                            "--no-node-conditions"])
    assert config == OperatorConfig(pool_selector="mlxpool.dev/shard=a", shard="a", priority=5, node_conditions=False)
    assert config.peering_name == "mlxpool-a"
    assert OperatorConfig().peering_name is None  # standalone, as before


def test_shards_are_different_owners_on_the_agents():
    a, b = (OperatorConfig(pool_selector=f"mlxpool.dev/shard={s}").owner for s in "ab")
    assert a == "mlxpool-operator:[mlxpool.dev/shard=a]" and a != b
    assert OperatorConfig(namespaces=("x",), pool_selector="tier").owner == "mlxpool-operator:x[tier]"


@pytest.mark.parametrize(("argv", "message"), [
    (["--pool-selector", "a=b=c"], "--pool-selector: 'a=b=c'"),
    (["--pool-selector", ""], "--pool-selector: the selector is empty"),
    (["--shard", "Shard_A"], "'Shard_A': lowercase letters"),
])
def test_a_bad_shard_is_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err
