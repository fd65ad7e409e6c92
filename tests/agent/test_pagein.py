"""Reading the served model's weights into the page cache at process start (`engine.pagein`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlxpool.agent.engine import pagein


def _model(tmp_path: Path, sizes: dict[str, int]) -> Path:
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(os.urandom(size))
    return tmp_path


def test_the_model_argument_is_found_in_either_spelling():
    assert pagein.model_argument(["--port", "1", "--model", "~/m"]) == Path("~/m").expanduser()
    assert pagein.model_argument(["--model=/x/y"]) == Path("/x/y")
    assert pagein.model_argument(["--model-name", "a", "--port", "2"]) is None
    assert pagein.model_argument(["--model"]) is None  # argparse will name the problem


def test_the_plan_reads_only_weights_and_nothing_when_they_exceed_half_the_available_memory(tmp_path: Path):
    model = _model(tmp_path, {"model-00001.safetensors": 3000, "model-00002.safetensors": 1000, "config.json": 10})
    job = pagein.plan(model, available=10_000)
    assert job is not None and [p.name for p in job.files] == ["model-00001.safetensors", "model-00002.safetensors"]
    assert job.total_bytes == 4000
    assert pagein.plan(model, available=7_999) is None  # 4,000 > half of it
    assert pagein.plan(model, available=None) is not None  # no MemAvailable (macOS): read
    assert pagein.plan(tmp_path / "missing", available=None) is None
    assert pagein.available_bytes(_model(tmp_path, {"meminfo": 0}) / "meminfo") is None
    (tmp_path / "meminfo2").write_text("MemTotal: 100 kB\nMemAvailable:   2048 kB\n")
    assert pagein.available_bytes(tmp_path / "meminfo2") == 2048 * 1024


def test_the_thread_reads_every_byte_once_and_a_vanished_file_is_an_error_not_a_crash(tmp_path: Path):
    model = _model(tmp_path, {"model.safetensors": 3 * 1024 * 1024 + 5})
    started = pagein.start(model)
    assert started is not None
    job, thread = started
    thread.join(30)
    assert not thread.is_alive() and thread.daemon
    assert (job.read_bytes, job.error) == (job.total_bytes, None) and job.seconds is not None
    job = pagein.plan(model, available=None)
    assert job is not None
    (model / "model.safetensors").unlink()
    assert pagein.read_all(job, chunk_bytes=4096).error is not None


def test_it_is_off_with_the_environment_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLXPOOL_PAGE_IN", "0")
    assert pagein.start(_model(tmp_path, {"model.safetensors": 10})) is None
