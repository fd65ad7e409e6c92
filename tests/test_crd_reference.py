"""docs/crd-reference.md is generated from crds/ and must be current."""

from __future__ import annotations

import yaml

from mlxpool.dev import crdref


def test_the_crd_reference_is_current():
    assert crdref.REFERENCE.read_text() == crdref.current(), "run: python -m mlxpool.dev.crdref"


def test_every_field_of_every_schema_is_documented():
    text = crdref.current()
    for path in sorted(crdref.CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
        assert f"## {crd['spec']['names']['kind']} " in text
        for section in ("spec", "status"):
            for field, _, _ in crdref._fields(schema.get(section) or {}, section):
                assert f"| `{field}` |" in text, field


def test_check_names_a_stale_file(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "crd-reference.md"
    stale.write_text("old\n")
    monkeypatch.setattr(crdref, "REFERENCE", stale)
    assert crdref.main(["--check"]) == 1
    assert "is stale: run python -m mlxpool.dev.crdref" in capsys.readouterr().err
    assert crdref.main([]) == 0 and crdref.main(["--check"]) == 0
