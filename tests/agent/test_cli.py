"""`mlxpool agent` start-up: bad command lines and a taken port fail fast, with a message."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from mlxpool.agent.main import parse_config


def run_agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxpool", "agent", *args], capture_output=True, text=True,
                          timeout=60)


def test_defaults_come_from_the_model_directory(tiny_model: Path):
    config = parse_config(["--model", str(tiny_model)])
    assert config.model_name == "tiny" and config.model_path == tiny_model.resolve()
    assert (config.host, config.port, config.registration) == ("127.0.0.1", 8100, None)


def test_registration_options(tiny_model: Path, tmp_path: Path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("{}")
    config = parse_config(["--model", str(tiny_model), "--model-name", "chat", "--kubeconfig", str(kubeconfig),
                           "--node-name", "mac-1", "--label", "a=b", "--label", "mlxpool.dev/pool=p",
                           "--advertise-url", "http://10.0.0.5:8100", "--heartbeat-interval", "2"])
    assert config.model_name == "chat"
    reg = config.registration
    assert reg is not None
    assert (reg.node_name, reg.labels, reg.advertise_url, reg.heartbeat_interval) == (
        "mac-1", {"a": "b", "mlxpool.dev/pool": "p"}, "http://10.0.0.5:8100", 2.0)


def test_bad_command_lines_exit_2_naming_the_problem(tiny_model: Path, tmp_path: Path):
    missing = run_agent("--model", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "not a model directory" in missing.stderr
    label = run_agent("--model", str(tiny_model), "--label", "x=y")
    assert label.returncode == 2 and "need --kubeconfig" in label.stderr
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("{}")
    bad_label = run_agent("--model", str(tiny_model), "--kubeconfig", str(kubeconfig), "--label", "novalue")
    assert bad_label.returncode == 2 and "key=value" in bad_label.stderr
    bad_name = run_agent("--model", str(tiny_model), "--kubeconfig", str(kubeconfig), "--node-name", "Mac_1")
    assert bad_name.returncode == 2 and "DNS subdomain" in bad_name.stderr


def test_a_taken_port_exits_1(tiny_model: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_agent("--model", str(tiny_model), "--port", str(taken.getsockname()[1]))
    assert result.returncode == 1
    assert "agent failed to start" in result.stderr and "in use" in result.stderr


def test_the_agent_asks_glibc_for_huge_pages_once():
    from mlxpool.cli import HUGE_PAGES_TUNABLE, huge_pages_env

    thp = "always [madvise] never\n"
    env = huge_pages_env({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"}
    assert huge_pages_env(env, thp) is None  # already re-executed: no loop
    assert huge_pages_env({"MLXPOOL_HUGE_PAGES": "0"}, thp) is None
    assert huge_pages_env({}, "always madvise [never]\n") is None
    assert huge_pages_env({}, None) is None  # no THP setting (not Linux, or hidden)


def test_a_started_agent_runs_with_the_tunable(tmp_path: Path):
    # --help exits after parsing, so this shows the re-exec happened without serving anything.
    script = ("import os, sys; from mlxpool import cli; sys.argv = ['mlxpool', 'agent', '--help'];"
              "print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''), flush=True); cli.main()")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    lines = [x for x in done.stdout.splitlines() if x.startswith("TUNABLES=")]
    if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() and \
            "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        assert lines[-1].endswith("glibc.malloc.hugetlb=1"), done.stdout
