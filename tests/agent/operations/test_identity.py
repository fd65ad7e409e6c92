"""Content identity on real model directories (`mlxpool.tinymodel`): what makes two models the same.

The defect this guards against: an identity of config plus file names and sizes gave a
fine-tune and its base (equal config, equal sizes, other bytes) the same identity.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mlxpool.agent.operations.identity import CACHE_FILE, content_identity, deciding_files
from mlxpool.tinymodel import make_variant


@pytest.fixture
def base(tiny_model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "base"
    shutil.copytree(tiny_model, copy, ignore=shutil.ignore_patterns(".*"))
    return copy


def test_a_fine_tune_with_equal_config_and_sizes_has_another_identity(base: Path, tmp_path: Path):
    tuned = make_variant(base, tmp_path / "tuned", seed=1)
    assert (tuned / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert sorted((p.name, p.stat().st_size) for p in deciding_files(tuned)) == \
        sorted((p.name, p.stat().st_size) for p in deciding_files(base))  # what the old identity hashed
    assert content_identity(tuned).digest != content_identity(base).digest


def test_the_same_bytes_anywhere_under_any_name_are_one_identity(base: Path, tmp_path: Path):
    elsewhere = tmp_path / "deep" / "other-name"
    shutil.copytree(base, elsewhere, ignore=shutil.ignore_patterns(".*"))
    (elsewhere / "README.md").write_text("a model card changes no output")
    one, two = content_identity(base), content_identity(elsewhere)
    assert one.digest == two.digest and len(one.digest) == 32
    assert one.tensors == two.tensors and len(one.tensors) > 10


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
def test_the_config_and_the_tokenizer_are_part_of_it(base: Path, tmp_path: Path, name: str):
    before = content_identity(base).digest
    path = base / name
    path.write_text(path.read_text().replace("}", ', "extra": 1}', 1))
    assert content_identity(base).digest != before


def test_tensors_are_hashed_one_by_one(base: Path, tmp_path: Path):
    tuned = make_variant(base, tmp_path / "tuned", seed=1)
    one, two = content_identity(base), content_identity(tuned)
    assert one.tensors.keys() == two.tensors.keys()
    # make_variant nudges every weight; the norms are ones plus noise too, so nothing is equal...
    assert not {n for n in one.tensors if one.tensors[n] == two.tensors[n]}
    # ...while a copy shares every tensor, each with its size.
    assert sum(one.tensor_bytes.values()) <= (base / "model.safetensors").stat().st_size
    assert all(size > 0 for size in one.tensor_bytes.values())


def test_it_is_cached_beside_the_files_until_one_changes(base: Path):
    first = content_identity(base)
    assert first.bytes_hashed > 0 and (base / CACHE_FILE).is_file()
    again = content_identity(base)
    assert again.digest == first.digest and again.bytes_hashed == 0 and again.tensors == first.tensors
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size; the mtime moves
    weights.write_bytes(bytes(data))
    changed = content_identity(base)
    assert changed.bytes_hashed > 0 and changed.digest != first.digest


def test_a_stale_or_broken_cache_file_is_recomputed(base: Path):
    first = content_identity(base)
    (base / CACHE_FILE).write_text(json.dumps({"version": 1, "identity": "forged", "files": {}}))
    assert content_identity(base).digest == first.digest
    (base / CACHE_FILE).write_text("{not json")
    assert content_identity(base).digest == first.digest


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_still_has_an_identity(base: Path):
    expected = content_identity(base).digest
    (base / CACHE_FILE).unlink()
    base.chmod(0o555)
    try:
        assert content_identity(base).digest == expected
        assert not (base / CACHE_FILE).exists()
    finally:
        base.chmod(0o755)


def test_files_that_change_no_output_are_left_out(base: Path):
    (base / "README.md").write_text("card")
    (base / "notes.txt").write_text("notes")
    names = {p.name for p in deciding_files(base)}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not names & {"README.md", "notes.txt", CACHE_FILE}
