"""`mlxpool agent install|uninstall`: the agent as a launchd service on a Mac.

Metal is not available in Linux containers, so each Mac runs its agent natively, kept
alive by launchd (what `ollama` does with its menu-bar app and `brew services` with
plists). `install` writes three things and then asks launchd to start the service:
the runtime file (`config.yaml`: the ops token's path, the cache directory), the
operations token (random, mode 0600: give the same one to the operator's
`--agent-token-file`) and the plist, in the user domain (a LaunchAgent, runs while
that user is logged in, no root needed) or the system domain (a LaunchDaemon, at boot,
as `_mlxpool`). `uninstall` boots the service out and removes the plist; `--purge`
removes the config, token and logs too.

Everything but the `launchctl` calls is plain file writing, tested on Linux. The
`launchctl` calls (`_launchctl`) run only on macOS and have not run in this
project's CI (no Mac): elsewhere they are printed, not run.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

LABEL = "dev.mlxpool.agent"
SYSTEM_USER = "_mlxpool"
EXIT_TIMEOUT = 45
"""Seconds launchd waits after SIGTERM: above the agent's drain timeout (30 s by default)."""


class Domain(StrEnum):
    USER = "user"
    SYSTEM = "system"


@dataclass(frozen=True)
class Layout:
    """Where each file goes; `root` prefixes every path (tests, packaging into a staging dir)."""

    domain: Domain
    home: Path
    root: Path = Path("/")

    def _at(self, path: str | Path) -> Path:
        return self.root / Path(path).relative_to("/")

    @property
    def plist(self) -> Path:
        if self.domain is Domain.SYSTEM:
            return self._at(f"/Library/LaunchDaemons/{LABEL}.plist")
        return self._at(self.home / f"Library/LaunchAgents/{LABEL}.plist")

    @property
    def config_dir(self) -> Path:
        if self.domain is Domain.SYSTEM:
            return self._at("/etc/mlxpool")
        return self._at(self.home / "Library/Application Support/mlxpool")

    @property
    def log_dir(self) -> Path:
        if self.domain is Domain.SYSTEM:
            return self._at("/var/log/mlxpool")
        return self._at(self.home / "Library/Logs/mlxpool")

    @property
    def data_dir(self) -> Path:
        """The working directory and the model cache."""
        if self.domain is Domain.SYSTEM:
            return self._at("/var/lib/mlxpool")
        return self._at(self.home / "Library/Caches/mlxpool")

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.yaml"

    @property
    def token_file(self) -> Path:
        return self.config_dir / "ops-token"

    def on_the_mac(self, path: Path) -> str:
        """`path` as the service will see it (without `root`)."""
        return "/" + str(path.relative_to(self.root))


@dataclass(frozen=True)
class AgentOptions:
    program: Path
    """The `mlxpool` executable the service runs (default: the one running now)."""
    model: Path | None = None
    host: str = "0.0.0.0"
    port: int = 8100
    kubeconfig: Path | None = None
    advertise_url: str | None = None
    node_name: str | None = None
    labels: tuple[str, ...] = ()


def runtime_file(layout: Layout) -> dict[str, Any]:
    """The runtime file (config/runtime.yaml's keys) the service starts with."""
    return {
        "auth": {"ops_token_file": layout.on_the_mac(layout.token_file)},
        "weight_management": {"cache_dir": layout.on_the_mac(layout.data_dir / "models")},
    }


def plist(layout: Layout, options: AgentOptions) -> dict[str, Any]:
    """The launchd job, as plistlib writes it."""
    args = [str(options.program), "agent", "--config", layout.on_the_mac(layout.config_file),
            "--host", options.host, "--port", str(options.port)]
    if options.model is not None:
        args += ["--model", str(options.model)]
    if options.kubeconfig is not None:
        args += ["--kubeconfig", str(options.kubeconfig)]
        if options.advertise_url:
            args += ["--advertise-url", options.advertise_url]
        if options.node_name:
            args += ["--node-name", options.node_name]
        for label in options.labels:
            args += ["--label", label]
    log = layout.on_the_mac(layout.log_dir / "agent.log")
    job: dict[str, Any] = {
        "Label": LABEL,
        "ProgramArguments": args,
        "WorkingDirectory": layout.on_the_mac(layout.data_dir),
        "EnvironmentVariables": {"MLXPOOL_LOG_LEVEL": "INFO"},
        "RunAtLoad": True,
        "KeepAlive": True,
        "ThrottleInterval": 10,
        "ExitTimeOut": EXIT_TIMEOUT,
        "ProcessType": "Interactive",  # no App Nap / background throttling of inference
        "SoftResourceLimits": {"NumberOfFiles": 16384},
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }
    if layout.domain is Domain.SYSTEM:
        job["UserName"] = SYSTEM_USER
    return job


