"""Parsing stage requests: sources, revisions, digests, paths (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxpool.agent.operations.sources import (
    FileSource,
    HttpSource,
    HubSource,
    SourceError,
    check_digests,
    hub_wants,
    parse_source,
    safe_relative_path,
)

SHA = "ab" * 32


@pytest.mark.parametrize(("source", "revision", "expected"), [
    ("file:///models/tiny", None, FileSource(Path("/models/tiny"))),
    ("file://localhost/models/my%20model", None, FileSource(Path("/models/my model"))),
    ("http://127.0.0.1:9000/m/tiny", None, HttpSource("http://127.0.0.1:9000/m/tiny/")),
    ("https://example.com/m/tiny/", None, HttpSource("https://example.com/m/tiny/")),
    ("hf://org/repo", None, HubSource("org/repo", "main")),
    ("hf://org/repo@v1.0", None, HubSource("org/repo", "v1.0")),
    ("hf://org/repo", "abc123", HubSource("org/repo", "abc123")),
    ("hf://org/repo@abc123", "abc123", HubSource("org/repo", "abc123")),
    ("hf://gpt2", None, HubSource("gpt2", "main")),
])
def test_parse_source(source, revision, expected):
    assert parse_source(source, revision) == expected


@pytest.mark.parametrize(("source", "revision", "param", "words"), [
    ("file://host/models", None, "source", "local path"),
    ("file://relative", None, "source", "local path"),
    ("file:///models", "main", "revision", "hf:// sources only"),
    ("http:///nohost", None, "source", "no host"),
    ("http://h/dir?x=1", None, "source", "no query"),
    ("https://h/dir", "v1", "revision", "hf:// sources only"),
    ("hf://org/repo/extra", None, "source", "hf://org/repo"),
    ("hf://org/repo@", None, "source", "empty revision"),
    ("hf://org/repo@v1", "v2", "revision", "contradicts"),
    ("s3://bucket/model", None, "source", "scheme"),
])
def test_parse_source_rejects_naming_the_field(source, revision, param, words):
    with pytest.raises(SourceError) as caught:
        parse_source(source, revision)
    assert caught.value.param == param and words in str(caught.value)


def test_check_digests_normalizes_paths_and_hex():
    assert check_digests({"./model.safetensors": SHA.upper(), "sub/x.json": f"sha256:{SHA}"}) == {
        "model.safetensors": SHA, "sub/x.json": SHA}


@pytest.mark.parametrize(("digests", "param", "words"), [
    ({"model.safetensors": "abc"}, "digests.model.safetensors", "64 hex digits"),
    ({"../etc/passwd": SHA}, "digests.../etc/passwd", "inside the model directory"),
    ({"/abs": SHA}, "digests./abs", "inside the model directory"),
    ({"a.json": SHA, "./a.json": SHA}, "digests../a.json", "listed twice"),
])
def test_check_digests_rejects_naming_the_entry(digests, param, words):
    with pytest.raises(SourceError) as caught:
        check_digests(digests)
    assert caught.value.param == param and words in str(caught.value)


@pytest.mark.parametrize("bad", ["", "/x", "a/../../b", "..", ".", "a\\b"])
def test_safe_relative_path_refuses_escapes(bad):
    with pytest.raises(ValueError):
        safe_relative_path(bad)


def test_hub_wants_the_files_mlx_lm_loads():
    wanted = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "tokenizer.json",
              "tokenizer.model", "chat_template.jinja", "sub/config.json"]
    unwanted = ["pytorch_model.bin", "flax_model.msgpack", "README.md", ".gitattributes", "consolidated.safetensors"]
    assert all(hub_wants(p) for p in wanted)
    assert not any(hub_wants(p) for p in unwanted)
