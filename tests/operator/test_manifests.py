"""The kustomize overlays build and the API server accepts them; the launchd plist parses."""

from __future__ import annotations

import plistlib

import pytest
import yaml

from mlxpool.dev.controlplane import REPO_ROOT, ControlPlane

pytestmark = pytest.mark.integration

MANIFESTS = REPO_ROOT / "manifests"


def test_default_overlay_builds_crds_rbac_and_a_recreate_operator(controlplane: ControlPlane):
    docs = list(yaml.safe_load_all(controlplane.kubectl("kustomize", str(MANIFESTS / "default")).stdout))
    kinds = [d["kind"] for d in docs]
    assert kinds.count("CustomResourceDefinition") == 3
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"} <= set(kinds)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "mlxpool-operator"
    (container,) = pod["containers"]
    assert container["args"][0] == "operator" and "--all-namespaces" in container["args"]
    assert container["image"].startswith("ghcr.io/mlxpool/mlxpool-operator:")  # the kustomize override


def test_default_overlay_is_accepted_by_the_api_server(controlplane: ControlPlane):
    result = controlplane.kubectl("apply", "-k", str(MANIFESTS / "default"), "--dry-run=server")
    assert "deployment.apps/mlxpool-operator" in result.stdout


def test_deployment_args_parse_with_the_operator_cli(controlplane: ControlPlane, tmp_path):
    from mlxpool.operator.main import parse_args

    docs = yaml.safe_load_all((MANIFESTS / "default" / "operator.yaml").read_text())
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    # The token is a mounted Secret file; read one from a scratch copy of that path.
    (token_arg,) = [a for a in args if a.startswith("--agent-token-file=")]
    mounted = token_arg.split("=", 1)[1]
    (mount,) = pod["containers"][0]["volumeMounts"]
    assert mounted.startswith(mount["mountPath"] + "/") and mount["readOnly"]
    (volume,) = pod["volumes"]
    assert volume["secret"]["secretName"] == "mlxpool-agent-token"
    (tmp_path / "token").write_text("t")
    config, _ = parse_args([a if a != token_arg else f"--agent-token-file={tmp_path / 'token'}" for a in args[1:]])
    assert config.namespaces == () and config.metrics_port == 8080 and config.agent_token == "t"
    assert config.liveness_endpoint == "http://0.0.0.0:8081/healthz"


def test_launchd_plist_runs_the_agent_with_registration():
    plist = plistlib.loads((MANIFESTS / "launchd" / "dev.mlxpool.agent.plist").read_bytes())
    assert plist["Label"] == "dev.mlxpool.agent"
    argv = plist["ProgramArguments"]
    assert argv[1] == "agent" and "--kubeconfig" in argv and "--model" in argv
    assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True


def test_router_overlay_builds_with_the_image_override_and_the_api_server_accepts_it(controlplane: ControlPlane):
    from mlxpool.router.main import build_parser, settings_from_args

    docs = list(yaml.safe_load_all(controlplane.kubectl("kustomize", str(MANIFESTS / "router")).stdout))
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/mlxpool/mlxpool-router:0.1.0"
    assert pod["serviceAccountName"] == "mlxpool-router" and container["securityContext"]["readOnlyRootFilesystem"]
    parser = build_parser()
    settings = settings_from_args(parser, parser.parse_args(container["args"][1:]))
    assert str(settings.tables.pool) == "default/tiny"
    # The server-side dry run needs the namespace and service account of manifests/default.
    controlplane.kubectl("apply", "-k", str(MANIFESTS / "rbac"))
    result = controlplane.kubectl("apply", "-k", str(MANIFESTS / "router"), "--dry-run=server")
    assert "deployment.apps/mlxpool-router-tiny" in result.stdout and "service/mlxpool-router-tiny" in result.stdout