def launchctl_domain(domain: Domain) -> str:
    return "system" if domain is Domain.SYSTEM else f"gui/{os.getuid()}"


def install(layout: Layout, options: AgentOptions) -> list[list[str]]:
    """Write config, token (kept if present: the operator already has it) and plist;
    returns the launchctl commands that start the service."""
    for d in (layout.config_dir, layout.log_dir, layout.data_dir / "models", layout.plist.parent):
        d.mkdir(parents=True, exist_ok=True)
    layout.config_file.write_text(
        "# Written by `mlxpool agent install`; every key: config/runtime.yaml in the mlxpool repo.\n"
        + yaml.safe_dump(runtime_file(layout), sort_keys=False))
    if not layout.token_file.exists():
        fd = os.open(layout.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    layout.token_file.chmod(0o600)
    layout.plist.write_bytes(plistlib.dumps(plist(layout, options)))
    target = layout.on_the_mac(layout.plist)
    domain = launchctl_domain(layout.domain)
    return [["launchctl", "bootout", f"{domain}/{LABEL}"], ["launchctl", "bootstrap", domain, target]]


def uninstall(layout: Layout, purge: bool = False) -> tuple[list[list[str]], list[Path]]:
    """The launchctl command that stops the service (run before removing), and what was removed."""
    removed = []
    if layout.plist.exists():
        layout.plist.unlink()
        removed.append(layout.plist)
    if purge:
        for d in (layout.config_dir, layout.log_dir):
            if d.exists():
                shutil.rmtree(d)
                removed.append(d)
    return [["launchctl", "bootout", f"{launchctl_domain(layout.domain)}/{LABEL}"]], removed


def _launchctl(commands: list[list[str]], *, tolerate_first: bool = False) -> None:
    """Apple-only: run the launchctl commands on macOS; elsewhere print them."""
    if sys.platform != "darwin":
        print("not macOS: launchctl was not run; on the Mac, run:")  # noqa: T201 (a terminal command)
        for cmd in commands:
            print("  " + " ".join(cmd))  # noqa: T201 (a terminal command)
        return
    for i, cmd in enumerate(commands):  # pragma: no cover - macOS only, not run in CI
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 and not (tolerate_first and i == 0):  # bootout of a job not loaded fails
            raise SystemExit(f"{' '.join(cmd)} failed: {result.stderr.strip()}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mlxpool agent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    for name in ("install", "uninstall"):
        s = sub.add_parser(name)
        s.add_argument("--system", action="store_true",
                       help="a LaunchDaemon at boot as _mlxpool (needs root); default: a LaunchAgent of this user")
        s.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    inst = sub.choices["install"]
    inst.add_argument("--model", type=Path, help="model folder to serve from the start")
    inst.add_argument("--host", default="0.0.0.0")
    inst.add_argument("--port", type=int, default=8100)
    inst.add_argument("--kubeconfig", type=Path, help="register an InferenceNode in this cluster")
    inst.add_argument("--advertise-url", help="URL the operator and routers reach this agent at")
    inst.add_argument("--node-name")
    inst.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    inst.add_argument("--program", type=Path, default=Path(sys.argv[0]).resolve(),
                      help="the mlxpool executable the service runs (default: this one)")
    sub.choices["uninstall"].add_argument("--purge", action="store_true",
                                          help="remove the config, the ops token and the logs too")
    args = p.parse_args(argv)
    layout = Layout(Domain.SYSTEM if args.system else Domain.USER, Path.home(), args.root)
    if args.action == "install":
        if not 1 <= args.port <= 65535:
            p.error(f"--port must be between 1 and 65535, not {args.port}")
        if args.model is not None and not (args.model / "config.json").is_file():
            p.error(f"--model {args.model}: no config.json in it (not a model folder)")
        if args.kubeconfig is not None and not args.kubeconfig.is_file():
            p.error(f"--kubeconfig {args.kubeconfig}: no such file")
        options = AgentOptions(args.program, args.model and args.model.resolve(), args.host, args.port,
                               args.kubeconfig and args.kubeconfig.resolve(), args.advertise_url,
                               args.node_name, tuple(args.label))
        commands = install(layout, options)
        print(f"wrote {layout.config_file}\nwrote {layout.token_file} (give it to the operator's "  # noqa: T201 (a terminal command)
              f"--agent-token-file)\nwrote {layout.plist}")
        _launchctl(commands, tolerate_first=True)
        return 0
    commands, removed = uninstall(layout, args.purge)
    _launchctl(commands, tolerate_first=True)
    print("removed: " + (", ".join(map(str, removed)) if removed else "nothing"))  # noqa: T201 (a terminal command)
    return 0
