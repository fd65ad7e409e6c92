"""The local dev stack: control plane + operator + agents + router, all on loopback.

`up` starts everything detached and records it in `<workdir>/state.json`; `down` stops
exactly the processes recorded there (and checks each pid still runs the command it
started, so a recycled pid is never killed); `status` reports what runs where. The
stack outlives the command that started it, like `kind create cluster` does.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

from mlxpool.dev.components import start_agent, start_operator, start_router
from mlxpool.dev.controlplane import REPO_ROOT, SYSTEM_NAMESPACE, ControlPlane
from mlxpool.dev.processes import Process, pid_alive, stop_pid
from mlxpool.tinymodel import make_tiny

DEFAULT_WORKDIR = REPO_ROOT / ".mlxpool" / "dev"
AGENT_LABELS = {"mlxpool.dev/role": "inference"}
DEFAULT_POOL = "default/tiny"


@dataclass
class Member:
    name: str
    pid: int
    url: str | None
    log: str
    cmdline: str

    @classmethod
    def of(cls, proc: Process) -> Member:
        return cls(proc.name, proc.pid, proc.url, str(proc.log_path), _cmdline(proc.pid))


class StateFile:
    """`state.json` in a dataclass's `workdir`, with its `members`: what `down` stops later."""

    workdir: str

    @classmethod
    def load(cls, workdir: Path) -> Self | None:
        path = workdir / "state.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["members"] = [Member(**m) for m in raw["members"]]
        return cls(**raw)

    def save(self) -> None:
        (Path(self.workdir) / "state.json").write_text(json.dumps(asdict(self), indent=2))  # type: ignore[call-overload]  # subclasses are dataclasses


@dataclass
class StackState(StateFile):
    workdir: str
    server: str
    kubeconfig: str
    members: list[Member] = field(default_factory=list)

    def add(self, proc: Process) -> None:
        self.members.append(Member.of(proc))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except (FileNotFoundError, PermissionError):
        return ""


def same_process(member: Member) -> bool:
    """Alive and still the process we started (pids get recycled)."""
    if not pid_alive(member.pid):
        return False
    current = _cmdline(member.pid)
    return not current or not member.cmdline or current == member.cmdline


def up(workdir: Path = DEFAULT_WORKDIR, agents: int = 2, pool: str = DEFAULT_POOL) -> StackState:
    if (state := StackState.load(workdir)) and any(same_process(m) for m in state.members):
        raise RuntimeError(f"a dev stack is already running from {workdir}; run `mlxpool dev down` first")
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    cp = ControlPlane(workdir / "controlplane").start()
    state = StackState(str(workdir), cp.server, str(cp.kubeconfig("admin")))
    for proc in cp.processes:
        state.add(proc)
    state.save()
    try:
        cp.kubectl("create", "namespace", SYSTEM_NAMESPACE)
        crds = sorted((REPO_ROOT / "crds").glob("*.yaml"))
        cp.apply(*crds)
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", *[f"-f={c}" for c in crds])
        cp.kubectl("apply", "-k", str(REPO_ROOT / "manifests" / "rbac"))
        model = workdir / "models" / "tiny"
        if not (model / "model.safetensors").exists():
            make_tiny(model, "tiny")
        write_samples_overlay(workdir, model)
        token = ops_token_file(workdir)
        state.add(start_operator(logs, kubeconfig=cp.kubeconfig("operator"), agent_token_file=token))
        state.save()
        for i in range(agents):
            state.add(start_agent(model, logs, name=f"agent-{i}", kubeconfig=cp.kubeconfig("agent"),
                                  node_name=f"dev-agent-{i}", labels=AGENT_LABELS, ops_token_file=token))
            state.save()
        state.add(start_router(logs, pool=pool, kubeconfig=cp.kubeconfig("router")))
        state.save()
    except BaseException:
        down(workdir)
        raise
    return state


SAMPLES = REPO_ROOT / "manifests" / "samples"


def samples_overlay(workdir: Path) -> Path:
    return workdir / "samples"


def write_samples_overlay(workdir: Path, model: Path) -> Path:
    """A kustomization over manifests/samples whose ModelCache stages the dev stack's own tiny
    model: the sample's `file:///var/lib/mlxpool/models/tiny` is a Mac's path, absent here,
    and applying it as is left a ModelCache Failed on every dev agent."""
    overlay = samples_overlay(workdir)
    overlay.mkdir(parents=True, exist_ok=True)
    (overlay / "kustomization.yaml").write_text(
        "# Written by `mlxpool dev up`: manifests/samples with the ModelCache staged from this stack's model.\n"
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(SAMPLES, overlay)}\n"
        "patches:\n  - target: {kind: ModelCache, name: tiny}\n    patch: |-\n"
        "      - op: replace\n        path: /spec/source\n"
        f"        value: file://{model.resolve()}\n")
    return overlay


def ops_token_file(workdir: Path) -> Path:
    """The token the operator uses on the agents' operations API (made once, 0600)."""
    path = workdir / "ops-token"
    if not path.exists():
        path.write_text(secrets.token_hex(24))
        path.chmod(0o600)
    return path


def stop_member(member: Member) -> bool:
    """Stop `member` if it still runs what we started; True when it did."""
    if not same_process(member):
        return False
    stop_pid(member.pid)
    return True


def down(workdir: Path = DEFAULT_WORKDIR) -> list[str]:
    """Stop what `up` recorded, newest first; returns the names stopped."""
    state = StackState.load(workdir)
    if state is None:
        return []
    stopped = [member.name for member in reversed(state.members) if stop_member(member)]
    os.remove(Path(workdir) / "state.json")
    return stopped


def status(workdir: Path = DEFAULT_WORKDIR) -> list[dict]:
    state = StackState.load(workdir)
    if state is None:
        return []
    return [{"name": m.name, "pid": m.pid, "running": same_process(m), "url": m.url, "log": m.log}
            for m in state.members]
