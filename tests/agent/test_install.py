"""`mlxpool agent install|uninstall`: the files a Mac gets, checked on Linux.

Real here: the files written (under a temporary root), the plist parsed back with
plistlib, the runtime file loaded by the agent's own config loader and the service's
arguments parsed by the agent's own parser. Not run: launchctl (macOS only; printed).
"""

from __future__ import annotations

import plistlib
import stat
from pathlib import Path

import pytest

from mlxpool import cli
from mlxpool.agent.config import load_runtime_config
from mlxpool.agent.main import build_parser
from mlxpool.agentinstall import EXIT_TIMEOUT, LABEL


def _install(root: Path, *extra: str) -> int:
    return cli.main(["agent", "install", "--root", str(root), "--program", "/opt/mlxpool/bin/mlxpool", *extra])


@pytest.mark.parametrize(("system", "plist_at", "config_at"), [
    (False, "Library/LaunchAgents", "Library/Application Support/mlxpool"),
    (True, "/Library/LaunchDaemons", "/etc/mlxpool"),
])
def test_install_writes_config_token_and_a_valid_plist(system: bool, plist_at: str, config_at: str, tmp_path: Path,
                                                       tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "mac"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    flags = ["--system"] if system else []
    assert _install(root, *flags, "--model", str(tiny_model), "--kubeconfig", str(kubeconfig),
                    "--advertise-url", "http://mac-1.local:8100", "--label", "mlxpool.dev/role=inference") == 0
    out = capsys.readouterr().out
    assert "launchctl was not run" in out and "launchctl bootstrap" in out  # honest: not macOS here

    home = Path.home().relative_to("/")
    base = root if system else root / home
    plist_file = base / plist_at.lstrip("/") / f"{LABEL}.plist"
    job = plistlib.loads(plist_file.read_bytes())
    assert job["Label"] == LABEL and job["KeepAlive"] is True and job["RunAtLoad"] is True
    assert job["ExitTimeOut"] == EXIT_TIMEOUT > 30  # longer than the agent's default drain
    assert ("UserName" in job) is system
    program, command, *args = job["ProgramArguments"]
    assert (program, command) == ("/opt/mlxpool/bin/mlxpool", "agent")
    parsed = build_parser().parse_args(args)  # the agent accepts exactly these arguments
    assert parsed.model == tiny_model and str(parsed.kubeconfig) == str(kubeconfig)
    assert parsed.advertise_url == "http://mac-1.local:8100" and parsed.label == ["mlxpool.dev/role=inference"]

    # The paths in the job are the Mac's (no staging root), and the files exist under root.
    config_dir = base / config_at.lstrip("/")
    assert str(parsed.config) == "/" + str((config_dir / "config.yaml").relative_to(root))
    assert not job["StandardOutPath"].startswith(str(root))
    token = config_dir / "ops-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) == 64
    runtime = load_runtime_config(config_dir / "config.yaml", environ={})
    assert str(runtime.auth.ops_token_file) == "/" + str(token.relative_to(root))

    # A second install keeps the token (the operator holds it already).
    before = token.read_text()
    assert _install(root, *flags) == 0
    assert token.read_text() == before

    assert cli.main(["agent", "uninstall", "--root", str(root), *flags]) == 0
    assert not plist_file.exists() and token.exists()
    assert "launchctl bootout" in capsys.readouterr().out
    assert cli.main(["agent", "uninstall", "--root", str(root), "--purge", *flags]) == 0
    assert not config_dir.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "0"], "--port must be between 1 and 65535"),
    (["--model", "/nonexistent"], "--model /nonexistent: no config.json"),
    (["--kubeconfig", "/nonexistent/kc"], "--kubeconfig /nonexistent/kc: no such file"),
])
def test_install_rejects_bad_arguments_naming_them(args: list[str], message: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        _install(tmp_path, *args)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.plist"))


def test_the_shipped_plist_sample_parses(tmp_path: Path) -> None:
    from mlxpool.dev.controlplane import REPO_ROOT

    job = plistlib.loads((REPO_ROOT / "manifests" / "launchd" / f"{LABEL}.plist").read_bytes())
    assert job["Label"] == LABEL and job["ProgramArguments"][1] == "agent"
    build_parser().parse_args(job["ProgramArguments"][2:])
