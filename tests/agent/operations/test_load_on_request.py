"""Loading on request against a real agent (`multi_model.load_on_request`).

Real: an agent process serving the tiny MLX model, with an allow-listed source directory
holding a second real model and a broken one; concurrent first requests over HTTP.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest


@pytest.fixture(scope="module")
def lor_agent(tiny_model: Path, second_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from mlxpool.dev import components

    workdir = tmp_path_factory.mktemp("lor-agent")
    sources = workdir / "models"
    sources.mkdir()
    shutil.copytree(second_model, sources / "other", ignore=shutil.ignore_patterns(".*"))
    broken = sources / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    outside = workdir / "outside"
    shutil.copytree(second_model, outside, ignore=shutil.ignore_patterns(".*"))
    config = workdir / "runtime.yaml"
    config.write_text(f"multi_model:\n  load_on_request: true\n  load_on_request_sources: [{sources}]\n"
                      "  load_on_request_wait_seconds: 60\n")
    agent = components.start_agent(tiny_model, workdir / "logs", name="lor-agent",
                                   extra=["--config", str(config), "--max-tokens-default", "4"], timeout=90)
    agent.outside = outside
    yield agent
    agent.stop(10)


def complete(agent, name: str) -> httpx.Response:
    return httpx.post(f"{agent.url}/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 3,
                                                            "temperature": 0}, timeout=90)


def test_concurrent_first_requests_load_the_model_once(lor_agent):
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: complete(lor_agent, "other"), range(4)))
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert lor_agent.log_text().count("model admitted name=other ") == 1
    assert {m["id"] for m in httpx.get(f"{lor_agent.url}/v1/models").json()["data"]} == {"tiny", "other"}


def test_a_failed_load_is_a_clear_error_and_the_others_keep_serving(lor_agent):
    failed = complete(lor_agent, "broken")
    assert failed.status_code == 503, failed.text
    error = failed.json()["error"]
    assert error["code"] == "model_load_failed" and "broken" in error["message"]
    assert complete(lor_agent, "tiny").status_code == 200
    again = complete(lor_agent, "broken")  # remembered as failed: no reload storm
    assert again.status_code == 503 and again.json()["error"]["code"] == "model_load_failed"
    assert lor_agent.log_text().count("model admitted name=broken ") == 1


@pytest.mark.parametrize("name", ["unknown", "../outside", "outside", "models/other", ".hidden"])
def test_only_allow_listed_models_load_on_request(lor_agent, name):
    response = complete(lor_agent, name)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"


def test_a_bad_source_in_the_config_is_named(tmp_path):
    from pydantic import ValidationError

    from mlxpool.agent.config import MultiModel

    with pytest.raises(ValidationError, match="load_on_request_sources"):
        MultiModel(load_on_request_sources=["relative/dir"])
