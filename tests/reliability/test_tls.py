"""TLS between routers and agents, real processes and real certificates: a CA made here
with the openssl CLI signs the agent's certificate (for 127.0.0.1); the agent serves HTTPS
from the files (`auth.tls_cert_file`/`tls_key_file`, `--tls-cert-file`/`--tls-key-file`), a
router that trusts the CA (`--upstream-ca-file`) serves through it, and one that does not
refuses to talk to it (a JSON error, never plain text on the way). An operator given the
CA (`--agent-ca-file`) probes such an agent and loads a pool's model on it over HTTPS."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from mlxpool.agent.config import AuthConfig
from mlxpool.dev import components
from mlxpool.dev.processes import wait_for
from mlxpool.dev.rawhttp import openai_error

from .conftest import write_routes

pytestmark = pytest.mark.integration

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certificates(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signed for IP 127.0.0.1 (strict X.509 profile)."""
    ca, ca_key, cert, key, csr = d / "ca.crt", d / "ca.key", d / "agent.crt", d / "agent.key", d / "agent.csr"
    openssl("req", "-x509", *EC, "-keyout", str(ca_key), "-out", str(ca), "-days", "1", "-subj", "/CN=mlxpool test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *EC, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "1", "-extfile", str(ext))
    return ca, cert, key


def test_tls_files_go_together(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ValueError, match="tls_key_file"):
        AuthConfig(tls_cert_file=cert)
    with pytest.raises(ValueError, match=r"auth.tls_key_file: .*no such file"):
        AuthConfig(tls_cert_file=cert, tls_key_file=tmp_path / "missing.pem")


@pytest.mark.parametrize("content", [None, "not a certificate\n"], ids=["missing", "not-pem"])
def test_the_operator_refuses_an_unusable_ca_file(tmp_path, capsys, content):
    from mlxpool.operator.main import parse_args
    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_text(content)
    with pytest.raises(SystemExit):
        parse_args(["--agent-ca-file", str(ca)])
    assert f"--agent-ca-file {ca}" in capsys.readouterr().err
    good, _, _ = make_certificates(tmp_path)
    assert parse_args(["--agent-ca-file", str(good)])[0].agent_ca_file == good


def test_router_to_agent_over_tls(tiny_model, tmp_path):
    ca, cert, key = make_certificates(tmp_path)
    logs = tmp_path / "logs"
    agent = components.start_agent(tiny_model, logs, extra=["--tls-cert-file", str(cert), "--tls-key-file", str(key),
                                                            "--no-warmup"])
    routers = []
    try:
        assert agent.base_url.startswith("https://127.0.0.1:")
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        direct = httpx.post(agent.base_url + "/v1/completions", json=body, timeout=30,
                            verify=ssl.create_default_context(cafile=str(ca)))
        assert direct.status_code == 200, direct.text
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.post(agent.base_url + "/v1/completions", json=body, timeout=30)  # not trusted: refused

        routes = tmp_path / "routes.json"
        write_routes(routes, [agent.base_url], 1)
        trusting = components.start_router(logs, routes_file=routes, name="router-ca",
                                           extra=["--upstream-ca-file", str(ca)])
        routers.append(trusting)
        reply = httpx.post(trusting.base_url + "/v1/completions", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0

        untrusting = components.start_router(logs, routes_file=routes, name="router-no-ca")
        routers.append(untrusting)
        refused = httpx.post(untrusting.base_url + "/v1/completions", json=body, timeout=30)
        assert refused.status_code >= 500 and refused.status_code != 500, refused.text
        openai_error(refused.content)
        print(f"TLS: agent at {agent.base_url}; through a router trusting the CA: 200; "
              f"a router without it: {refused.status_code} {refused.json()['error']['code']}")
    finally:
        for router in routers:
            router.stop(10)
        agent.stop(10)


def test_operator_probes_and_loads_over_tls(tiny_model, tmp_path, controlplane, namespace):
    """An empty agent serving HTTPS registers an https:// URL; the operator, trusting the CA,
    probes it (the pool needs a healthy endpoint to be Ready) and loads the model through
    its operations API. Without `--agent-ca-file` every probe fails verification."""
    ca, cert, key = make_certificates(tmp_path)
    logs = tmp_path / "logs"
    token = tmp_path / "ops-token"
    token.write_text("tls-ops-token-0123456789")
    label = {"mlxpool.dev/test": namespace}
    procs = []
    try:
        procs.append(components.start_operator(logs, kubeconfig=controlplane.kubeconfig("operator"),
                                               agent_token_file=token,
                                               extra=["--namespace", namespace, "--agent-ca-file", str(ca)]))
        agent = components.start_agent(None, logs, kubeconfig=controlplane.kubeconfig("agent"),
                                       node_name=f"{namespace}-tls", labels=label, ops_token_file=token,
                                       extra=["--tls-cert-file", str(cert), "--tls-key-file", str(key)])
        procs.append(agent)
        assert agent.base_url.startswith("https://")
        pool = {
            "apiVersion": "mlxpool.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": "pool", "namespace": namespace},
            "spec": {"models": [{"name": "tiny", "source": f"file://{tiny_model}"}], "replicas": 1,
                     "nodeSelector": {"matchLabels": label}},
        }
        controlplane.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool))
        controlplane.kubectl("wait", "--for=condition=Ready", "inferencepool/pool", "-n", namespace,
                             "--timeout=60s")
        tls = ssl.create_default_context(cafile=str(ca))

        def loaded() -> bool:
            report = httpx.get(agent.base_url + "/v1/node", timeout=10, verify=tls,
                               headers={"authorization": f"Bearer {token.read_text()}"}).json()
            return [(m["name"], m["phase"]) for m in report["models"]] == [("tiny", "ready")]

        wait_for(loaded, 20, "the operator's load over HTTPS")
        status = controlplane.kubectl("get", "inferencepool/pool", "-n", namespace, "-o",
                                      "jsonpath={.status.readyReplicas}").stdout
        print(f"TLS: operator with --agent-ca-file loaded and probed {agent.base_url}; readyReplicas {status}")
    finally:
        for proc in reversed(procs):
            proc.stop(10)
        (k, v), = label.items()
        controlplane.kubectl("delete", "inferencenodes", "-l", f"{k}={v}", "--wait=false", check=False)
