"""`mlxpool dev up`'s samples overlay and next steps: manifests/samples with the ModelCache
staged from the dev stack's own model (the sample's Mac path is absent on a dev machine,
and applying it as is left the ModelCache Failed). Real here: kubectl's kustomize and a
server-side dry run against the real apiserver."""

from __future__ import annotations

from pathlib import Path

import yaml

from mlxpool.dev import stack
from mlxpool.dev.controlplane import ControlPlane
from mlxpool.dev.main import next_steps


def test_the_overlay_stages_the_stacks_model_and_passes_a_server_side_dry_run(
        tmp_path: Path, controlplane: ControlPlane) -> None:
    model = tmp_path / "models" / "tiny"
    overlay = stack.write_samples_overlay(tmp_path, model)
    rendered = list(yaml.safe_load_all(controlplane.kubectl("kustomize", str(overlay)).stdout))
    kinds = {d["kind"]: d for d in rendered}
    assert set(kinds) == {"InferencePool", "ModelCache"}
    assert kinds["ModelCache"]["spec"]["source"] == f"file://{model.resolve()}"
    original = yaml.safe_load((stack.SAMPLES / "mlxpool_v1alpha1_inferencepool.yaml").read_text())
    assert kinds["InferencePool"]["spec"] == original["spec"]  # only the cache's source differs
    out = controlplane.kubectl("apply", "-k", str(overlay), "--dry-run=server").stdout
    assert "modelcache.mlxpool.dev/tiny created (server dry run)" in out, out


def test_dev_up_prints_what_to_type_next(tmp_path: Path) -> None:
    state = stack.StackState(str(tmp_path), "https://127.0.0.1:6443", str(tmp_path / "kubeconfig-admin.yaml"))
    state.members.append(stack.Member(name="router", pid=1, url="http://127.0.0.1:41234", log="router.log",
                                      cmdline=""))
    text = next_steps(state, "default/tiny", tmp_path)
    assert f"export KUBECONFIG={tmp_path}/kubeconfig-admin.yaml" in text
    assert f"kubectl apply -k {tmp_path}/samples" in text
    assert "kubectl wait --for=condition=Ready -n default inferencepool/tiny modelcache/tiny" in text
    assert "curl -N http://127.0.0.1:41234/v1/chat/completions" in text and '"stream": true' in text
    assert f"mlxpool dev down --workdir {tmp_path}" in text
