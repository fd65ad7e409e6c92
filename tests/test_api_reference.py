"""docs/api-reference.md and docs/openapi/*.json are generated from the /openapi.json of a
real agent and router (started on loopback by the generator) and must be current."""

from __future__ import annotations

from mlxpool.dev import apiref


def test_the_api_reference_is_current() -> None:
    files = apiref.current()
    assert set(files) == {apiref.REFERENCE, apiref.OPENAPI_DIR / "agent.json", apiref.OPENAPI_DIR / "router.json"}
    for path, text in files.items():
        assert path.exists() and path.read_text() == text, f"{path} is stale: run python -m mlxpool.dev.apiref"
    reference = files[apiref.REFERENCE]
    for route in ("`POST /v1/chat/completions`", "`PUT /v1/node/cache/{key}`", "`GET /v1/signals`",
                  "`DELETE /v1/node/models/{name}`"):
        assert route in reference, route
    assert "#### StageRequest" in reference and "`422`" not in reference


def test_types_are_rendered_with_their_bounds() -> None:
    assert apiref.type_of({"anyOf": [{"type": "integer", "minimum": 1.0, "maximum": 8.0}, {"type": "null"}]}) == (
        "integer ≥ 1, ≤ 8 \\| null")
    assert apiref.type_of({"type": "array", "items": {"$ref": "#/components/schemas/TierPolicy"}}) == (
        "array of [TierPolicy](#tierpolicy)")
    assert apiref.type_of({"enum": ["critical", "low"]}) == "one of `critical`, `low`"
    assert apiref.type_of({"type": "object", "additionalProperties": {"type": "string"}}) == "map of string"
