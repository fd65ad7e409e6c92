"""pyproject.toml: metadata setuptools accepts without a deprecation warning (pip printed
one per build step for a TOML-table `project.license`). The build backend runs in pip's
isolated build environment, not this venv, so only the declaration is checked here."""

from __future__ import annotations

import tomllib

from mlxpool.dev.controlplane import REPO_ROOT

PYPROJECT = REPO_ROOT / "pyproject.toml"


def test_license_is_an_spdx_string_and_the_backend_understands_it() -> None:
    project = tomllib.loads(PYPROJECT.read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]  # SPDX strings need 77+

