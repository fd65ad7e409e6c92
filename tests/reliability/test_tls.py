"""TLS between routers and agents, real processes and real certificates: a CA made here
with the openssl CLI signs the agent's certificate (for 127.0.0.1); the agent serves HTTPS
from the files (`auth.tls_cert_file`/`tls_key_file`, `--tls-cert-file`/`--tls-key-file`), a
router that trusts the CA (`--upstream-ca-file`) serves through it, and one that does not
refuses to talk to it (a JSON error, never plain text on the way)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from mlxpool.agent.config import AuthConfig
from mlxpool.dev import components
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
