"""A real Kubernetes control plane on loopback: etcd + kube-apiserver, no containers.

The binaries come from hack/build-control-plane.sh (built from Go modules, cached by
version). RBAC is on and clients authenticate with static tokens, one per identity:
an admin, and the operator, agent and router each as the ServiceAccount user they
would be in a cluster, so the RBAC manifests in manifests/rbac are exercised for real.

There is no kube-controller-manager: no garbage collection and namespaces never
finish terminating. Callers clean up what they create; the etcd data is thrown away.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from mlxpool.dev.processes import LOOPBACK, Process, free_port, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEM_NAMESPACE = "mlxpool-system"


def sa_user(name: str) -> str:
    return f"system:serviceaccount:{SYSTEM_NAMESPACE}:{name}"


# identity -> (user name, groups)
IDENTITIES: dict[str, tuple[str, list[str]]] = {
    "admin": ("mlxpool-admin", ["system:masters"]),
    "operator": (sa_user("mlxpool-operator"), ["system:serviceaccounts", f"system:serviceaccounts:{SYSTEM_NAMESPACE}"]),
    "agent": (sa_user("mlxpool-agent"), ["system:serviceaccounts", f"system:serviceaccounts:{SYSTEM_NAMESPACE}"]),
    "router": (sa_user("mlxpool-router"), ["system:serviceaccounts", f"system:serviceaccounts:{SYSTEM_NAMESPACE}"]),
}


def binaries_dir() -> Path:
    """Build or reuse the control-plane binaries; MLXPOOL_CONTROLPLANE_BIN overrides."""
    if env := os.environ.get("MLXPOOL_CONTROLPLANE_BIN"):
        return Path(env)
    out = subprocess.run([str(REPO_ROOT / "hack" / "build-control-plane.sh")],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class ControlPlane:
    """etcd + kube-apiserver under `workdir`; `start()` blocks until the API is ready."""

    workdir: Path
    bin_dir: Path = field(default_factory=binaries_dir)
    tokens: dict[str, str] = field(default_factory=lambda: {k: secrets.token_hex(16) for k in IDENTITIES})
    processes: list[Process] = field(default_factory=list)
    server: str = ""

    @property
    def kubectl_path(self) -> Path:
        return self.bin_dir / "kubectl"

    def kubeconfig(self, identity: str = "admin") -> Path:
        return self.workdir / f"kubeconfig-{identity}.yaml"

    def start(self, timeout: float = 90.0) -> ControlPlane:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_etcd()
        self._start_apiserver(timeout)
        for identity in IDENTITIES:
            self._write_kubeconfig(identity)
        return self

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://{LOOPBACK}:{client}"
        data = self.workdir / "etcd-data"
        shutil.rmtree(data, ignore_errors=True)
        etcd = Process.start("etcd", [
            str(self.bin_dir / "etcd"), "--data-dir", str(data), "--name", "mlxpool-dev",
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://{LOOPBACK}:{peer}",
            "--initial-advertise-peer-urls", f"http://{LOOPBACK}:{peer}",
            "--initial-cluster", f"mlxpool-dev=http://{LOOPBACK}:{peer}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ], self.workdir / "etcd.log")
        etcd.url = self.etcd_url
        self.processes.append(etcd)
        wait_for(lambda: httpx.get(f"{self.etcd_url}/health", timeout=1).json()["health"] == "true",
                 30, "etcd", etcd)

    def restart_apiserver(self, timeout: float = 90.0, grace: float = 2.0) -> float:
        """Stop kube-apiserver (SIGTERM, SIGKILL after `grace` seconds) and start it again on
        the same port, with the same certificates, tokens and etcd (so nothing stored is
        lost); returns the seconds it was unavailable. For disruption tests: clients must
        reconnect by themselves. With clients' watches open it does not exit on SIGTERM
        within 10 s here (it was SIGKILLed at 10.05 s, exit -9), so a long grace only
        lengthens the outage; without clients it exits in ~1.2 s."""
        apiserver = next(p for p in self.processes if p.name == "kube-apiserver")
        port = int(self.server.rsplit(":", 1)[1])
        stopped_at = time.monotonic()
        apiserver.stop(grace)
        self.processes.remove(apiserver)
        self._start_apiserver(timeout, port)
        return time.monotonic() - stopped_at

    def _start_apiserver(self, timeout: float, port: int | None = None) -> None:
        port = port or free_port()
        self.server = f"https://{LOOPBACK}:{port}"
        certs = self.workdir / "certs"
        certs.mkdir(exist_ok=True)
        sa_key = certs / "sa.key"
        if not sa_key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
        tokens = self.workdir / "tokens.csv"
        tokens.write_text("".join(
            f'{self.tokens[k]},{user},{user},"{",".join(groups)}"\n' for k, (user, groups) in IDENTITIES.items()
        ))
        tokens.chmod(0o600)
        apiserver = Process.start("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            "--etcd-servers", self.etcd_url, "--cert-dir", str(certs),
            "--secure-port", str(port), "--bind-address", LOOPBACK, "--advertise-address", LOOPBACK,
            "--service-cluster-ip-range", "10.0.0.0/24", "--allow-privileged=true",
            "--authorization-mode", "RBAC", "--token-auth-file", str(tokens),
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-account-key-file", str(sa_key), "--service-account-signing-key-file", str(sa_key),
            "--disable-admission-plugins", "ServiceAccount",
            "--enable-priority-and-fairness=false", "--profiling=false", "--v=1",
            # Without APF these two bound what it serves at once (429 beyond): a real
            # cluster's defaults, said here so the fleet benchmark's figures name them.
            "--max-requests-inflight", "400", "--max-mutating-requests-inflight", "200",
        ], self.workdir / "kube-apiserver.log")
        apiserver.url = self.server
        self.processes.append(apiserver)
        headers = {"Authorization": f"Bearer {self.tokens['admin']}"}
        readyz = f"{self.server}/readyz"
        wait_for(lambda: httpx.get(readyz, headers=headers, verify=False, timeout=2).status_code == 200,
                 timeout, "kube-apiserver", apiserver)

    def _write_kubeconfig(self, identity: str) -> None:
        ca = (self.workdir / "certs" / "apiserver.crt").read_bytes()
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "mlxpool-dev",
            "clusters": [{"name": "mlxpool-dev", "cluster": {
                "server": self.server, "certificate-authority-data": base64.b64encode(ca).decode()}}],
            "users": [{"name": identity, "user": {"token": self.tokens[identity]}}],
            "contexts": [{"name": "mlxpool-dev", "context": {"cluster": "mlxpool-dev", "user": identity}}],
        }
        path = self.kubeconfig(identity)
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    def kubectl(self, *args: str, identity: str = "admin", input: str | None = None,
                check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the kubectl built with the apiserver (same version) as `identity`."""
        return kubectl(self.kubeconfig(identity), *args, bin_dir=self.bin_dir, input=input,
                       check=check, timeout=timeout)

    def apply(self, *paths: Path | str, identity: str = "admin", namespace: str | None = None) -> str:
        args = ["apply", "--server-side", "--force-conflicts"]
        if namespace:
            args += ["-n", namespace]
        for p in paths:
            args += ["-f", str(p)]
        return self.kubectl(*args, identity=identity).stdout


def kubectl(kubeconfig: Path | str, *args: str, bin_dir: Path | None = None, input: str | None = None,
            check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the kubectl built beside the apiserver; raises with kubectl's stderr on failure."""
    argv = [str((bin_dir or binaries_dir()) / "kubectl"), "--kubeconfig", str(kubeconfig), *args]
    result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result
